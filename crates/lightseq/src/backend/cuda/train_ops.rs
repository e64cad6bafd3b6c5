//! CUDA bodies of the training ops (`crate::train::ops`); kernels in `kernels/train.cu`,
//! GEMMs through cuBLASLt. Shapes were checked by the front ends.

use super::blaslt::Epilogue;
use super::ops::{grid_1d, launched};
use super::{cuda_err, CudaStorage};
use crate::backend::cpu::train::AdamHyper;
use crate::backend::GemmStrides;
use crate::error::{Error, Result};
use crate::ops::Activation;
use crate::tensor::DType;
use crate::train::ops::AttentionDrop as DropSpec;
use cudarc::driver::LaunchConfig;

/// Most blocks of a grid-stride launch.
const MAX_BLOCKS: usize = 65535 * 8;
/// 16-byte packs a thread of cross_entropy_staged holds (LS_CE_PACKS in train.cu).
const CE_PACKS: usize = 8;
/// Warps per block of the column reductions (kernels allow up to 32).
const COL_WARPS: u32 = 16;

/// One block per row (grid-stride past `MAX_BLOCKS`), threads a multiple of 32 up to `max`.
fn rows_grid(rows: usize, cols: usize, max: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (
            (cols.div_ceil(32) * 32).clamp(32, max as usize) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

/// Launch shape of a row-wise kernel and its `per_warp` flag: a warp per row for rows of
/// at most 1024 elements (8 rows per block), else a block per row.
fn team_grid(rows: usize, cols: usize, max: u32) -> (LaunchConfig, i32) {
    if cols <= 1024 {
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8).clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        (cfg, 1)
    } else {
        (rows_grid(rows, cols, max), 0)
    }
}

/// 16-byte packs a lane of the register-cached row kernels holds at most (LS_RP in train.cu).
const ROW_PACKS: usize = 4;

/// 16-byte packs a lane of `layer_norm_backward_rows` holds (LS_LNB_RP in train.cu): rows
/// of up to 128 packs take teams of up to two warps.
const LNB_PACKS: usize = 2;

/// Shared bytes a warp of `layer_norm_backward_rows` stages its rows in
/// (LS_LNB_WARP_BYTES(LS_LNB_RP) in train.cu: 3 stages of x's and dy's packs for 32 lanes).
const LNB_WARP_BYTES: u32 = 3 * 2 * LNB_PACKS as u32 * 32 * 16;

/// The launch of a row-wise kernel: `rows_name`, its register-cached variant (a team of
/// `ts` lanes per row), when [`row_team`] allows, else `name` with `per_warp` rows per warp
/// from [`team_grid`]. The i32 is the kernel's last argument either way.
fn row_kernel(
    rows: usize,
    cols: usize,
    dt: DType,
    ptrs: &[u64],
    (rows_name, name): (&'static str, &'static str),
) -> (LaunchConfig, i32, &'static str) {
    match row_team(rows, cols, dt, ptrs) {
        Some((cfg, ts)) => (cfg, ts, rows_name),
        None => {
            let (cfg, per_warp) = team_grid(rows, cols, 512);
            (cfg, per_warp, name)
        }
    }
}

/// Launch shape and team size of the register-cached row kernels (`*_rows` in train.cu)
/// for rows of `cols` elements of `dt`: None unless rows are whole 16-byte packs, at most
/// 32 * ROW_PACKS of them, and every pointer (0 for an absent one) is 16-byte aligned.
fn row_team(rows: usize, cols: usize, dt: DType, ptrs: &[u64]) -> Option<(LaunchConfig, i32)> {
    let n = 16 / dt.size();
    if cols == 0 || !cols.is_multiple_of(n) || ptrs.iter().any(|p| !p.is_multiple_of(16)) {
        return None;
    }
    let ts = (cols / n).div_ceil(ROW_PACKS).next_power_of_two();
    if ts > 32 {
        return None;
    }
    let cfg = LaunchConfig {
        grid_dim: ((rows * ts).div_ceil(256).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    Some((cfg, ts as i32))
}

/// Blocks for a column reduction: 32 columns per block column, and enough chunks of rows
/// (block rows, each of at least `4 * COL_WARPS` rows) to give the GPU ~1024 blocks.
fn cols_grid(rows: usize, cols: usize) -> LaunchConfig {
    cols_grid_per(rows, cols, 32)
}

/// [`cols_grid`] with `per_block` columns per block column.
fn cols_grid_per(rows: usize, cols: usize, per_block: usize) -> LaunchConfig {
    let col_blocks = cols.div_ceil(per_block).max(1);
    let chunks = 1024usize
        .div_ceil(col_blocks)
        .min(rows.div_ceil(4 * COL_WARPS as usize))
        .clamp(1, 65535);
    LaunchConfig {
        grid_dim: (col_blocks as u32, chunks as u32, 1),
        block_dim: (32 * COL_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Sums `chunks` rows of partial column sums [chunks, cols] at device address `partial`
/// into `out` [cols]: written, or with `accumulate` added to what `out` holds.
fn sum_chunks_at(
    partial: u64,
    out: &CudaStorage,
    chunks: usize,
    cols: usize,
    accumulate: bool,
) -> Result<()> {
    sum_chunks_split(partial, (out, out, out), cols, chunks, cols, accumulate)
}

/// [`sum_chunks_at`] with the columns from `split` on going to `out2` (at column - split),
/// and those from 2 split on to `out3` (at column - 2 split).
fn sum_chunks_split(
    partial: u64,
    (out, out2, out3): (&CudaStorage, &CudaStorage, &CudaStorage),
    split: usize,
    chunks: usize,
    cols: usize,
    accumulate: bool,
) -> Result<()> {
    let dev = out.device();
    let f = dev.kernel("sum_chunks", DType::F32)?;
    let (pp, op, op2, op3) = (partial, out.ptr(), out2.ptr(), out3.ptr());
    let (sp, c, n) = (split as i64, chunks as i32, cols as i64);
    let acc = accumulate as i32;
    let mut l = dev.launch(&f);
    l.arg(&pp)
        .arg(&op)
        .arg(&op2)
        .arg(&op3)
        .arg(&sp)
        .arg(&c)
        .arg(&n)
        .arg(&acc);
    // 32 columns per block, a warp per run of chunks (up to 32 warps).
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(32).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (32 * chunks.clamp(1, 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel's signature in train.cu; `out` covers the
    // columns below `split`, `out2` the next `split` and `out3` the rest.
    launched("sum_chunks", unsafe { l.launch(cfg) })
}

/// Batched `C = op(A) op(B)` (see `BlasLt::matmul_general`), C in the inputs' dtype or,
/// with `f32_out`, in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    a: &CudaStorage,
    ta: bool,
    b: &CudaStorage,
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    f32_out: bool,
) -> Result<CudaStorage> {
    let st = GemmStrides::packed(ta, tb, m, n, k);
    gemm_into_new(a, ta, b, tb, batch, m, n, k, f32_out, &st, batch * m * n)
}

/// The batched GEMM of [`matmul`] at the strides `st`, into a new buffer of `out_len`
/// elements (of a's dtype) that the C matrices cover.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_strided(
    a: &CudaStorage,
    ta: bool,
    b: &CudaStorage,
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    st: &GemmStrides,
    out_len: usize,
) -> Result<CudaStorage> {
    gemm_into_new(a, ta, b, tb, batch, m, n, k, false, st, out_len)
}

/// `C = op(A) op(B)` into a new buffer of `out_len` elements (f32 with `f32_out`, else a's
/// dtype); zeros when k is 0.
#[allow(clippy::too_many_arguments)]
fn gemm_into_new(
    a: &CudaStorage,
    ta: bool,
    b: &CudaStorage,
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    f32_out: bool,
    st: &GemmStrides,
    out_len: usize,
) -> Result<CudaStorage> {
    let dev = a.device();
    let dt = if f32_out { DType::F32 } else { a.dtype() };
    if batch * m * n == 0 {
        return dev.alloc(dt, out_len);
    }
    if k == 0 {
        return dev.zeros(dt, out_len);
    }
    let c = dev.alloc(dt, out_len)?;
    dev.lt.matmul_general(
        dev.stream(),
        a.dtype(),
        f32_out,
        0.0,
        ta,
        tb,
        batch,
        m,
        n,
        k,
        a.ptr(),
        b.ptr(),
        Epilogue::None,
        (c.ptr(), c.ptr()),
        st,
    )?;
    Ok(c)
}

/// `[0, n)` as the parts a GEMM dimension is cut into: a multiple of 16 bytes of elements and
/// the rest. cuBLASLt runs a dimension such as a 30522-token vocabulary with sm80 fallback
/// kernels at a fraction of the rate; cut, the large part gets the Hopper kernels and the
/// rest (under 8 columns) costs a few microseconds.
fn aligned_parts(n: usize, dt: DType) -> Vec<(usize, usize)> {
    let unit = 16 / dt.size();
    let main = n - n % unit;
    if main == 0 || main == n {
        vec![(0, n)]
    } else {
        vec![(0, main), (main, n - main)]
    }
}

/// `y [m, ld] = x [m, k] @ w [n, k]^T (+ b)` in the first `n` columns of each row; the
/// columns past `n` are left unwritten.
pub(crate) fn linear_ld(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    m: usize,
    n: usize,
    k: usize,
    ld: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    if k == 0 {
        return dev.zeros(x.dtype(), m * ld);
    }
    let y = dev.alloc(x.dtype(), m * ld)?;
    linear_parts(x, w, b, None, &y, (m, n, k), ld)?;
    Ok(y)
}

/// `y [m, n] = x [m, k] @ w [n, k]^T (+ b) + r [m, n]`: the residual `r` is the GEMM's C
/// (beta = 1), read in its epilogue, so the sum costs no pass of its own; `y` is a new
/// buffer. `k` must be non-zero.
pub(crate) fn linear_add(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    r: &CudaStorage,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CudaStorage> {
    let op = super::linear_own::Linear {
        x,
        w,
        b,
        r: Some(r),
        act: Activation::None,
        m,
        n,
        k,
    };
    if let Some(y) = super::linear_own::linear_own(&op)? {
        return Ok(y);
    }
    let y = x.device().alloc(x.dtype(), m * n)?;
    linear_parts(x, w, b, Some(r), &y, (m, n, k), n)?;
    Ok(y)
}

/// The GEMMs of `y [m, ld] = x @ w^T (+ b) (+ r)` over the output's aligned column parts
/// (y's and r's rows `ld` apart); nothing when m or n is 0. `k` must be non-zero.
fn linear_parts(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    r: Option<&CudaStorage>,
    y: &CudaStorage,
    (m, n, k): (usize, usize, usize),
    ld: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dev = x.device();
    let es = x.dtype().size() as u64;
    let beta = if r.is_some() { 1.0 } else { 0.0 };
    for (s, len) in aligned_parts(n, x.dtype()) {
        let off = s as u64 * es;
        let out = y.ptr() + off;
        dev.lt.matmul_general(
            dev.stream(),
            x.dtype(),
            false,
            beta,
            false,
            true,
            1,
            m,
            len,
            k,
            x.ptr(),
            w.ptr() + off * k as u64,
            Epilogue::with(b.map(|b| b.ptr() + off), false),
            (r.map_or(out, |r| r.ptr() + off), out),
            &GemmStrides {
                ldc: ld,
                ..GemmStrides::packed(false, true, m, len, k)
            },
        )?;
    }
    Ok(())
}

/// `acc [n, k] (f32) += dy [rows, n]^T @ x [rows, k]` (dy's rows `dy_ld` apart, from its
/// column `dy_col` on), the GEMM writing into `acc`, or `acc = ...` with `overwrite` (acc's
/// values are then not read; acc may then be in dy's dtype); with `bias_acc`, also
/// `bias_acc [n] (f32) += column sums of dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_into(
    (acc, overwrite): (&CudaStorage, bool),
    bias_acc: Option<&CudaStorage>,
    (dy, dy_col): (&CudaStorage, usize),
    x: &CudaStorage,
    rows: usize,
    n: usize,
    k: usize,
    dy_ld: usize,
) -> Result<()> {
    acc.mark_written();
    bias_acc.inspect(|b| b.mark_written());
    if n == 0 || k == 0 {
        return Ok(());
    }
    let dev = dy.device();
    // acc is f32, or (overwritten) in dy's dtype: the GEMM's output type.
    let acc_f32 = acc.dtype() == DType::F32;
    let acc_es = acc.dtype().size() as u64;
    if rows == 0 {
        if overwrite {
            // SAFETY: acc holds n * k elements (the caller checks); ordered on the stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    acc.ptr(),
                    0,
                    n * k * acc_es as usize,
                    dev.stream().cu_stream(),
                )
            }
            .map_err(|e| cuda_err("memset", e))?;
        }
        return Ok(());
    }
    let es = dy.dtype().size() as u64;
    let dy_base = dy.ptr() + dy_col as u64 * es;
    let beta = if overwrite { 0.0 } else { 1.0 };
    for (s, len) in aligned_parts(n, dy.dtype()) {
        let s64 = s as u64;
        dev.lt.matmul_general(
            dev.stream(),
            dy.dtype(),
            acc_f32,
            beta,
            true,
            false,
            1,
            len,
            k,
            rows,
            dy_base + s64 * es,
            x.ptr(),
            Epilogue::None,
            (
                acc.ptr() + s64 * k as u64 * acc_es,
                acc.ptr() + s64 * k as u64 * acc_es,
            ),
            &GemmStrides {
                lda: dy_ld,
                ..GemmStrides::packed(true, false, len, k, rows)
            },
        )?;
    }
    match bias_acc {
        // cuBLASLt's bias-gradient epilogue runs as a separate reduction kernel after the
        // GEMM (and forces split-K reductions); this one reads dy at the copy rate and adds
        // into the accumulator directly.
        Some(b) => column_sum_into(b, (dy, dy_col), rows, n, dy_ld),
        None => Ok(()),
    }
}

/// `acc [rows, k] += dy [rows, n] @ w [n, k]`, the GEMM accumulating into `acc` (all of
/// dy's dtype).
pub(crate) fn input_grad_into(
    acc: &CudaStorage,
    dy: &CudaStorage,
    w: &CudaStorage,
    rows: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    acc.mark_written();
    input_grad_ld(acc, 1.0, dy, n, w, rows, n, k)
}

/// `acc [rows, k] = dy [rows, n] @ w [n, k] + beta * acc` with dy's rows `dy_ld` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn input_grad_ld(
    acc: &CudaStorage,
    beta: f32,
    dy: &CudaStorage,
    dy_ld: usize,
    w: &CudaStorage,
    rows: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    if rows == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let dev = dy.device();
    let es = dy.dtype().size() as u64;
    // The reduction dimension in aligned parts, the later ones accumulating (in dy's dtype:
    // the output is rounded once per part).
    for (i, (s, len)) in aligned_parts(n, dy.dtype()).into_iter().enumerate() {
        let s64 = s as u64;
        dev.lt.matmul_general(
            dev.stream(),
            dy.dtype(),
            false,
            if i == 0 { beta } else { 1.0 },
            false,
            false,
            1,
            rows,
            k,
            len,
            dy.ptr() + s64 * es,
            w.ptr() + s64 * k as u64 * es,
            Epilogue::None,
            (acc.ptr(), acc.ptr()),
            &GemmStrides {
                lda: dy_ld,
                ..GemmStrides::packed(false, false, rows, k, len)
            },
        )?;
    }
    Ok(())
}

/// [batch, rows, width] -> [batch, heads, rows, d] from columns `col + h d ..`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gather_heads(
    x: &CudaStorage,
    batch: usize,
    rows: usize,
    width: usize,
    col: usize,
    heads: usize,
    d: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let total = batch * heads * rows * d;
    let out = dev.alloc(x.dtype(), total)?;
    if total == 0 {
        return Ok(out);
    }
    let f = dev.kernel("gather_heads", x.dtype())?;
    let (xp, yp) = (x.ptr(), out.ptr());
    let [b, r, w, c, h, dd] = [batch, rows, width, col, heads, d].map(|v| v as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&yp)
        .arg(&b)
        .arg(&r)
        .arg(&w)
        .arg(&c)
        .arg(&h)
        .arg(&dd);
    // SAFETY: argument types match the kernel's signature in train.cu.
    // A thread per 16-byte pack (as the kernel moves them when aligned).
    let n = 16 / x.dtype().size();
    launched("gather_heads", unsafe {
        l.launch(grid_1d(total.div_ceil(n), 256))
    })?;
    Ok(out)
}

pub(crate) fn transpose_12(
    x: &CudaStorage,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
) -> Result<CudaStorage> {
    if x.dtype() == DType::I32 {
        return Err(Error::op("transpose_12", "expected a float tensor"));
    }
    let dev = x.device();
    let out = dev.alloc(x.dtype(), x.len())?;
    if x.len() == 0 {
        return Ok(out);
    }
    let f = dev.kernel("transpose_12", x.dtype())?;
    let (xp, yp) = (x.ptr(), out.ptr());
    let rows = a * b * c;
    let [a, b, c, d] = [a, b, c, d].map(|v| v as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&yp).arg(&a).arg(&b).arg(&c).arg(&d);
    // A thread per 16-byte pack when rows are whole aligned packs, else a warp per row.
    let n = 16 / x.dtype().size();
    let packed = (d as usize).is_multiple_of(n) && xp.is_multiple_of(16) && yp.is_multiple_of(16);
    let threads = if packed {
        rows * d as usize / n
    } else {
        rows * 32
    };
    // SAFETY: argument types match the kernel's signature in train.cu.
    launched("transpose_12", unsafe { l.launch(grid_1d(threads, 256)) })?;
    Ok(out)
}

pub(crate) fn masked_softmax(
    s: &CudaStorage,
    key_lens: Option<&CudaStorage>,
    heads: usize,
    lq: usize,
    lk: usize,
    scale: f32,
    causal: bool,
) -> Result<CudaStorage> {
    let kp = key_lens.map_or(0, |k| k.ptr());
    masked_softmax_at(s, kp, heads, lq, lk, scale, causal)
}

/// [`masked_softmax`] with the key lengths at device address `kp` (i32 per sequence; 0 for
/// none), which may point into a larger buffer.
pub(crate) fn masked_softmax_at(
    s: &CudaStorage,
    kp: u64,
    heads: usize,
    lq: usize,
    lk: usize,
    scale: f32,
    causal: bool,
) -> Result<CudaStorage> {
    let dev = s.device();
    let out = dev.alloc(s.dtype(), s.len())?;
    if s.len() == 0 {
        return Ok(out);
    }
    let rows = s.len() / lk;
    let (sp, op) = (s.ptr(), out.ptr());
    let (r, h, q, kk, c) = (
        rows as i64,
        heads as i32,
        lq as i32,
        lk as i32,
        causal as i32,
    );
    let (cfg, team, name) = row_kernel(
        rows,
        lk,
        s.dtype(),
        &[sp, op],
        ("masked_softmax_rows", "masked_softmax"),
    );
    let f = dev.kernel(name, s.dtype())?;
    let mut l = dev.launch(&f);
    l.arg(&sp)
        .arg(&kp)
        .arg(&op)
        .arg(&r)
        .arg(&h)
        .arg(&q)
        .arg(&kk)
        .arg(&scale)
        .arg(&c)
        .arg(&team);
    // SAFETY: argument types match the kernel's signature in train.cu (the last argument
    // is `per_warp` or `ts`).
    launched(name, unsafe { l.launch(cfg) })?;
    Ok(out)
}

pub(crate) fn softmax_backward(
    p: &CudaStorage,
    dp: &CudaStorage,
    rows: usize,
    cols: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = p.device();
    let out = dev.alloc(p.dtype(), p.len())?;
    if rows * cols == 0 {
        return Ok(out);
    }
    let (pp, dpp, op, r, c) = (p.ptr(), dp.ptr(), out.ptr(), rows as i64, cols as i32);
    let (cfg, team, name) = row_kernel(
        rows,
        cols,
        p.dtype(),
        &[pp, dpp, op],
        ("softmax_backward_rows", "softmax_backward"),
    );
    let f = dev.kernel(name, p.dtype())?;
    let mut l = dev.launch(&f);
    l.arg(&pp)
        .arg(&dpp)
        .arg(&op)
        .arg(&r)
        .arg(&c)
        .arg(&scale)
        .arg(&team);
    // SAFETY: argument types match the kernel's signature in train.cu (the last argument
    // is `per_warp` or `ts`).
    launched(name, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// What [`add_layer_norm`] returns: `s = x + y` (only with `y`), `LN(s)`, and with
/// `want_stats` where the register-cached kernel runs, each row's (mean, rstd) as f32
/// [rows, 2] for [`layer_norm_backward`].
pub(crate) type AddLnOut = (Option<CudaStorage>, CudaStorage, Option<CudaStorage>);

/// `s = x + y` (when `y` and `keep_sum`) and `LN(s)` over rows of `h`; see [`AddLnOut`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_layer_norm(
    x: &CudaStorage,
    y: Option<&CudaStorage>,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    rows: usize,
    h: usize,
    eps: f32,
    (keep_sum, want_stats): (bool, bool),
) -> Result<AddLnOut> {
    let dev = x.device();
    let dt = x.dtype();
    let out = dev.alloc(dt, rows * h)?;
    let s = y
        .filter(|_| keep_sum)
        .map(|_| dev.alloc(dt, rows * h))
        .transpose()?;
    if rows * h == 0 {
        return Ok((s, out, None));
    }
    let (xp, yp, gp, bp) = (x.ptr(), y.map_or(0, |y| y.ptr()), gamma.ptr(), beta.ptr());
    let (sp, op, r, hh) = (
        s.as_ref().map_or(0, |s| s.ptr()),
        out.ptr(),
        rows as i64,
        h as i32,
    );
    let (cfg, team, name) = row_kernel(
        rows,
        h,
        dt,
        &[xp, yp, gp, bp, sp, op],
        ("add_layer_norm_rows", "add_layer_norm"),
    );
    let f = dev.kernel(name, dt)?;
    // Only the register-cached kernel writes statistics.
    let rows_kernel = name == "add_layer_norm_rows";
    let stats = if want_stats && rows_kernel {
        Some(dev.alloc(DType::F32, 2 * rows)?)
    } else {
        None
    };
    let stp = stats.as_ref().map_or(0, |s| s.ptr());
    // gamma and beta before the wait where no kernel can be writing them (not while an
    // optimizer updates them).
    let early = i32::from(super::read_early(&[Some(gamma), Some(beta)]));
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&yp).arg(&gp).arg(&bp).arg(&sp).arg(&op);
    if rows_kernel {
        l.arg(&stp);
    }
    l.arg(&r).arg(&hh).arg(&eps).arg(&team);
    if rows_kernel {
        l.arg(&early);
    }
    // SAFETY: argument types match the kernel's signature in train.cu (the register-cached
    // kernel takes the statistics pointer, null or [rows] float2, and after `ts` whether it
    // may read gamma and beta early; the other's last argument is `per_warp`).
    launched(name, unsafe { l.launch(cfg) })?;
    Ok((s, out, stats))
}

/// The backward of layer norm over rows of `h`: returns dx; writes dgamma and dbeta (f32
/// [h]) into `dgamma` and `dbeta`, or with `accumulate` adds them there; with `dsum`, the
/// column sums of dx (as stored) go there the same way. `stats`, the forward's (mean,
/// rstd) per row from [`add_layer_norm`] of this `x`, spares the register-cached kernel
/// computing them again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward(
    x: &CudaStorage,
    gamma: &CudaStorage,
    dy: &CudaStorage,
    stats: Option<&CudaStorage>,
    rows: usize,
    h: usize,
    eps: f32,
    (dgamma, dbeta, dsum): (&CudaStorage, &CudaStorage, Option<&CudaStorage>),
    accumulate: bool,
) -> Result<CudaStorage> {
    let dev = x.device();
    let dt = x.dtype();
    let dx = dev.alloc(dt, rows * h)?;
    if rows * h == 0 {
        if h > 0 {
            // No rows: sums of zero chunks (zeros, or the accumulators unchanged).
            for out in [Some(dgamma), Some(dbeta), dsum].into_iter().flatten() {
                sum_chunks_at(0, out, 0, h, accumulate)?;
            }
        }
        return Ok(dx);
    }
    let (xp, gp, dyp, dxp) = (x.ptr(), gamma.ptr(), dy.ptr(), dx.ptr());
    let (r, hh) = (rows as i64, h as i32);
    if let Some((mut cfg, _)) = row_team(rows, h, dt, &[xp, gp, dyp, dxp]) {
        // One pass: dx, and per block the partial parameter sums (and dx's column sums
        // with `dsum`). Its lanes keep running sums over the rows they take, so the grid is
        // one full wave (more blocks would only add partial rows for sum_chunks to add).
        // The running sums take most of the registers: two packs a lane (a team of up to
        // two warps a row) keep them at ~120 at 16-bit rows of 1024, so an SM holds 16
        // warps (four packs a lane took ~200 registers and held 8, ~15% slower on an
        // H200). Blocks of 16 warps (one an SM at those registers) leave sum_chunks few
        // partial rows.
        // Each warp stages its rows in LNB_WARP_BYTES of shared memory.
        let ts = (h / (16 / dt.size()))
            .div_ceil(LNB_PACKS)
            .next_power_of_two() as i32;
        let name = match dsum {
            Some(_) => "layer_norm_backward_rows_dsum",
            None => "layer_norm_backward_rows",
        };
        let f = dev.kernel(name, dt)?;
        cfg.block_dim.0 = 512;
        cfg.shared_mem_bytes = (cfg.block_dim.0 / 32) * LNB_WARP_BYTES;
        allow_smem(&f, cfg.shared_mem_bytes as usize)?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(
                cfg.block_dim.0,
                cfg.shared_mem_bytes as usize,
                None,
            )
            .map_err(|e| cuda_err("occupancy", e))?
            .max(1) as usize;
        let blocks = (rows * ts as usize)
            .div_ceil(cfg.block_dim.0 as usize)
            .min(per_sm * dev.sm_count());
        cfg.grid_dim.0 = blocks as u32;
        let sums = if dsum.is_some() { 3 } else { 2 };
        let partial = dev.alloc(DType::F32, blocks * sums * h)?;
        let pp = partial.ptr();
        let stp = stats.map_or(0, |s| s.ptr());
        let mut l = dev.launch(&f);
        l.arg(&xp)
            .arg(&gp)
            .arg(&dyp)
            .arg(&stp)
            .arg(&dxp)
            .arg(&pp)
            .arg(&r)
            .arg(&hh)
            .arg(&eps)
            .arg(&ts);
        // SAFETY: argument types match the kernel's signature in train.cu; `stats` is null
        // or 2 rows f32 (the caller checks); `partial` holds a row of `sums` h f32 per block
        // of the grid, and the block's dynamic shared memory is the LNB_WARP_BYTES per warp
        // the kernel stages in; ts is at most 64 (row_team allows at most 128 packs) and
        // the block 16 warps.
        launched(name, unsafe { l.launch(cfg) })?;
        let outs = (dgamma, dbeta, dsum.unwrap_or(dbeta));
        sum_chunks_split(pp, outs, h, blocks, sums * h, accumulate)?;
        return Ok(dx);
    }
    // Per-row mean and rstd, shared by the dx pass and the parameter pass.
    let stats = dev.alloc(DType::F32, 2 * rows)?;
    let sp = stats.ptr();
    let (cfg_rows, per_warp) = team_grid(rows, h, 512);
    let f = dev.kernel("layer_norm_backward", dt)?;
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&gp)
        .arg(&dyp)
        .arg(&dxp)
        .arg(&sp)
        .arg(&r)
        .arg(&hh)
        .arg(&eps)
        .arg(&per_warp);
    // SAFETY: argument types match the kernel's signature in train.cu.
    launched("layer_norm_backward", unsafe { l.launch(cfg_rows) })?;
    // The parameter pass: 16-byte loads (8 warps a block) when rows are whole aligned packs;
    // `sum_chunks` adds its partials into the outputs. (A last-block tail as in
    // `column_sums`, over two outputs and this grid's many row chunks, measured slower on
    // an H200 than the two small passes.)
    let n = 16 / dt.size();
    let packed = h.is_multiple_of(n) && xp.is_multiple_of(16) && dyp.is_multiple_of(16);
    let (cfg, name) = if packed {
        let mut cfg = cols_grid_per(rows, h, 32 * n);
        cfg.block_dim.0 = 256;
        (cfg, "layer_norm_params_packed")
    } else {
        (cols_grid(rows, h), "layer_norm_params")
    };
    let chunks = cfg.grid_dim.1 as usize;
    let partial = dev.alloc(DType::F32, 2 * chunks * h)?;
    let (pg, pb) = (partial.ptr(), partial.ptr() + (chunks * h * 4) as u64);
    let f = dev.kernel(name, dt)?;
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&dyp)
        .arg(&sp)
        .arg(&pg)
        .arg(&pb)
        .arg(&r)
        .arg(&hh);
    // SAFETY: argument types match the kernel's signature in train.cu.
    launched(name, unsafe { l.launch(cfg) })?;
    sum_chunks_at(pg, dgamma, chunks, h, accumulate)?;
    sum_chunks_at(pb, dbeta, chunks, h, accumulate)?;
    if let Some(out) = dsum {
        column_sums(&Outs::one(out), accumulate, (&dx, 0), rows, h, h)?;
    }
    Ok(dx)
}

fn unary(
    name: &str,
    x: &CudaStorage,
    dy: Option<&CudaStorage>,
    act: Activation,
) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), x.len())?;
    if x.len() == 0 {
        return Ok(out);
    }
    let f = dev.kernel(name, x.dtype())?;
    let (xp, dyp, op) = (x.ptr(), dy.map_or(0, |d| d.ptr()), out.ptr());
    let (code, total) = (act.code(), x.len() as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp);
    if dy.is_some() {
        l.arg(&dyp);
    }
    l.arg(&op).arg(&code).arg(&total);
    // SAFETY: argument types match the kernels' signatures in train.cu.
    launched(name, unsafe { l.launch(grid_1d(x.len().div_ceil(4), 256)) })?;
    Ok(out)
}

pub(crate) fn activate(x: &CudaStorage, act: Activation) -> Result<CudaStorage> {
    unary("activate", x, None, act)
}

pub(crate) fn activation_backward(
    pre: &CudaStorage,
    dy: &CudaStorage,
    act: Activation,
) -> Result<CudaStorage> {
    unary("activation_backward", pre, Some(dy), act)
}

/// The launch of a single-launch column reduction (train.cu's column_sum_packed_impl) over
/// [rows, cols] in packs of `n`: grid, partial sums, their row pitch, arrival counters.
struct PackedColumns {
    cfg: LaunchConfig,
    partial: CudaStorage,
    pld: usize,
    counters: u64,
}

impl PackedColumns {
    /// None when the grid would have more block columns than there are counters. The grid
    /// aims at `blocks_per_sm` blocks per multiprocessor.
    fn new(
        dev: &std::sync::Arc<super::CudaDevice>,
        rows: usize,
        cols: usize,
        n: usize,
        blocks_per_sm: usize,
    ) -> Result<Option<Self>> {
        let mut cfg = cols_grid_per(rows, cols, 32 * n);
        let col_blocks = cfg.grid_dim.0 as usize;
        if col_blocks > super::COLUMN_COUNTERS {
            return Ok(None);
        }
        // Fewer, longer row chunks than the other column reductions: the kernel keeps four
        // rows in flight per warp, and the last block's pass over the partials shrinks.
        let chunks = (blocks_per_sm * dev.sm_count())
            .div_ceil(col_blocks)
            .min(rows.div_ceil(8 * COL_WARPS as usize))
            .clamp(1, 65535);
        cfg.grid_dim.1 = chunks as u32;
        let pld = cols.next_multiple_of(n);
        Ok(Some(PackedColumns {
            cfg,
            partial: dev.alloc(DType::F32, chunks * pld)?,
            pld,
            counters: dev.column_counters()?,
        }))
    }

    /// Launches `name` (train.cu's column_sum_packed_impl) over x [rows, cols] (rows `ld`
    /// apart) into `outs` (see [`Outs`]); `act`: the activation-backward form's dy, dx and
    /// activation code.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        name: &'static str,
        (x, xp): (&CudaStorage, u64),
        act: Option<(u64, u64, i32)>,
        outs: &Outs,
        (rows, cols, ld): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let dev = x.device();
        let f = dev.kernel(name, x.dtype())?;
        let pp = self.partial.ptr();
        let (op, op2, op3) = (
            outs.parts[0].ptr(),
            outs.parts[1].ptr(),
            outs.parts[2].ptr(),
        );
        let split = outs.split as i64;
        let (dyp, dxp, code) = act.unwrap_or_default();
        let (r, c, ld, pld, acc) = (
            rows as i64,
            cols as i32,
            ld as i64,
            self.pld as i64,
            accumulate as i32,
        );
        let mut l = dev.launch(&f);
        l.arg(&xp);
        if act.is_some() {
            l.arg(&dyp).arg(&dxp).arg(&code);
        }
        l.arg(&pp)
            .arg(&op)
            .arg(&op2)
            .arg(&op3)
            .arg(&split)
            .arg(&r)
            .arg(&c)
            .arg(&ld)
            .arg(&pld)
            .arg(&acc)
            .arg(&self.counters);
        // SAFETY: argument types match the kernels' signatures in train.cu; the callers
        // size x (and dy, dx) for rows of `ld`, `partial` holds grid rows of `pld` f32, the
        // counters cover the grid's block columns, and `outs` the columns (Outs::new).
        launched(name, unsafe { l.launch(self.cfg) })
    }
}

/// The f32 outputs of a column reduction: column c goes to part c / split at c % split
/// (train.cu's LsOuts); one part takes all the columns.
pub(crate) struct Outs<'a> {
    parts: [&'a CudaStorage; 3],
    split: usize,
}

impl<'a> Outs<'a> {
    /// One output of `cols` columns.
    pub(crate) fn one(out: &'a CudaStorage) -> Self {
        Outs {
            parts: [out; 3],
            split: usize::MAX >> 1,
        }
    }

    /// Up to three outputs of `split` columns each, for `parts.len() * split` columns.
    pub(crate) fn split(parts: &[&'a CudaStorage], split: usize) -> Result<Self> {
        let ok = (1..=3).contains(&parts.len())
            && parts
                .iter()
                .all(|p| p.dtype() == DType::F32 && p.len() >= split);
        if !ok {
            return Err(Error::op(
                "column sums",
                format!("{} outputs of {split} f32 columns", parts.len()),
            ));
        }
        let last = parts[parts.len() - 1];
        Ok(Outs {
            parts: [
                parts[0],
                *parts.get(1).unwrap_or(&last),
                *parts.get(2).unwrap_or(&last),
            ],
            split,
        })
    }
}

/// dx = dy * act'(pre) for pre, dy [rows, cols] (contiguous), with dx's column sums added
/// to the f32 `bias_acc` [cols] in the same pass (the bias gradient of the linear that
/// produced `pre`). None where the single-launch reduction does not apply (cols not a
/// multiple of 16 bytes, unaligned buffers); the caller then runs the two passes.
pub(crate) fn activation_backward_colsum(
    pre: &CudaStorage,
    dy: &CudaStorage,
    act: Activation,
    (rows, cols): (usize, usize),
    bias_acc: &CudaStorage,
) -> Result<Option<CudaStorage>> {
    let dev = pre.device();
    let n = 16 / pre.dtype().size();
    let aligned = pre.ptr().is_multiple_of(16) && dy.ptr().is_multiple_of(16);
    if rows * cols == 0 || !cols.is_multiple_of(n) || !aligned {
        return Ok(None);
    }
    // Four blocks per SM here, two for the plain sum: each measured best on an H200
    // (15000 x 4096 ReLU: 105 us against 149 us at two per SM).
    let Some(p) = PackedColumns::new(dev, rows, cols, n, 4)? else {
        return Ok(None);
    };
    // Device allocations are 256-byte aligned.
    let dx = dev.alloc(pre.dtype(), rows * cols)?;
    let act = Some((dy.ptr(), dx.ptr(), act.code()));
    p.launch(
        "activation_backward_colsum",
        (pre, pre.ptr()),
        act,
        &Outs::one(bias_acc),
        (rows, cols, cols),
        true,
    )?;
    Ok(Some(dx))
}

/// Column sums of `x` [rows, cols] (rows `ld` apart) written into, or with `accumulate`
/// added to, the f32 `outs`. With 16-byte loads (rows aligned, the last pack inside the
/// row's `ld`) one launch does it, its last block per column block adding the partials;
/// otherwise a partial pass and `sum_chunks`.
fn column_sums(
    outs: &Outs,
    accumulate: bool,
    (x, x_col): (&CudaStorage, usize),
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<()> {
    let dev = x.device();
    let n = 16 / x.dtype().size();
    let xp = x.ptr() + (x_col * x.dtype().size()) as u64;
    let packed =
        ld.is_multiple_of(n) && ld >= x_col + cols.next_multiple_of(n) && xp.is_multiple_of(16);
    if packed {
        // Two blocks per SM (H200, 15000 x 1024 f16: 14.5 us against 19 us at four).
        if let Some(p) = PackedColumns::new(dev, rows, cols, n, 2)? {
            return p.launch(
                "column_sum_packed",
                (x, xp),
                None,
                outs,
                (rows, cols, ld),
                accumulate,
            );
        }
    }
    let cfg = cols_grid(rows, cols);
    let chunks = cfg.grid_dim.1 as usize;
    let partial = dev.alloc(DType::F32, chunks * cols)?;
    let f = dev.kernel("column_sum", x.dtype())?;
    let (pp, r, c, ld) = (partial.ptr(), rows as i64, cols as i32, ld as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&pp).arg(&r).arg(&c).arg(&ld);
    // SAFETY: argument types match the kernel's signature in train.cu; `partial` holds
    // cfg.grid_dim.1 * cols f32.
    launched("column_sum", unsafe { l.launch(cfg) })?;
    let [o1, o2, o3] = outs.parts;
    let split = outs.split.min(cols);
    sum_chunks_split(partial.ptr(), (o1, o2, o3), split, chunks, cols, accumulate)
}

pub(crate) fn column_sum(x: &CudaStorage, rows: usize, cols: usize) -> Result<CudaStorage> {
    let dev = x.device();
    if rows * cols == 0 {
        return dev.zeros(DType::F32, cols);
    }
    let out = dev.alloc(DType::F32, cols)?;
    column_sums(&Outs::one(&out), false, (x, 0), rows, cols, cols)?;
    Ok(out)
}

/// `acc [cols] (f32) += column sums of x [rows, cols]` (rows `ld` apart, from its column
/// `x_col` on).
pub(crate) fn column_sum_into(
    acc: &CudaStorage,
    x: (&CudaStorage, usize),
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<()> {
    acc.mark_written();
    if rows * cols == 0 {
        return Ok(());
    }
    column_sums(&Outs::one(acc), true, x, rows, cols, ld)
}

/// `accs[i] [cols] (f32) += column sums of x [rows, accs.len() * cols]` over x's column
/// block i (up to three blocks, rows `ld` apart): several biases' gradients from one
/// packed gradient in one pass.
pub(crate) fn column_sum_parts_into(
    accs: &[&CudaStorage],
    x: &CudaStorage,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<()> {
    accs.iter().for_each(|a| a.mark_written());
    let outs = Outs::split(accs, cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    column_sums(&outs, true, (x, 0), rows, accs.len() * cols, ld)
}

pub(crate) fn embedding_backward(
    ids: &CudaStorage,
    dy: &CudaStorage,
    n: usize,
    h: usize,
    vocab: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let out = dy.device().zeros(DType::F32, vocab * h)?;
    embedding_backward_into(&out, ids, dy, n, h, vocab, scale)?;
    Ok(out)
}

/// `acc [vocab, h] (f32) += scale * dy[i]` at row `ids[i]` for each of the `n` rows of dy
/// (ids outside the vocabulary skipped).
pub(crate) fn embedding_backward_into(
    acc: &CudaStorage,
    ids: &CudaStorage,
    dy: &CudaStorage,
    n: usize,
    h: usize,
    vocab: usize,
    scale: f32,
) -> Result<()> {
    acc.mark_written();
    let dev = dy.device();
    if n * h == 0 || vocab == 0 {
        return Ok(());
    }
    let (ip, dp, op) = (ids.ptr(), dy.ptr(), acc.ptr());
    // A 16-byte pack of dy a thread where rows are whole aligned packs, else an element.
    let n_pack = 16 / dy.dtype().size();
    let packed = h.is_multiple_of(n_pack) && dp.is_multiple_of(16) && op.is_multiple_of(16);
    let (name, per) = match packed {
        true => ("embedding_backward_packed", n_pack),
        false => ("embedding_backward", 1),
    };
    let f = dev.kernel(name, dy.dtype())?;
    let (nn, hh, v) = (n as i64, h as i32, vocab.min(i32::MAX as usize) as i32);
    let mut l = dev.launch(&f);
    l.arg(&ip)
        .arg(&dp)
        .arg(&op)
        .arg(&nn)
        .arg(&hh)
        .arg(&v)
        .arg(&scale);
    // SAFETY: argument types match the kernels' signature in train.cu; the packed one's
    // alignment was checked above.
    launched(name, unsafe { l.launch(grid_1d(n * h / per, 256)) })
}

/// cross_entropy_staged and its launch for `n` rows `ld` apart, where it applies: rows of
/// whole aligned 16-byte packs, at most CE_PACKS a thread of a 1024-thread block, held in
/// registers (one read of the logits) and staged in shared memory (a row must fit a
/// block's). Threads: enough for the row at CE_PACKS packs each, so 512 threads take a 32k
/// f16 vocabulary, two blocks an SM; blocks: as many as fit at once, rows taken in turn.
fn staged_cross_entropy(
    dev: &std::sync::Arc<super::CudaDevice>,
    dt: DType,
    n: usize,
    ld: usize,
    (logits, d): (u64, u64),
) -> Result<Option<(cudarc::driver::CudaFunction, LaunchConfig)>> {
    let n_pack = 16 / dt.size();
    let packs = ld / n_pack;
    let smem = packs * 16;
    let applies = ld.is_multiple_of(n_pack)
        && logits.is_multiple_of(16)
        && d.is_multiple_of(16)
        && packs <= CE_PACKS * 1024
        && smem <= dev.smem_per_block();
    if !applies {
        return Ok(None);
    }
    let threads = packs
        .div_ceil(CE_PACKS)
        .next_multiple_of(32)
        .clamp(32, 1024);
    let f = dev.kernel("cross_entropy_staged", dt)?;
    allow_smem(&f, smem)?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None)
        .map_err(|e| cuda_err("cross-entropy occupancy", e))? as usize;
    if per_sm == 0 {
        return Ok(None);
    }
    // H200, 15008 x 32000 f16: 666 us against 895 us with a block per row and no staging.
    let cfg = LaunchConfig {
        grid_dim: (n.min(per_sm * dev.sm_count()).max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    Ok(Some((f, cfg)))
}

/// Label-smoothed cross entropy of `n` rows of `vocab` logits, rows `ld` apart: per-row
/// loss and nll, and the logits' gradient in the same layout (zero in the row padding).
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_entropy(
    logits: &CudaStorage,
    targets: &CudaStorage,
    n: usize,
    vocab: usize,
    ld: usize,
    eps: f32,
    grad_scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let dev = logits.device();
    let dt = logits.dtype();
    if n * vocab == 0 {
        return Ok((
            dev.zeros(DType::F32, n)?,
            dev.zeros(DType::F32, n)?,
            dev.zeros(dt, n * ld)?,
        ));
    }
    let loss = dev.alloc(DType::F32, n)?;
    let nll = dev.alloc(DType::F32, n)?;
    let d = dev.alloc(dt, n * ld)?;
    // The constants of cpu::cross_entropy, in f64 then rounded.
    let eps64 = eps as f64;
    let eps_i = if vocab > 1 {
        eps64 / (vocab as f64 - 1.0)
    } else {
        0.0
    };
    let c_nll = 1.0 - eps64 - eps_i;
    let a = c_nll + vocab as f64 * eps_i;
    let (c_nll, eps_i, a) = (c_nll as f32, eps_i as f32, a as f32);
    let (lp, tp, lossp, nllp, dp) = (logits.ptr(), targets.ptr(), loss.ptr(), nll.ptr(), d.ptr());
    // The staged kernel where it applies; otherwise the logits are read twice.
    let (f, cfg) = match staged_cross_entropy(dev, dt, n, ld, (lp, dp))? {
        Some(staged) => staged,
        None => (dev.kernel("cross_entropy", dt)?, rows_grid(n, vocab, 1024)),
    };
    let (r, v, ld) = (n as i64, vocab as i32, ld as i32);
    let mut l = dev.launch(&f);
    l.arg(&lp)
        .arg(&tp)
        .arg(&lossp)
        .arg(&nllp)
        .arg(&dp)
        .arg(&r)
        .arg(&v)
        .arg(&ld)
        .arg(&c_nll)
        .arg(&eps_i)
        .arg(&a)
        .arg(&grad_scale);
    // SAFETY: argument types match the kernels' signature in train.cu; the staged form's
    // alignment, row length and shared memory were checked by staged_cross_entropy.
    launched("cross_entropy", unsafe { l.launch(cfg) })?;
    Ok((loss, nll, d))
}

/// One Adam(W) step in place; `copy`, when given, receives the new values in its dtype.
pub(crate) fn adam_step(
    param: &CudaStorage,
    grad: &CudaStorage,
    m: &CudaStorage,
    v: &CudaStorage,
    copy: Option<&CudaStorage>,
    h: &AdamHyper,
) -> Result<()> {
    let slot = AdamBufs {
        param,
        grad,
        m,
        v,
        copy,
        step: h.step,
    };
    adam_step_many(std::slice::from_ref(&slot), h)
}

pub(crate) fn sum_squares(x: &CudaStorage) -> Result<f64> {
    sum_squares_many(&[x])
}

/// Elements per chunk of the multi-tensor launches (a block each).
const MULTI_CHUNK: usize = 1 << 16;

/// Uploads a chunk table (rows of u64 words, laid out as the kernel's struct).
pub(crate) fn upload_table(
    dev: &std::sync::Arc<super::CudaDevice>,
    words: &[u64],
) -> Result<cudarc::driver::CudaSlice<u64>> {
    dev.stream()
        .clone_htod(words)
        .map_err(|e| cuda_err("uploading a chunk table", e))
}

/// Sum of squares over several tensors with one launch and one download: a chunk table
/// over all of them (one dtype), each block writing one f64 partial, added here in order.
pub(crate) fn sum_squares_many(xs: &[&CudaStorage]) -> Result<f64> {
    let Some(first) = xs.iter().find(|x| x.len() > 0) else {
        return Ok(0.0);
    };
    let dev = first.device();
    // One launch per dtype present (gradients may be f32 or kept in the compute dtype),
    // all enqueued before the first of their partials is read back.
    let mut launches = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let group: Vec<&CudaStorage> = xs
            .iter()
            .copied()
            .filter(|x| x.len() > 0 && x.dtype() == dt)
            .collect();
        if !group.is_empty() {
            launches.push(sum_squares_launch(dev, &group, dt)?);
        }
    }
    let mut total = 0.0;
    for partial in &launches {
        let host = dev
            .stream()
            .clone_dtoh(partial)
            .map_err(|e| cuda_err("device to host copy", e))?;
        total += host.iter().sum::<f64>();
    }
    Ok(total)
}

/// Enqueues `sum_squares_multi` over `xs` (all of dtype `dt`, none empty); returns its
/// per-chunk partial sums.
fn sum_squares_launch(
    dev: &std::sync::Arc<super::CudaDevice>,
    xs: &[&CudaStorage],
    dt: DType,
) -> Result<cudarc::driver::CudaSlice<f64>> {
    // SquaresChunk in train.cu: { const void* x; long long n; }.
    let mut words = Vec::new();
    for x in xs {
        let (base, esize) = (x.ptr(), dt.size() as u64);
        for start in (0..x.len()).step_by(MULTI_CHUNK) {
            let n = MULTI_CHUNK.min(x.len() - start);
            words.extend([base + start as u64 * esize, n as u64]);
        }
    }
    let chunks = words.len() / 2;
    let table = upload_table(dev, &words)?;
    let st = dev.stream();
    let partial = st
        .alloc_zeros::<f64>(chunks)
        .map_err(|e| cuda_err("allocating sum_squares partials", e))?;
    let f = dev.kernel("sum_squares_multi", dt)?;
    let (tp, pp) = (
        super::launch::slice_ptr(&table, st),
        super::launch::slice_ptr(&partial, st),
    );
    let mut l = dev.launch(&f);
    l.arg(&tp).arg(&pp);
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the table rows are SquaresChunk's layout, pointing into live tensors of `dt`;
    // the kernel writes one partial per chunk into `partial`.
    launched("sum_squares_multi", unsafe { l.launch(cfg) })?;
    Ok(partial)
}

/// One parameter's buffers for [`adam_step_many`].
pub(crate) struct AdamBufs<'a> {
    pub param: &'a CudaStorage,
    pub grad: &'a CudaStorage,
    pub m: &'a CudaStorage,
    pub v: &'a CudaStorage,
    pub copy: Option<&'a CudaStorage>,
    /// This parameter's bias-correction step.
    pub step: u64,
}

/// [`adam_step`] over many parameters in one launch (a launch per parameter when the
/// copies' dtypes differ).
pub(crate) fn adam_step_many(slots: &[AdamBufs], h: &AdamHyper) -> Result<()> {
    for s in slots {
        s.param.mark_written();
        s.m.mark_written();
        s.v.mark_written();
        s.copy.inspect(|c| c.mark_written());
    }
    let Some(first) = slots.iter().find(|s| s.param.len() > 0) else {
        return Ok(());
    };
    let copy_dt = first.copy.map(|c| c.dtype());
    if slots
        .iter()
        .any(|s| s.param.len() > 0 && s.copy.map(|c| c.dtype()) != copy_dt)
    {
        for s in slots {
            adam_step_many(std::slice::from_ref(s), h)?;
        }
        return Ok(());
    }
    let dev = first.param.device();
    let csize = copy_dt.map_or(0, |d| d.size()) as u64;
    // AdamChunk in train.cu: five pointers, n, step_size and bc2_sqrt as f64, grad_t.
    let mut words = Vec::new();
    for s in slots.iter().filter(|s| s.param.len() > 0) {
        // A gradient kept in 16 bits is in the compute dtype, that of the copy.
        let gdt = s.grad.dtype();
        let grad_t = gdt != DType::F32;
        if grad_t && Some(gdt) != copy_dt {
            return Err(Error::op(
                "adam step",
                format!("a {gdt} gradient for a parameter whose copy is {copy_dt:?}"),
            ));
        }
        // Host-side constants exactly as cpu::adam_step computes them.
        let bc1 = 1.0 - h.beta1.powi(s.step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(s.step as i32)).sqrt();
        let step_size = (h.lr / bc1) as f32 as f64;
        let copy = s.copy.map_or(0, |c| c.ptr());
        for start in (0..s.param.len()).step_by(MULTI_CHUNK) {
            let n = MULTI_CHUNK.min(s.param.len() - start);
            let off = start as u64;
            words.extend([
                s.param.ptr() + 4 * off,
                s.grad.ptr() + gdt.size() as u64 * off,
                s.m.ptr() + 4 * off,
                s.v.ptr() + 4 * off,
            ]);
            words.push(if copy == 0 { 0 } else { copy + csize * off });
            words.extend([n as u64, step_size.to_bits(), bc2_sqrt.to_bits()]);
            words.push(grad_t as u64);
        }
    }
    let chunks = words.len() / 9;
    let table = upload_table(dev, &words)?;
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    let decay_mul = (1.0 - h.lr * h.weight_decay) as f32;
    let weight_decay = h.weight_decay as f32;
    let decoupled = h.decoupled as i32;
    let f = dev.kernel("adam_multi", copy_dt.unwrap_or(DType::F32))?;
    let tp = super::launch::slice_ptr(&table, dev.stream());
    let mut l = dev.launch(&f);
    l.arg(&tp)
        .arg(&h.grad_scale)
        .arg(&decoupled)
        .arg(&decay_mul)
        .arg(&weight_decay)
        .arg(&b1)
        .arg(&b2)
        .arg(&h.eps);
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the table rows are AdamChunk's layout, pointing into live f32 buffers of at
    // least `n` elements from each chunk's start (the copy, and a gradient with grad_t, of
    // the same size in the kernel's dtype).
    launched("adam_multi", unsafe { l.launch(cfg) })
}

pub(crate) fn dropout(x: &CudaStorage, p: f32, seed: u64, offset: u64) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), x.len())?;
    if x.len() == 0 {
        return Ok(out);
    }
    // As cpu::dropout: the kept scale in f32.
    let keep = 1.0 / (1.0 - p);
    let f = dev.kernel("dropout", x.dtype())?;
    let (xp, yp, total) = (x.ptr(), out.ptr(), x.len() as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&yp)
        .arg(&p)
        .arg(&keep)
        .arg(&seed)
        .arg(&offset)
        .arg(&total);
    // SAFETY: argument types match the kernel's signature in train.cu.
    launched("dropout", unsafe {
        l.launch(grid_1d(x.len().div_ceil(4), 256))
    })?;
    Ok(out)
}

pub(crate) fn add_scaled_into(acc: &CudaStorage, x: &CudaStorage, alpha: f32) -> Result<()> {
    acc.mark_written();
    if acc.len() == 0 {
        return Ok(());
    }
    // SAFETY: acc (f32) and x (of its dtype) hold acc.len() elements (the caller checks).
    unsafe {
        launch_add_scaled(
            acc.device(),
            acc.ptr(),
            (x.ptr(), x.dtype()),
            alpha,
            acc.len(),
        )
    }
}

/// Launches add_scaled_into: `acc[i] += alpha * x[i]` for `total` elements at device
/// addresses `acc` (f32) and `x` (of dtype `dt`).
///
/// # Safety
/// Both ranges hold `total` elements of their types in live allocations of `dev`.
unsafe fn launch_add_scaled(
    dev: &super::CudaDevice,
    acc: u64,
    (x, dt): (u64, DType),
    alpha: f32,
    total: usize,
) -> Result<()> {
    let f = dev.kernel("add_scaled_into", dt)?;
    let n = total as i64;
    let mut l = dev.launch(&f);
    l.arg(&acc).arg(&x).arg(&alpha).arg(&n);
    // SAFETY: argument types match the kernel's signature in train.cu; the caller vouches
    // for the ranges.
    launched("add_scaled_into", unsafe { l.launch(grid_1d(total, 256)) })
}

/// `acc = src[offset..]` (its first acc.len() elements), or `acc +=` them unless
/// `overwrite`; both f32, or when overwriting both of one dtype (the caller checks the
/// dtypes and lengths).
pub(crate) fn add_range_into(
    acc: &CudaStorage,
    src: &CudaStorage,
    offset: usize,
    overwrite: bool,
) -> Result<()> {
    acc.mark_written();
    if acc.len() == 0 {
        return Ok(());
    }
    let es = src.dtype().size();
    let (ap, sp) = (acc.ptr(), src.ptr() + (offset * es) as u64);
    if overwrite {
        // SAFETY: acc holds acc.len() elements of src's dtype and src at least offset +
        // acc.len() (checked by the caller).
        return unsafe { super::copy_device_bytes(acc.device(), ap, sp, acc.len() * es) };
    }
    // SAFETY: as above; src's range is f32.
    unsafe { launch_add_scaled(acc.device(), ap, (sp, DType::F32), 1.0, acc.len()) }
}

/// Dynamic shared memory a block may use after opting in: within what every sm_80+ GPU
/// offers (99 KiB on sm_86/sm_89, more on sm_80 and sm_90).
const SHORT_ATTENTION_SMEM: usize = 96 << 10;

/// Dynamic shared memory (forward, backward) of the fused short attention
/// (attention_train.cu) for these sizes, or None where it does not apply: f16/bf16 on
/// sm_80 or later, both lengths at most 64, head_dim a multiple of 16 up to 128, and at
/// most [`SHORT_ATTENTION_SMEM`] of shared memory. The dropout flags take shared memory only
/// with `dropout`.
pub(crate) fn short_attention_smem(
    dev: &super::CudaDevice,
    dt: DType,
    lq: usize,
    lk: usize,
    d: usize,
    dropout: bool,
) -> Option<(usize, usize)> {
    let fits = matches!(dt, DType::F16 | DType::BF16)
        && dev.arch() >= (8, 0)
        && (1..=64).contains(&lq)
        && (1..=64).contains(&lk)
        && (16..=128).contains(&d)
        && d.is_multiple_of(16);
    if !fits {
        return None;
    }
    // The kernels carve these regions in this order, each rounded to 128 bytes: q, k, v,
    // dropout flags (forward); q, k, v, dO, dropped probabilities, score gradients (or
    // those two over k and v), dropout flags (backward). Rows are padded by 8 elements.
    // The flags go last, so a launch without dropout may leave them out.
    let r = |bytes: usize| bytes.next_multiple_of(128);
    let (lqp, lkp) = (lq.next_multiple_of(16), lk.next_multiple_of(16));
    let (es, ld, lds) = (dt.size(), d + 8, lkp + 8);
    // Each warp's dropout flags: AT_FLAG_BYTES.
    let flags = if dropout {
        short_attention_threads(lq, lk) as usize / 32 * (16 * 64 + 16)
    } else {
        0
    };
    let fwd = r(es * lqp * ld) + 2 * r(es * lkp * ld) + flags;
    // The backward's dropped probabilities and score gradients go over k and v where both
    // fit there (the kernel decides the same way).
    let over_kv = r(es * lqp * lds) <= r(es * lkp * ld);
    let bwd = fwd + r(es * lqp * ld) + if over_kv { 0 } else { 2 * r(es * lqp * lds) };
    (fwd.max(bwd) <= SHORT_ATTENTION_SMEM).then_some((fwd, bwd))
}

/// Lets `f` use `bytes` of dynamic shared memory (past the default 48 KiB, less what the
/// kernel declares statically, needs opting in; the kernels here declare at most a few KiB).
pub(crate) fn allow_smem(f: &cudarc::driver::CudaFunction, bytes: usize) -> Result<()> {
    if bytes <= 40 << 10 {
        return Ok(());
    }
    use cudarc::driver::sys::CUfunction_attribute_enum as A;
    f.set_attribute(
        A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(|e| cuda_err("setting a kernel's shared memory", e))
}

/// The fused short-attention kernel for head_dim `d` and lengths `lq`, `lk`: the variants
/// for d <= 64 and for lengths up to 32 keep half the accumulators (and half the scores) of
/// those for d <= 128 and lengths up to 64.
fn short_attention_kernel(forward: bool, d: usize, lq: usize, lk: usize) -> &'static str {
    match (forward, d <= 64, lq.max(lk) <= 32) {
        (true, true, true) => "attn_short_fwd_d64_l32",
        (true, true, false) => "attn_short_fwd_d64_l64",
        (true, false, true) => "attn_short_fwd_d128_l32",
        (true, false, false) => "attn_short_fwd_d128_l64",
        (false, true, true) => "attn_short_bwd_d64_l32",
        (false, true, false) => "attn_short_bwd_d64_l64",
        (false, false, true) => "attn_short_bwd_d128_l32",
        (false, false, false) => "attn_short_bwd_d128_l64",
    }
}

/// Threads of a fused short-attention block: a warp per 16 rows of the longer side.
fn short_attention_threads(lq: usize, lk: usize) -> u32 {
    (32 * lq.max(lk).div_ceil(16)) as u32
}

/// A block per head for the fused short attention.
fn short_attention_cfg(heads: usize, lq: usize, lk: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (heads as u32, 1, 1),
        block_dim: (short_attention_threads(lq, lk), 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

fn drop_args(drop: Option<DropSpec>) -> (f32, f32, u64, u64) {
    match drop {
        // As cpu::dropout: the kept scale in f32.
        Some((p, seed, offset)) if p > 0.0 => (p, 1.0 / (1.0 - p), seed, offset),
        _ => (0.0, 1.0, 0, 0),
    }
}

/// q, k or v as the fused attention reads it: rows of `w` elements per (position,
/// sequence) in `s`, the heads starting at column `col` (w = heads * d and col = 0 for a
/// tensor of its own; wider rows when q, k and v are one projection's column blocks).
#[derive(Clone, Copy)]
pub(crate) struct HeadBlock<'a> {
    pub s: &'a CudaStorage,
    pub col: usize,
    pub w: usize,
}

impl HeadBlock<'_> {
    fn ptr(&self) -> u64 {
        self.s.ptr() + (self.col * self.s.dtype().size()) as u64
    }
}

/// How q, k and v are stored for the fused attention: tensors of their own, the column
/// blocks 0, h, 2h of one [len, b, 3h] tensor, or q alone and k, v the blocks 0, h of one
/// [lk, b, 2h] tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QkvLayout {
    Separate,
    Packed,
    PackedKv,
}

/// The fused attention's (dq, dk, dv), laid out as the inputs were (`QkvLayout`).
pub(crate) enum AttnGrads {
    Separate(CudaStorage, CudaStorage, CudaStorage),
    Packed(CudaStorage),
    PackedKv(CudaStorage, CudaStorage),
}

/// The fused backward's per-warp column sums of dq, dk and dv: `rows` rows of 3 heads d
/// f32 (dq's columns, then dk's, then dv's), whose column sums are the three projections'
/// bias gradients.
pub(crate) struct BiasSums {
    pub(crate) sums: CudaStorage,
    pub(crate) rows: usize,
}

/// `parts` (one dtype, one device) one after another in a new buffer.
pub(crate) fn concat(parts: &[&CudaStorage]) -> Result<CudaStorage> {
    let first = parts
        .first()
        .ok_or_else(|| Error::op("concat", "no parts"))?;
    let (dev, dt) = (first.device(), first.dtype());
    if parts
        .iter()
        .any(|p| p.dtype() != dt || !std::sync::Arc::ptr_eq(p.device(), dev))
    {
        return Err(Error::op("concat", "parts of different dtypes or devices"));
    }
    let out = dev.alloc(dt, parts.iter().map(|p| p.len()).sum())?;
    let mut at = out.ptr();
    for p in parts {
        let bytes = p.len() * dt.size();
        if bytes > 0 {
            // SAFETY: `out` holds every part's bytes, each part's at its own offset.
            unsafe { super::copy_device_bytes(dev, at, p.ptr(), bytes)? };
        }
        at += bytes as u64;
    }
    Ok(out)
}

/// Row widths (q's, k's and v's) for the kernels, which take one width for k and v.
fn head_widths(q: &HeadBlock, k: &HeadBlock, v: &HeadBlock) -> Result<(i32, i32)> {
    if k.w != v.w {
        return Err(Error::op(
            "short_attention",
            format!("k and v rows of {} and {} elements", k.w, v.w),
        ));
    }
    Ok((q.w as i32, k.w as i32))
}

/// The fused attention of `batch * heads` heads of q [lq, batch, heads * d] over k, v
/// [lk, batch, heads * d] (position-major; see [`HeadBlock`] for wider rows): ctx [lq,
/// batch, heads * d]; None where [`short_attention_smem`] says it does not apply. The
/// probabilities are not kept: the backward computes them again.
pub(crate) fn short_attention_forward(
    (q, k, v): (HeadBlock, HeadBlock, HeadBlock),
    key_lens: Option<&CudaStorage>,
    (batch, heads, lq, lk, d): (usize, usize, usize, usize, usize),
    scale: f32,
    causal: bool,
    drop: Option<DropSpec>,
) -> Result<Option<CudaStorage>> {
    let dev = q.s.device();
    let dt = q.s.dtype();
    let (p, keep, seed, offset) = drop_args(drop);
    let Some((smem, _)) = short_attention_smem(dev, dt, lq, lk, d, p > 0.0) else {
        return Ok(None);
    };
    let (qw, kvw) = head_widths(&q, &k, &v)?;
    let ctx = dev.alloc(dt, lq * batch * heads * d)?;
    if batch * heads == 0 {
        return Ok(Some(ctx));
    }
    let f = dev.kernel(short_attention_kernel(true, d, lq, lk), dt)?;
    allow_smem(&f, smem)?;
    let (qp, kp, vp, klp) = (q.ptr(), k.ptr(), v.ptr(), key_lens.map_or(0, |k| k.ptr()));
    let cp = ctx.ptr();
    let (b, h, lq32, lk32, d32) = (batch as i32, heads as i32, lq as i32, lk as i32, d as i32);
    let causal = causal as i32;
    let mut l = dev.launch(&f);
    l.arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&klp)
        .arg(&cp)
        .arg(&b)
        .arg(&h)
        .arg(&lq32)
        .arg(&lk32)
        .arg(&d32)
        .arg(&qw)
        .arg(&kvw)
        .arg(&scale)
        .arg(&causal)
        .arg(&p)
        .arg(&keep)
        .arg(&seed)
        .arg(&offset);
    let cfg = short_attention_cfg(batch * heads, lq, lk, smem);
    // SAFETY: argument types match the kernel's signature in attention_train.cu; q, k and v
    // hold lq and lk rows of their widths (the caller checks the shapes), the outputs the
    // sizes above, and the shared memory is what the kernel carves.
    launched("attn_short_fwd", unsafe { l.launch(cfg) })?;
    Ok(Some(ctx))
}

/// The backward of [`short_attention_forward`] from dctx: (dq, dk, dv) in q's, k's and v's
/// layout (`layout`); None where it does not apply. `key_lens`, `causal`, `scale` and `drop`
/// are the forward's: the kernel computes the probabilities and the dropout draws again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn short_attention_backward(
    (q, k, v): (HeadBlock, HeadBlock, HeadBlock),
    layout: QkvLayout,
    key_lens: Option<&CudaStorage>,
    dctx: &CudaStorage,
    (batch, heads, lq, lk, d): (usize, usize, usize, usize, usize),
    scale: f32,
    causal: bool,
    drop: Option<DropSpec>,
    bias_sums: bool,
) -> Result<Option<(AttnGrads, Option<BiasSums>)>> {
    let dev = q.s.device();
    let dt = q.s.dtype();
    let (p, keep, seed, offset) = drop_args(drop);
    let Some((_, smem)) = short_attention_smem(dev, dt, lq, lk, d, p > 0.0) else {
        return Ok(None);
    };
    let (qw, kvw) = head_widths(&q, &k, &v)?;
    // The gradients take the inputs' layout, checked to tile the packed tensors (so every
    // column of a packed gradient is written).
    let hd = heads * d;
    let same = |a: &HeadBlock, b: &HeadBlock| std::ptr::eq(a.s, b.s);
    let tiled = match layout {
        QkvLayout::Separate => q.w == hd && k.w == hd && v.w == hd,
        QkvLayout::Packed => {
            same(&q, &k)
                && same(&k, &v)
                && lq == lk
                && (q.col, k.col, v.col) == (0, hd, 2 * hd)
                && q.w == 3 * hd
                && k.w == q.w
        }
        QkvLayout::PackedKv => {
            same(&k, &v) && (q.col, k.col, v.col) == (0, 0, hd) && q.w == hd && k.w == 2 * hd
        }
    };
    if !tiled {
        return Err(Error::op(
            "short_attention_backward",
            format!("q, k and v do not have the {layout:?} layout"),
        ));
    }
    let grads = match layout {
        QkvLayout::Packed => AttnGrads::Packed(dev.alloc(dt, lq * batch * q.w)?),
        QkvLayout::PackedKv => AttnGrads::PackedKv(
            dev.alloc(dt, lq * batch * q.w)?,
            dev.alloc(dt, lk * batch * k.w)?,
        ),
        QkvLayout::Separate => AttnGrads::Separate(
            dev.alloc(dt, lq * batch * q.w)?,
            dev.alloc(dt, lk * batch * k.w)?,
            dev.alloc(dt, lk * batch * v.w)?,
        ),
    };
    // Each warp of a sequence's blocks writes a row.
    let warps = short_attention_threads(lq, lk) as usize / 32;
    let sums = if bias_sums {
        let rows = batch * warps;
        Some(BiasSums {
            sums: dev.alloc(DType::F32, rows * 3 * hd)?,
            rows,
        })
    } else {
        None
    };
    if batch * heads == 0 {
        // No rows or no columns: the sums are empty.
        return Ok(Some((grads, sums)));
    }
    let es = dt.size() as u64;
    let (dqp, dkp, dvp) = match &grads {
        AttnGrads::Packed(g) => (
            g.ptr() + q.col as u64 * es,
            g.ptr() + k.col as u64 * es,
            g.ptr() + v.col as u64 * es,
        ),
        AttnGrads::PackedKv(dq, dkv) => (
            dq.ptr(),
            dkv.ptr() + k.col as u64 * es,
            dkv.ptr() + v.col as u64 * es,
        ),
        AttnGrads::Separate(dq, dk, dv) => (dq.ptr(), dk.ptr(), dv.ptr()),
    };
    let f = dev.kernel(short_attention_kernel(false, d, lq, lk), dt)?;
    allow_smem(&f, smem)?;
    let (qp, kp, vp, dcp) = (q.ptr(), k.ptr(), v.ptr(), dctx.ptr());
    let klp = key_lens.map_or(0, |k| k.ptr());
    let bsp = sums.as_ref().map_or(0, |b| b.sums.ptr());
    let (b, h, lq32, lk32, d32) = (batch as i32, heads as i32, lq as i32, lk as i32, d as i32);
    let causal = causal as i32;
    let mut l = dev.launch(&f);
    l.arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&klp)
        .arg(&dcp)
        .arg(&dqp)
        .arg(&dkp)
        .arg(&dvp)
        .arg(&bsp)
        .arg(&b)
        .arg(&h)
        .arg(&lq32)
        .arg(&lk32)
        .arg(&d32)
        .arg(&qw)
        .arg(&kvw)
        .arg(&scale)
        .arg(&causal)
        .arg(&p)
        .arg(&keep)
        .arg(&seed)
        .arg(&offset);
    let cfg = short_attention_cfg(batch * heads, lq, lk, smem);
    // SAFETY: as in short_attention_forward; key_lens, when given, holds `batch` i32; the
    // bias sums, when given, hold batch * warps rows of 3 * heads * d f32.
    launched("attn_short_bwd", unsafe { l.launch(cfg) })?;
    Ok(Some((grads, sums)))
}
