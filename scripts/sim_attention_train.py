#!/usr/bin/env python3
"""Checks the index math of kernels/attention_train.cu without a GPU: ldmatrix (plain and
.trans) and mma.m16n8k16 are emulated per lane from the PTX register layouts, the kernels'
operand helpers and loops are transcribed, and one block's forward and backward are
compared with a direct attention in float64 (dropout by a fixed random keep mask); the
dropout keep bits (Philox groups spread over lanes) are checked per element.
Run: python3 scripts/sim_attention_train.py (prints ok per case)."""
import numpy as np

LANES = range(32)


def ldm(mem, ld, addr, trans):
    """ldmatrix.x4: addr(lane) -> (row, col) of the 16-byte row that lane points at."""
    rows = [addr(l) for l in LANES]
    out = [[None] * 4 for _ in LANES]
    for i in range(4):
        m = np.array([mem[r, c:c + 8] for r, c in rows[8 * i:8 * i + 8]])
        for l in LANES:
            g, t = l // 4, l % 4
            out[l][i] = (m[2 * t, g], m[2 * t + 1, g]) if trans else (m[g, 2 * t], m[g, 2 * t + 1])
    return out


def at_a(x, r0, c0):
    return ldm(x, None, lambda l: (r0 + (l & 15), c0 + (l >> 4) * 8), False)


def at_a_t(x, m0, k0):
    return ldm(x, None, lambda l: (k0 + (l & 7) + (l >> 4) * 8, m0 + ((l >> 3) & 1) * 8), True)


def at_b_nk(y, n0, k0):
    return ldm(y, None, lambda l: (n0 + (l & 7) + (l >> 4) * 8, k0 + ((l >> 3) & 1) * 8), False)


def at_b_kn(y, k0, n0):
    return ldm(y, None, lambda l: (k0 + (l & 7) + ((l >> 3) & 1) * 8, n0 + (l >> 4) * 8), True)


def mma(c, a, b0, b1):
    """c[lane][4] += A B with A, B assembled from the lanes' fragments (PTX layout)."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    for l in LANES:
        g, t = l // 4, l % 4
        for e in range(2):
            A[g, 2 * t + e] = a[l][0][e]
            A[g + 8, 2 * t + e] = a[l][1][e]
            A[g, 8 + 2 * t + e] = a[l][2][e]
            A[g + 8, 8 + 2 * t + e] = a[l][3][e]
            B[2 * t + e, g] = b0[l][e]
            B[8 + 2 * t + e, g] = b1[l][e]
    C = A @ B
    for l in LANES:
        g, t = l // 4, l % 4
        c[l] += [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]


def regs(b, i):
    return [b[l][i] for l in LANES]


def acc_as_a(s, kk):
    """The A operand for keys 16kk.. from accumulators s[n][lane][4] (the kernels' packs)."""
    return [[(s[2 * kk][l][0], s[2 * kk][l][1]), (s[2 * kk][l][2], s[2 * kk][l][3]),
             (s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]), (s[2 * kk + 1][l][2], s[2 * kk + 1][l][3])]
            for l in LANES]


def row_scores(x, y, r0, d, lkp):
    """at_row_scores: x rows r0..r0+15 @ y^T, key tiles of 8."""
    s = new_acc(8)
    for kk in range(d // 16):
        a = at_a(x, r0, kk * 16)
        for n2 in range(lkp // 16):
            b = at_b_nk(y, n2 * 16, kk * 16)
            mma(s[2 * n2], a, regs(b, 0), regs(b, 1))
            mma(s[2 * n2 + 1], a, regs(b, 2), regs(b, 3))
    return s


def mma_kn(acc, a, y, k0, d):
    """at_mma_kn: acc += a @ y[k0..k0+16, 0..d)."""
    for n2 in range(d // 16):
        b = at_b_kn(y, k0, n2 * 16)
        mma(acc[2 * n2], a, regs(b, 0), regs(b, 1))
        mma(acc[2 * n2 + 1], a, regs(b, 2), regs(b, 3))


def rows_by(s, y, lkp, d):
    """at_rows_by: the score accumulators as the A operand, times y [lkp, d]."""
    acc = new_acc(16)
    for kk in range(lkp // 16):
        mma_kn(acc, acc_as_a(s, kk), y, kk * 16, d)
    return acc


def stage(x, rows_pad, ld):
    m = np.zeros((rows_pad, ld))
    m[:, :] = np.nan  # the row padding past d is never read
    m[:, :x.shape[1]] = 0
    m[:x.shape[0], :x.shape[1]] = x
    return m


def stage_qkv(q, k, v):
    """The lengths, head_dim, padded lengths and staged q, k, v (AtQkv)."""
    lq, d = q.shape
    lk = k.shape[0]
    lqp, lkp = -(-lq // 16) * 16, -(-lk // 16) * 16
    return lq, lk, d, lqp, lkp, (stage(q, lqp, d + 8), stage(k, lkp, d + 8), stage(v, lkp, d + 8))


def new_acc(n):
    return [np.zeros((32, 4)) for _ in range(n)]


def put(out, rows, r0, c, acc):
    for l in LANES:
        g, t = l // 4, l % 4
        for h in range(2):
            r = r0 + g + 8 * h
            if r < rows:
                out[r, c + 2 * t:c + 2 * t + 2] = acc[l][2 * h:2 * h + 2]


def forward(q, k, v, lim_of, scale, keep_mask, keep):
    lq, lk, d, lqp, lkp, (qs, ks, vs) = stage_qkv(q, k, v)
    ctx = np.full((lq, d), np.nan)
    probs = np.full((lq, lk), np.nan)
    warps = max(lqp, lkp) // 16
    for w in range(warps):
        r0 = 16 * w
        if r0 >= lqp:
            continue
        s = row_scores(qs, ks, r0, d, lkp)
        s0 = [x.copy() for x in s]  # what the shuffles read: every lane's scores
        for l in LANES:
            g, t = l // 4, l % 4
            for h in range(2):
                i = r0 + g + 8 * h
                lim = lim_of(i) if i < lq else 0
                js = [(n, e, 8 * n + 2 * t + e) for n in range(8) for e in range(2)]
                # the shuffles over t: the row's max and sum over its four lanes
                row_lanes = [4 * g + tt for tt in range(4)]
                allv = [s0[n][ll][2 * h + e] * scale for ll in row_lanes for n in range(8)
                        for e in range(2) if 8 * n + 2 * (ll % 4) + e < lim]
                m = max(allv) if allv else -np.inf
                tot = sum(np.exp(x - m) for x in allv)
                for n, e, j in js:
                    p = np.exp(s[n][l][2 * h + e] * scale - m) / tot if j < lim else 0.0
                    pd = p
                    if i < lq and j < lk:
                        probs[i, j] = p
                        pd = p * keep if keep_mask[i, j] else 0.0
                    s[n][l][2 * h + e] = pd
        o = rows_by(s, vs, lkp, d)
        for n in range(d // 8):
            put(ctx, lq, r0, 8 * n, o[n])
    return ctx, probs


def backward(q, k, v, probs, dctx, scale, keep_mask, keep):
    lq, lk, d, lqp, lkp, (qs, ks, vs) = stage_qkv(q, k, v)
    ld, lds = d + 8, lkp + 8
    dos = stage(dctx, lqp, ld)
    pds = np.full((lqp, lds), np.nan)
    dss = np.full((lqp, lds), np.nan)
    dq, dk, dv = (np.full((lq, d), np.nan), np.full((lk, d), np.nan), np.full((lk, d), np.nan))
    warps = max(lqp, lkp) // 16
    for w in range(warps):
        r0 = 16 * w
        if r0 >= lqp:
            continue
        dp = row_scores(dos, vs, r0, d, lkp)
        for h in range(2):
            pv, dots = {}, np.zeros(32)
            for l in LANES:
                g, t = l // 4, l % 4
                i = r0 + g + 8 * h
                for n in range(8):
                    for e in range(2):
                        j = 8 * n + 2 * t + e
                        p = pd = 0.0
                        g2 = dp[n][l][2 * h + e]
                        if i < lq and j < lk:
                            p = probs[i, j]
                            kept = keep_mask[i, j]
                            pd = p * keep if kept else 0.0
                            g2 = g2 * keep if kept else 0.0
                        pv[l, n, e] = p
                        dp[n][l][2 * h + e] = g2
                        dots[l] += p * g2
                        if j < lkp:
                            pds[i, j] = pd
            dots = np.array([dots[(l // 4) * 4:(l // 4) * 4 + 4].sum() for l in LANES])
            for l in LANES:
                g, t = l // 4, l % 4
                i = r0 + g + 8 * h
                for n in range(8):
                    for e in range(2):
                        j = 8 * n + 2 * t + e
                        ds = scale * pv[l, n, e] * (dp[n][l][2 * h + e] - dots[l])
                        dp[n][l][2 * h + e] = ds
                        if j < lkp:
                            dss[i, j] = ds
        acc = rows_by(dp, ks, lkp, d)
        for n in range(d // 8):
            put(dq, lq, r0, 8 * n, acc[n])
    for w in range(warps):
        r0 = 16 * w
        if r0 >= lkp:
            continue
        for x, y, out in ((pds, dos, dv), (dss, qs, dk)):
            acc = new_acc(16)
            for kk in range(lqp // 16):
                mma_kn(acc, at_a_t(x, r0, kk * 16), y, kk * 16, d)
            for n in range(d // 8):
                put(out, lk, r0, 8 * n, acc[n])
    return dq, dk, dv


def keep_bits(bh, lq, lk, r0, uniform, p):
    """at_keep_bits: lanes take the warp's Philox groups in turn, stage byte flags, then
    lane t gathers keys 16t..16t+15 of its rows; returns {row: mask} for rows below lq."""
    rows = min(16, lq - r0)
    e0 = (bh * lq + r0) * lk
    g0 = e0 // 4
    groups = (e0 + rows * lk - 1) // 4 - g0 + 1
    flags = bytearray(16 * 64 + 16)
    for lane in LANES:
        for x in range(lane, groups, 32):
            for b in range(4):
                flags[4 * x + b] = int(uniform(4 * (g0 + x) + b) >= p)
    masks = {}
    for g in range(8):
        for h in range(2):
            i = r0 + g + 8 * h
            m = 0
            for t in range(4):
                if i < lq:
                    base = (e0 - 4 * g0) + (i - r0) * lk
                    for j in range(16 * t, min(lk, 16 * t + 16)):
                        m |= int(flags[base + j] != 0) << j
            if i < lq:
                masks[i] = m
    return masks


def check_keep_bits(rng):
    table = rng.random(1 << 16)

    def uniform(e):
        return table[e % len(table)]

    for lq, lk, heads in ((32, 32, 7), (17, 40, 3), (64, 64, 2), (9, 5, 5), (3, 63, 4)):
        for bh in range(heads * 2):
            for r0 in range(0, lq, 16):
                masks = keep_bits(bh, lq, lk, r0, uniform, 0.3)
                for i, m in masks.items():
                    want = sum(int(uniform((bh * lq + i) * lk + j) >= 0.3) << j for j in range(lk))
                    assert m == want, (lq, lk, bh, r0, i)
    print("ok keep bits")


def reference(q, k, v, lim_of, scale, keep_mask, keep, dctx):
    lq, lk = q.shape[0], k.shape[0]
    s = q @ k.T * scale
    mask = np.array([[j < lim_of(i) for j in range(lk)] for i in range(lq)])
    s = np.where(mask, s, -np.inf)
    mx = s.max(1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
    tot = e.sum(1, keepdims=True)
    p = np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0)
    km = keep_mask * keep
    pd = p * km
    ctx = pd @ v
    dv = pd.T @ dctx
    dpd = dctx @ v.T * km
    ds = p * (dpd - (p * dpd).sum(1, keepdims=True)) * scale
    return ctx, p, ds @ k, ds.T @ q, dv


def main():
    rng = np.random.default_rng(3)
    check_keep_bits(rng)
    cases = [(32, 32, 64, None, False, 0.0), (17, 40, 16, 23, False, 0.1),
             (64, 64, 128, None, True, 0.0), (9, 5, 32, 3, True, 0.2), (48, 16, 48, 0, False, 0.0)]
    for lq, lk, d, key_len, causal, p_drop in cases:
        q, k, v, dctx = (rng.standard_normal((n, d)) for n in (lq, lk, lk, lq))
        scale = d ** -0.5
        keep = 1 / (1 - p_drop)
        keep_mask = rng.random((lq, lk)) >= p_drop
        lim = lk if key_len is None else min(key_len, lk)

        def lim_of(i):
            return min(lim, i + 1) if causal else lim

        errs = []
        ctx, probs = forward(q, k, v, lim_of, scale, keep_mask, keep)
        rctx, rp, rdq, rdk, rdv = reference(q, k, v, lim_of, scale, keep_mask, keep, dctx)
        dq, dk, dv = backward(q, k, v, probs, dctx, scale, keep_mask, keep)
        for name, a, b in (("ctx", ctx, rctx), ("probs", probs, rp), ("dq", dq, rdq),
                           ("dk", dk, rdk), ("dv", dv, rdv)):
            err = np.abs(a - b).max()
            assert np.isfinite(err) and err < 1e-9, (lq, lk, d, name, err)
            errs.append(err)
        print(f"ok lq {lq} lk {lk} d {d} key_len {key_len} causal {causal} dropout {p_drop}: "
              f"worst abs err {max(errs):.1e}")


if __name__ == "__main__":
    main()
