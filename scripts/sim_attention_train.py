#!/usr/bin/env python3
"""Checks the index math of kernels/attention_train.cu without a GPU: its at_gemm fragments
(placed per the PTX mma.m16n8k16 register layout), operand accessors, call sites and padded
shapes, re-run in numpy, against a direct attention forward and backward.
Run: python3 scripts/sim_attention_train.py (prints ok per case)."""
import numpy as np

def at_el(p, trans, r, c, ld):
    return p[c * ld + r] if trans else p[r * ld + c]

def at_gemm(a, lda, ta, b, ldb, tb, c, ldc, m, n, k):
    # 32 lanes; per tile, build fragments exactly as the kernel does, then apply the
    # documented mma semantics: A rows g/g+8, k 2t(+1) / 2t+8(+1); B col g, k rows same;
    # C rows g/g+8, cols 2t(+1).
    tn = n // 8
    for tile in range((m // 16) * tn):
        i0, j0 = (tile // tn) * 16, (tile % tn) * 8
        A = np.zeros((16, 16)); B = np.zeros((16, 8)); acc = np.zeros((32, 4))
        for kk in range(0, k, 16):
            A[:] = np.nan; B[:] = np.nan
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                r0, r1, c0, c1, col = i0 + g, i0 + g + 8, kk + 2 * t, kk + 2 * t + 8, j0 + g
                fa = [(at_el(a, ta, r0, c0, lda), at_el(a, ta, r0, c0 + 1, lda)),
                      (at_el(a, ta, r1, c0, lda), at_el(a, ta, r1, c0 + 1, lda)),
                      (at_el(a, ta, r0, c1, lda), at_el(a, ta, r0, c1 + 1, lda)),
                      (at_el(a, ta, r1, c1, lda), at_el(a, ta, r1, c1 + 1, lda))]
                fb = [(at_el(b, tb, c0, col, ldb), at_el(b, tb, c0 + 1, col, ldb)),
                      (at_el(b, tb, c1, col, ldb), at_el(b, tb, c1 + 1, col, ldb))]
                # documented placement (tile-local)
                A[g, 2*t], A[g, 2*t+1] = fa[0]
                A[g+8, 2*t], A[g+8, 2*t+1] = fa[1]
                A[g, 2*t+8], A[g, 2*t+9] = fa[2]
                A[g+8, 2*t+8], A[g+8, 2*t+9] = fa[3]
                B[2*t, g], B[2*t+1, g] = fb[0]
                B[2*t+8, g], B[2*t+9, g] = fb[1]
            assert not np.isnan(A).any() and not np.isnan(B).any()
            D = A @ B
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                acc[lane] += [D[g, 2*t], D[g, 2*t+1], D[g+8, 2*t], D[g+8, 2*t+1]]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            base = (i0 + g) * ldc + j0 + 2 * t
            c[base], c[base + 1] = acc[lane][0], acc[lane][1]
            c[base + 8 * ldc], c[base + 8 * ldc + 1] = acc[lane][2], acc[lane][3]

def r16(x): return (x + 15) // 16 * 16

def fwd(q, k, v, lq, lk, d, scale, causal, limit):
    lqp, lkp = r16(lq), r16(lk); wf = max(lkp, d)
    qs = np.zeros(lqp * d); ks = np.zeros(lkp * d); vs = np.zeros(lkp * d)
    qs[:lq * d] = q.ravel(); ks[:lk * d] = k.ravel(); vs[:lk * d] = v.ravel()
    f = np.full(lqp * wf, np.nan)
    at_gemm(qs, d, False, ks, d, True, f, wf, lqp, lkp, d)
    ps = np.zeros(lqp * lkp); probs = np.zeros((lq, lk))
    for i in range(lqp):
        lim = limit if i < lq else 0
        if causal: lim = min(lim, i + 1)
        row = f[i * wf:i * wf + lkp]
        if lim > 0:
            s = row[:lim] * scale; e = np.exp(s - s.max()); p = e / e.sum()
            ps[i * lkp:i * lkp + lim] = p
            if i < lq: probs[i, :lim] = p
    f = np.full(lqp * wf, np.nan)
    at_gemm(ps, lkp, False, vs, d, False, f, wf, lqp, d, lkp)
    ctx = np.array([[f[i * wf + e] for e in range(d)] for i in range(lq)])
    return ctx, probs

def bwd(q, k, v, probs, do, lq, lk, d, scale):
    lqp, lkp = r16(lq), r16(lk); wf = max(lkp, d); hf = max(lqp, lkp)
    qs = np.zeros(lqp * d); ks = np.zeros(lkp * d); vs = np.zeros(lkp * d); dos = np.zeros(lqp * d)
    qs[:lq * d] = q.ravel(); ks[:lk * d] = k.ravel(); vs[:lk * d] = v.ravel(); dos[:lq * d] = do.ravel()
    ps = np.zeros(lqp * lkp)
    for i in range(lq): ps[i * lkp:i * lkp + lk] = probs[i]
    pds = ps.copy()
    f = np.full(hf * wf, np.nan)
    at_gemm(pds, lkp, True, dos, d, False, f, wf, lkp, d, lqp)
    dv = np.array([[f[j * wf + e] for e in range(d)] for j in range(lk)])
    f = np.full(hf * wf, np.nan)
    at_gemm(dos, d, False, vs, d, True, f, wf, lqp, lkp, d)
    dss = np.zeros(lqp * lkp)
    for i in range(lqp):
        row = f[i * wf:i * wf + lkp]; p = ps[i * lkp:(i + 1) * lkp]
        dot = (p * row).sum()
        dss[i * lkp:(i + 1) * lkp] = scale * p * (row - dot)
    f = np.full(hf * wf, np.nan)
    at_gemm(dss, lkp, False, ks, d, False, f, wf, lqp, d, lkp)
    dq = np.array([[f[i * wf + e] for e in range(d)] for i in range(lq)])
    f = np.full(hf * wf, np.nan)
    at_gemm(dss, lkp, True, qs, d, False, f, wf, lkp, d, lqp)
    dk = np.array([[f[j * wf + e] for e in range(d)] for j in range(lk)])
    return dq, dk, dv

rng = np.random.default_rng(0)
for (lq, lk, d, causal, limit) in [(13, 29, 16, False, 20), (32, 32, 64, True, 32), (9, 9, 32, False, 9), (40, 48, 32, True, 35)]:
    q, k, v, do = (rng.standard_normal((n, d)) for n in (lq, lk, lk, lq))
    scale = 1 / np.sqrt(d)
    ctx, probs = fwd(q, k, v, lq, lk, d, scale, causal, limit)
    # reference
    s = q @ k.T * scale
    mask = np.zeros((lq, lk), bool)
    for i in range(lq):
        lim = limit
        if causal: lim = min(lim, i + 1)
        mask[i, :lim] = True
    s = np.where(mask, s, -np.inf)
    P = np.exp(s - s.max(1, keepdims=True)); P = P / P.sum(1, keepdims=True)
    P = np.nan_to_num(P)
    assert np.allclose(probs, P), "probs"
    assert np.allclose(ctx, P @ v), "ctx"
    dq, dk, dv = bwd(q, k, v, probs, do, lq, lk, d, scale)
    dP = do @ v.T
    dS = scale * P * (dP - (P * dP).sum(1, keepdims=True))
    assert np.allclose(dv, P.T @ do), "dv"
    assert np.allclose(dq, dS @ k), "dq"
    assert np.allclose(dk, dS.T @ q), "dk"
    print("ok", lq, lk, d, causal, limit)
