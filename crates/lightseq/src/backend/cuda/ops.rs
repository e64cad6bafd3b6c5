//! CUDA bodies of the ops: argument packing and launch shapes. Shapes were checked by the
//! front end in `crate::ops`.

use super::blaslt::Epilogue;
use super::linear_own::{linear_own, Linear};
use super::{cuda_err, CudaStorage};
use crate::backend::cpu::{RotaryGeometry, RowCopy};
use crate::error::{Error, Result};
use crate::ops::{Activation, AttentionOptions, Heads};
use crate::tensor::DType;
use cudarc::driver::LaunchConfig;

pub(super) fn grid_1d(total: usize, threads: u32) -> LaunchConfig {
    let blocks = total.div_ceil(threads as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for row-wise kernels: a multiple of 32, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
}

pub(super) fn launched<T>(
    name: &str,
    r: std::result::Result<T, cudarc::driver::DriverError>,
) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| cuda_err(&format!("launching {name}"), e))
}

pub(crate) fn linear(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CudaStorage> {
    let op = Linear {
        x,
        w,
        b,
        r: None,
        act,
        m,
        n,
        k,
    };
    if let Some(y) = linear_own(&op)? {
        return Ok(y);
    }
    let dev = x.device();
    let dt = x.dtype();
    if m > 0 && k > 0 && act == Activation::None && !(n * dt.size()).is_multiple_of(16) {
        return linear_unaligned(x, w, b, m, n, k);
    }
    let y = dev.alloc(dt, m * n)?;
    if m == 0 || n == 0 {
        return Ok(y);
    }
    // Bias and ReLU ride in the GEMM's epilogue (ReLU is exact there), and so does the tanh
    // GELU of 16-bit outputs with a bias (cuBLASLt's GELU is that form, within the output's
    // rounding); other activations run as a separate pass, with the CPU's definition.
    let bias = b.map(|b| b.ptr());
    let gemm = |epi| {
        dev.lt
            .matmul_nt(dev.stream(), dt, m, n, k, x.ptr(), w.ptr(), epi, y.ptr())
    };
    if act == Activation::Relu && gemm(Epilogue::with(bias, true))? {
        return Ok(y);
    }
    if let (Activation::GeluTanh, Some(bp)) = (act, bias) {
        if blas_epilogue_has(act, true, dt) && gemm(Epilogue::BiasGeluTanh(bp))? {
            return Ok(y);
        }
    }
    gemm(Epilogue::with(bias, false))?;
    if act != Activation::None {
        bias_act(&y, None, act, n)?;
    }
    Ok(y)
}

/// `layer_norm(x w^T + b + residual)` by the GEMM whose epilogue adds the residual and
/// normalizes the rows (linear_tiled.rs), or None where it does not apply (the caller then
/// runs the linear and the layer norm).
pub(crate) fn linear_add_layer_norm(
    (x, w, b): (&CudaStorage, &CudaStorage, Option<&CudaStorage>),
    residual: &CudaStorage,
    (gamma, beta, eps): (&CudaStorage, &CudaStorage, f32),
    (m, n, k): (usize, usize, usize),
) -> Result<Option<CudaStorage>> {
    let op = Linear {
        x,
        w,
        b,
        r: Some(residual),
        act: Activation::None,
        m,
        n,
        k,
    };
    super::linear_tiled::linear_tiled_layer_norm(&op, gamma, beta, eps)
}

/// Whether [`linear`] applies `act` in cuBLASLt's epilogue, so that the GEMM needs no
/// activation pass of its own: none and ReLU always, the tanh GELU of 16-bit outputs with a
/// bias unless LIGHTSEQ_GELU_EPILOGUE=0. linear_tiled.rs takes the GEMMs this refuses.
pub(super) fn blas_epilogue_has(act: Activation, has_bias: bool, dt: DType) -> bool {
    match act {
        Activation::None | Activation::Relu => true,
        Activation::GeluTanh => has_bias && dt != DType::F32 && gelu_epilogue(),
        _ => false,
    }
}

/// Whether the tanh GELU may ride in the GEMM's epilogue (LIGHTSEQ_GELU_EPILOGUE=0 keeps it
/// a separate pass, for comparison).
fn gelu_epilogue() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_equals(&OFF, "LIGHTSEQ_GELU_EPILOGUE", "0")
}

/// [`linear`] for rows that are not whole 16-byte packs (LM heads over vocabularies such as
/// GPT2's 50257 or BART's 50265): cuBLASLt runs such an output with fallback kernels at a
/// fraction of the rate (H200, GPT2's head at 32 rows: an `align1` kernel at 64 us), so the
/// GEMM writes rows padded to whole packs and one pass packs them.
fn linear_unaligned(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CudaStorage> {
    let ld = n.next_multiple_of(16 / x.dtype().size());
    let padded = super::train_ops::linear_ld(x, w, b, m, n, k, ld)?;
    let dev = x.device();
    let y = dev.alloc(x.dtype(), m * n)?;
    if m * n < i32::MAX as usize - 8 {
        let f = dev.kernel("pack_rows", x.dtype())?;
        let (yp, pp) = (y.ptr(), padded.ptr());
        let (total, width, src_width) = ((m * n) as i32, n as i32, ld as i32);
        let mut l = dev.launch(&f);
        l.arg(&yp).arg(&pp).arg(&total).arg(&width).arg(&src_width);
        let cfg = LaunchConfig {
            grid_dim: ((m * n).div_ceil(8 * 256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match pack_rows in elementwise.cu; y holds m * n elements
        // and padded m rows of ld >= n; the allocator's blocks are 16-byte aligned.
        launched("pack_rows", unsafe { l.launch(cfg) })?;
        return Ok(y);
    }
    let g = RowCopy {
        batch: 1,
        rows: m,
        width: n,
        src_width: ld,
        src_col: 0,
        dst_rows: m,
        dst_width: n,
        dst_row: 0,
        dst_col: 0,
    };
    write_rows(&y, &padded, None, &g)?;
    Ok(y)
}

pub(crate) fn bias_act(
    y: &CudaStorage,
    b: Option<&CudaStorage>,
    act: Activation,
    n: usize,
) -> Result<()> {
    let dev = y.device();
    let f = dev.kernel("bias_act", y.dtype())?;
    let (yp, bp) = (y.ptr(), b.map(|b| b.ptr()).unwrap_or(0));
    let (code, total, n) = (act.code(), y.len() as i64, n as i32);
    let mut l = dev.launch(&f);
    l.arg(&yp).arg(&bp).arg(&code).arg(&total).arg(&n);
    // A thread per 16-byte pack (the kernel loops over elements where packs do not apply).
    let packs = y.len().div_ceil(16 / y.dtype().size());
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("bias_act", unsafe { l.launch(grid_1d(packs, 256)) })
}

pub(crate) fn add(a: &CudaStorage, b: &CudaStorage) -> Result<CudaStorage> {
    let dev = a.device();
    let out = dev.alloc(a.dtype(), a.len())?;
    if a.len() == 0 {
        return Ok(out);
    }
    let f = dev.kernel("add", a.dtype())?;
    let (ap, bp, op, total) = (a.ptr(), b.ptr(), out.ptr(), a.len() as i64);
    let mut l = dev.launch(&f);
    l.arg(&ap).arg(&bp).arg(&op).arg(&total);
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("add", unsafe {
        l.launch(grid_1d(a.len().div_ceil(4), 256))
    })?;
    Ok(out)
}

/// Parts [`scatter_i32`] takes at most (elementwise.cu: LS_SCATTER_PARTS).
pub(crate) const SCATTER_PARTS: usize = 8;

/// scatter_words' argument (elementwise.cu: LsScatter).
#[repr(C)]
#[derive(Clone, Copy)]
struct ScatterArgs {
    dst: [u64; SCATTER_PARTS],
    end: [i32; SCATTER_PARTS],
    parts: i32,
}

// SAFETY: plain old data, laid out as the kernel's LsScatter.
unsafe impl cudarc::driver::DeviceRepr for ScatterArgs {}

/// Copies `src` (i32) to `dsts` in one launch: the first `dsts[0].len()` elements to
/// `dsts[0]`, the next to `dsts[1]`, and so on; `src` holds exactly their total, of at most
/// 2^31 - 1 elements, in 1 to [`SCATTER_PARTS`] parts.
pub(crate) fn scatter_i32(src: &CudaStorage, dsts: &[&CudaStorage]) -> Result<()> {
    const OP: &str = "scatter_i32";
    let total: usize = dsts.iter().map(|d| d.len()).sum();
    if dsts.is_empty()
        || dsts.len() > SCATTER_PARTS
        || total != src.len()
        || total > i32::MAX as usize
        || std::iter::once(src)
            .chain(dsts.iter().copied())
            .any(|t| t.dtype() != DType::I32)
    {
        return Err(Error::op(
            OP,
            format!(
                "{} i32 elements into {} parts of {total} (1 to {SCATTER_PARTS} i32 parts)",
                src.len(),
                dsts.len()
            ),
        ));
    }
    if total == 0 {
        return Ok(());
    }
    let mut args = ScatterArgs {
        dst: [0; SCATTER_PARTS],
        end: [0; SCATTER_PARTS],
        parts: dsts.len() as i32,
    };
    let mut end = 0;
    for (p, d) in dsts.iter().enumerate() {
        d.mark_written();
        end += d.len();
        args.dst[p] = d.ptr();
        args.end[p] = end as i32;
    }
    let dev = src.device();
    // Words are copied as they are: the f32 form serves every 32-bit type.
    let f = dev.kernel("scatter_words", DType::F32)?;
    let sp = src.ptr();
    let mut l = dev.launch(&f);
    l.arg(&sp).arg(&args);
    // SAFETY: argument types match scatter_words in elementwise.cu; src holds `total`
    // elements and each dst[p] the part ending at end[p] (checked above).
    launched(OP, unsafe { l.launch(grid_1d(total, 256)) })
}

/// From this many rows, layer norm of rows that are not whole 16-byte packs runs through the
/// training kernel (train.cu), which holds rows in registers (the scalar block-per-row
/// kernel took 23.6 us a launch at BERT-base 32 x 128, ~5x its byte floor); below, the
/// block-per-row kernel of layer_norm.cu has the shorter latency (H200, ncu: 3.8 against
/// 6.1 us at 128 rows, 4.0 against 5.5 us at 8).
const LAYER_NORM_MANY_ROWS: usize = 1024;

/// Packs a lane of `layer_norm_warp` holds at most, and its block (LN_WARP_PACKS,
/// LN_WARP_THREADS in layer_norm.cu).
const LAYER_NORM_WARP_PACKS: usize = 4;
const LAYER_NORM_WARP_THREADS: u32 = 128;

/// Rows from which rows of whole packs go to the warp-a-row kernel rather than the
/// block-a-row one: LIGHTSEQ_LN_WARP_ROWS, else [`LAYER_NORM_MANY_ROWS`].
fn ln_warp_rows() -> usize {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    super::env_count(&ROWS, "LIGHTSEQ_LN_WARP_ROWS").unwrap_or(LAYER_NORM_MANY_ROWS)
}

/// Whether LIGHTSEQ_LN_PACKED=0 keeps layer norm off the packed kernel.
fn ln_packed_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&OFF, "LIGHTSEQ_LN_PACKED", "0")
}

/// The 16-byte packs of a row of `h` where the packed layer-norm kernel takes it (rows of
/// whole packs, at most 1024 of them, every operand 16-byte aligned), else None.
fn layer_norm_packs(
    x: &CudaStorage,
    residual: Option<&CudaStorage>,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    h: usize,
) -> Option<usize> {
    let n = 16 / x.dtype().size();
    let aligned = [Some(x), residual, Some(gamma), Some(beta)]
        .into_iter()
        .flatten()
        .all(|t| t.ptr().is_multiple_of(16));
    let fits = h.is_multiple_of(n) && (1..=1024).contains(&(h / n));
    (fits && aligned && !ln_packed_off()).then_some(h / n)
}

/// Layer norm of x (+ residual). Rows of whole 16-byte packs go to the packed kernel (a
/// pack a thread, loaded once: H200, session 42, BERT-base 8 x 32 0.46 -> 0.42 ms,
/// Transformer-base beam 4 at 1 x 32 6.26 -> 6.06, GPT2 sampling at 8 x 32 10.77 -> 9.82),
/// from [`ln_warp_rows`] rows those of at most 128 packs to the warp-a-row kernel (run 31:
/// BERT-base 32 x 128 1.68-1.70 -> 1.65 ms); other rows to the scalar block-per-row
/// kernel, or from [`LAYER_NORM_MANY_ROWS`] rows to the training kernel. The training
/// kernel rounds the sum to the dtype before it is normalized (as an f16/bf16 model adds
/// its residual in its dtype); the others normalize the f32 sum.
pub(crate) fn layer_norm(
    x: &CudaStorage,
    residual: Option<&CudaStorage>,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    eps: f32,
    rows: usize,
    h: usize,
) -> Result<CudaStorage> {
    let packs = layer_norm_packs(x, residual, gamma, beta, h);
    if packs.is_none() && rows >= LAYER_NORM_MANY_ROWS {
        let (_, out, _) = super::train_ops::add_layer_norm(
            x,
            residual,
            gamma,
            beta,
            rows,
            h,
            eps,
            (false, false),
        )?;
        return Ok(out);
    }
    let dev = x.device();
    let out = dev.alloc(x.dtype(), rows * h)?;
    if rows == 0 {
        return Ok(out);
    }
    let warp = packs.is_some_and(|p| p <= 32 * LAYER_NORM_WARP_PACKS) && rows >= ln_warp_rows();
    let (name, threads) = match packs {
        Some(_) if warp => ("layer_norm_warp", LAYER_NORM_WARP_THREADS),
        Some(p) => ("layer_norm_packed", row_threads(p)),
        None => ("layer_norm", row_threads(h).min(512)),
    };
    let f = dev.kernel(name, x.dtype())?;
    let (xp, rp, gp, bp, op) = (
        x.ptr(),
        residual.map(|r| r.ptr()).unwrap_or(0),
        gamma.ptr(),
        beta.ptr(),
        out.ptr(),
    );
    let hh = h as i32;
    // gamma and beta before the wait where no kernel can be writing them.
    let early = i32::from(super::read_early(&[Some(gamma), Some(beta)]));
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&rp)
        .arg(&gp)
        .arg(&bp)
        .arg(&op)
        .arg(&hh)
        .arg(&eps)
        .arg(&early);
    let rows_i = rows as i32;
    let blocks = if warp {
        l.arg(&rows_i);
        rows.div_ceil(threads as usize / 32)
    } else {
        rows
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernels' signature in layer_norm.cu (the warp
    // kernel's with the row count after them); the packed kernel has a thread for each
    // 16-byte pack of a row, the warp kernel a warp for each row of at most 32
    // LN_WARP_PACKS packs, every operand 16-byte aligned (out is a new allocation).
    launched(name, unsafe { l.launch(cfg) })?;
    Ok(out)
}

pub(crate) fn embed(
    parts: &[(&CudaStorage, &CudaStorage)],
    n: usize,
    h: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = parts[0].0.device();
    let dt = parts[0].0.dtype();
    let out = dev.alloc(dt, n * h)?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.kernel("embed", dt)?;
    let mut ptrs = [0u64; 6];
    for (i, (t, ids)) in parts.iter().enumerate() {
        ptrs[2 * i] = t.ptr();
        ptrs[2 * i + 1] = ids.ptr();
    }
    let (op, hh) = (out.ptr(), h as i32);
    let mut l = dev.launch(&f);
    for p in &ptrs {
        l.arg(p);
    }
    l.arg(&op).arg(&hh).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (row_threads(h).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel's signature in embedding.cu.
    launched("embed", unsafe { l.launch(cfg) })?;
    Ok(out)
}

const ATT_WARPS: usize = 4;
const ATT_MAX_HEAD_DIM: usize = 256;
/// Tiled kernel shape (attention.cu: TILE_Q, TILE_K, TILE_MAX_DIM).
const TILED_Q: usize = 32;
const TILED_K: usize = 32;
const TILED_MAX_HEAD_DIM: usize = 128;
/// Threads per (head, row) block of the single-query kernel (attention.cu: DEC_THREADS).
const DEC_THREADS: u32 = 128;
/// Threads of a grouped decode block (attention.cu GROUP_WARPS warps).
const DEC_GROUP_THREADS: u32 = 256;

/// Attention goes through tensor-core GEMMs (scores in f32, a masked softmax, probabilities
/// times values) when the options allow it and the score matrix has at least this many
/// elements with at least `GEMM_ATTENTION_MIN_QUERIES` queries per sequence: below that the
/// fused kernel's single launch wins (H200, BERT-base: GEMMs 1.42 vs 2.12 ms at 8 x 128,
/// fused 1.31 vs 1.60 ms at 32 x 32 and 1.51 vs 1.92 ms at 1 x 128). Head sizes past the
/// fused kernel's limit take the GEMMs whenever there is more than one query.
const GEMM_ATTENTION_MIN_SCORES: usize = 1 << 20;
const GEMM_ATTENTION_MIN_QUERIES: usize = 64;
/// ... as long as the f32 score matrix stays under this many bytes.
const GEMM_ATTENTION_MAX_SCORE_BYTES: usize = 1 << 30;

/// Attention as batched GEMMs for encoders and prefill: heads gathered to
/// [batch, heads, len, d], scores q k^T in f32, the masked softmax, then probabilities (in
/// the tensors' dtype) times values. Used when every key range starts at 0 and there is no
/// bias, window, offset or grouped heads; None otherwise.
fn gemm_attention(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    o: &AttentionOptions,
) -> Result<Option<CudaStorage>> {
    use super::train_ops as t;
    const OP: &str = "attention";
    let (qs, ks) = (q.tensor.shape(), k.tensor.shape());
    let (batch, len_q, len_k) = (qs[0], qs[1], ks[1]);
    let (nh, d) = (o.heads, o.head_dim);
    let scores = batch * nh * len_q * len_k;
    let worth = (len_q >= GEMM_ATTENTION_MIN_QUERIES && scores >= GEMM_ATTENTION_MIN_SCORES)
        || (d > ATT_MAX_HEAD_DIM && len_q > 1);
    let eligible = worth
        && o.kv_heads == nh
        && o.bias.is_none()
        && o.window.is_none()
        && o.q_offset == 0
        && (!o.causal || len_q == len_k)
        && o.key_ranges.iter().all(|r| r.0 == 0)
        && scores * 4 <= GEMM_ATTENTION_MAX_SCORE_BYTES;
    if !eligible {
        return Ok(None);
    }
    let (qt, kt, vt) = (q.tensor.cuda(OP)?, k.tensor.cuda(OP)?, v.tensor.cuda(OP)?);
    let dev = qt.device();
    let qh = t::gather_heads(qt, batch, len_q, qs[2], q.col, nh, d)?;
    let kh = t::gather_heads(kt, batch, len_k, ks[2], k.col, nh, d)?;
    let vh = t::gather_heads(vt, batch, len_k, v.tensor.shape()[2], v.col, nh, d)?;
    let scores = t::matmul(&qh, false, &kh, true, batch * nh, len_q, len_k, d, true)?;
    // The ends of the key ranges: the second half of the ranges on the device, or uploaded.
    let uploaded;
    let ends = match o.ranges_on_device {
        Some(r) => r.cuda(OP)?.ptr() + 4 * batch as u64,
        None => {
            let ends: Vec<i32> = o.key_ranges.iter().map(|r| r.1 as i32).collect();
            uploaded = dev.upload_i32(&ends)?;
            uploaded.ptr()
        }
    };
    let p = t::masked_softmax_at(&scores, ends, nh, len_q, len_k, o.scale, o.causal)?;
    let p = if qt.dtype() == DType::F32 {
        p
    } else {
        cast(&p, qt.dtype())?
    };
    let ctx = t::matmul(&p, false, &vh, false, batch * nh, len_q, d, len_k, false)?;
    Ok(Some(t::transpose_12(&ctx, batch, nh, len_q, d)?))
}

/// Rows of queries a block of the flash kernel takes per warp (attention_train.cu).
const FLASH_ROWS_PER_WARP: usize = 16;
/// Keys per tile of the flash kernel (attention_train.cu: AF_BK).
const FLASH_KEY_TILE: usize = 64;
/// Warps per block of the flash kernel at most (attention_train.cu: AT_MAX_WARPS).
const FLASH_MAX_WARPS: usize = 4;

/// `LIGHTSEQ_FLASH_SHORT=0`: keys of at most 32 take the flash kernel of 64-key tiles too.
fn flash_short_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_equals(&OFF, "LIGHTSEQ_FLASH_SHORT", "0")
}

/// Whether the tensor-core flash kernel may run attention of more than one query: f16/bf16
/// on sm_80 or later, head_dim a multiple of 16 up to 128, a positive scale (the kernel
/// takes the running max of unscaled scores), no bias table, unless
/// LIGHTSEQ_FLASH_ATTENTION=0.
fn flash_applies(dev: &super::CudaDevice, dt: DType, len_q: usize, o: &AttentionOptions) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_equals(&OFF, "LIGHTSEQ_FLASH_ATTENTION", "0")
        && len_q > 1
        && matches!(dt, DType::F16 | DType::BF16)
        && dev.arch() >= (8, 0)
        && o.head_dim.is_multiple_of(16)
        && (16..=128).contains(&o.head_dim)
        && o.scale > 0.0
        && o.scale.is_finite()
        && o.bias.is_none()
}

/// A single-query step's own keys and values, which [`attention`] appends to the caches it
/// reads (k's and v's tensors) at `row`: `src` [batch, 1, src_width] holds them from
/// columns `cols.0` and `cols.1`; `row_on_device`, when given, holds the row (i32 [1]).
pub(crate) struct CacheAppend<'a> {
    pub src: &'a CudaStorage,
    pub src_width: usize,
    pub cols: (usize, usize),
    pub row: usize,
    pub row_on_device: Option<&'a CudaStorage>,
    /// Beam search: the cache row holding each key position of each row (i32 [batch,
    /// len_k], values below batch); None: the row's own.
    pub key_rows: Option<&'a CudaStorage>,
}

/// `LIGHTSEQ_DECODE_TILES=0`: single-query steps take the two-phase decode kernel for
/// every row shape.
fn decode_tiles_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_equals(&OFF, "LIGHTSEQ_DECODE_TILES", "0")
}

/// What [`decode_kernel`] chooses by besides the rows: the device's tensor cores and q's rows.
struct DecodeTarget {
    /// f16/bf16 on sm_80 or later.
    mma: bool,
    /// q's base and sequence stride in bytes.
    q: (u64, u64),
    /// Query rows per key/value row.
    kv_div: usize,
    /// Heads times key/value rows times keys a row: the grouped kernel's blocks times keys.
    group_work: usize,
}

/// Largest kv_div the grouped decode kernel takes (q^T's 8 columns).
const DECODE_GROUP_MAX: usize = 8;

/// The grouped decode kernel takes steps of at least this much [`DecodeTarget::group_work`].
/// It has a block for kv_div query rows where the tiles have one a row, so few or short
/// rows leave it too few blocks. Transformer-base beam 4 on an H200, ms a search against
/// the tiles: 8 x 128 (8192) 39.2 vs 40.3 and 32 x 128 (32768) 50.1 vs 52.7, 32 x 32 (8192)
/// 11.7 vs 11.9; 8 x 32 (2048) 9.58 vs 9.39 and 1 x 32 (256) 7.62 vs 7.39.
const DECODE_GROUP_MIN_WORK: usize = 8192;

/// `LIGHTSEQ_DECODE_GROUP=0`: query rows sharing keys take a block each.
fn decode_group_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_equals(&OFF, "LIGHTSEQ_DECODE_GROUP", "0")
}

/// The single-query kernel for these keys and values (base pointer and shape each): where
/// every row the kernel reads (a sequence's, a cache row's, the step's appended one) starts
/// on a 16-byte boundary and is 4, 8 or 16 whole packs, the tensor-core kernel for query
/// rows that share their keys (f16/bf16 on sm_80+, q's rows aligned too, enough work) or
/// else the scalar tiled one of that many packs; other rows take the two-phase kernel
/// (attention.cu). With the kernel's name comes whether it is the grouped one, whose
/// blocks each take a (head, key sequence) rather than a (head, query row).
fn decode_kernel(
    head_dim: usize,
    elem: u64,
    target: DecodeTarget,
    k: (u64, &[usize]),
    v: (u64, &[usize]),
    append: Option<&CacheAppend>,
) -> (&'static str, bool) {
    let row = head_dim as u64 * elem;
    let whole = |n: usize| (n as u64 * elem).is_multiple_of(16);
    let rows_ok =
        |(p, s): (u64, &[usize])| p.is_multiple_of(16) && whole(s[2]) && whole(s[1] * s[2]);
    let step_ok = append.is_none_or(|a| {
        (a.src.ptr() + a.cols.0 as u64 * elem).is_multiple_of(16)
            && whole(a.src_width)
            && (a.cols.1.abs_diff(a.cols.0) as u64 * elem).is_multiple_of(16)
    });
    if !decode_tiles_on() || !row.is_multiple_of(16) || !rows_ok(k) || !rows_ok(v) || !step_ok {
        return ("attention_decode", false);
    }
    let q_ok = target.q.0.is_multiple_of(16) && target.q.1.is_multiple_of(16);
    let grouped = (2..=DECODE_GROUP_MAX).contains(&target.kv_div)
        && append.is_none()
        && target.group_work >= DECODE_GROUP_MIN_WORK;
    if target.mma && q_ok && grouped && decode_group_on() {
        match row / 16 {
            4 => return ("attention_decode_g4", true),
            8 => return ("attention_decode_g8", true),
            16 => return ("attention_decode_g16", true),
            _ => {}
        }
    }
    let name = match row / 16 {
        4 => "attention_decode_p4",
        8 => "attention_decode_p8",
        16 => "attention_decode_p16",
        _ => "attention_decode",
    };
    (name, false)
}

pub(crate) fn attention(
    q: &Heads,
    k: &Heads,
    v: &Heads,
    o: &AttentionOptions,
    append: Option<&CacheAppend>,
    settled: bool,
) -> Result<CudaStorage> {
    const OP: &str = "attention";
    let (qt, kt, vt) = (q.tensor.cuda(OP)?, k.tensor.cuda(OP)?, v.tensor.cuda(OP)?);
    let dev = qt.device();
    let (qs, ks, vs) = (q.tensor.shape(), k.tensor.shape(), v.tensor.shape());
    let (batch, len_q) = (qs[0], qs[1]);
    let flash = flash_applies(dev, qt.dtype(), len_q, o);
    if append.is_some() && len_q != 1 {
        return Err(Error::op(
            OP,
            "appending to the caches needs one query a row",
        ));
    }
    // Query rows per key/value row (the front end expands shared keys and values for
    // every kernel but the single-query one, which reads row b / kv_div).
    let kv_div = batch.checked_div(ks[0]).unwrap_or(1);
    if kv_div != 1 && (len_q != 1 || append.is_some()) {
        return Err(Error::op(
            OP,
            format!("keys of {} sequences for {batch} queries", ks[0]),
        ));
    }
    let kv_div_i = kv_div as i32;
    if append.is_some() {
        kt.mark_written();
        vt.mark_written();
    }
    if batch > 0 && !flash && append.is_none() && kv_div == 1 {
        if let Some(out) = gemm_attention(q, k, v, o)? {
            return Ok(out);
        }
    }
    let out = dev.alloc(qt.dtype(), batch * len_q * o.heads * o.head_dim)?;
    if batch == 0 || len_q == 0 {
        return Ok(out);
    }
    if o.head_dim > ATT_MAX_HEAD_DIM {
        return Err(Error::op(
            OP,
            format!(
                "head_dim {} exceeds the CUDA kernel's {ATT_MAX_HEAD_DIM}",
                o.head_dim
            ),
        ));
    }
    let uploaded;
    let ranges = match o.ranges_on_device {
        Some(t) => t.cuda(OP)?,
        None => {
            let mut v: Vec<i32> = o.key_ranges.iter().map(|r| r.0 as i32).collect();
            v.extend(o.key_ranges.iter().map(|r| r.1 as i32));
            uploaded = dev.upload_i32(&v)?;
            &uploaded
        }
    };
    let (table, buckets) = match &o.bias {
        Some(b) => (
            Some(b.table.cuda(OP)?.ptr()),
            Some(dev.upload_i32(&b.buckets)?),
        ),
        None => (None, None),
    };
    // Many queries: the tensor-core flash kernel where it applies, else the shared-memory
    // tiled kernel; single-query decode steps: a warp each.
    let tiled = len_q >= 8 && o.head_dim <= TILED_MAX_HEAD_DIM;
    let decode = len_q == 1;
    let elem = qt.dtype().size() as u64;
    let (qp, kp, vp) = (
        qt.ptr() + q.col as u64 * elem,
        kt.ptr() + k.col as u64 * elem,
        vt.ptr() + v.col as u64 * elem,
    );
    // Keys of at most half a tile take the flash kernel of half tiles.
    let short_keys = flash && ks[1] <= FLASH_KEY_TILE / 2 && flash_short_on();
    // The kernel, and whether it is the grouped decode kernel (its own launch shape).
    let (name, grouped) = if flash {
        let name = match (o.head_dim <= 64, short_keys) {
            (true, false) => "attn_flash_d64",
            (false, false) => "attn_flash_d128",
            (true, true) => "attn_flash_s_d64",
            (false, true) => "attn_flash_s_d128",
        };
        (name, false)
    } else if decode {
        let target = DecodeTarget {
            mma: matches!(qt.dtype(), DType::F16 | DType::BF16) && dev.arch() >= (8, 0),
            q: (qp, (qs[1] * qs[2]) as u64 * elem),
            kv_div,
            group_work: o.heads * ks[0] * ks[1],
        };
        decode_kernel(o.head_dim, elem, target, (kp, ks), (vp, vs), append)
    } else if tiled {
        ("attention_tiled", false)
    } else {
        ("attention", false)
    };
    let f = dev.kernel(name, qt.dtype())?;
    let (op, sp) = (out.ptr(), ranges.ptr());
    let ep = sp + 4 * batch as u64;
    let (len_q_i, heads, group, hd) = (
        len_q as i32,
        o.heads as i32,
        (o.heads / o.kv_heads) as i32,
        o.head_dim as i32,
    );
    let strides = |s: &[usize]| ((s[1] * s[2]) as i64, s[2] as i32);
    let ((q_bs, q_rs), (k_bs, k_rs), (v_bs, v_rs)) = (strides(qs), strides(ks), strides(vs));
    let (causal, q_offset, window) = (
        o.causal as i32,
        o.q_offset as i32,
        o.window.map(|w| w as i32).unwrap_or(0),
    );
    let (tp, bp) = (
        table.unwrap_or(0),
        buckets.as_ref().map(|b| b.ptr()).unwrap_or(0),
    );
    let mut l = dev.launch(&f);
    l.arg(&qp).arg(&kp).arg(&vp).arg(&op).arg(&sp).arg(&ep);
    l.arg(&len_q_i).arg(&heads).arg(&group).arg(&hd);
    l.arg(&q_bs)
        .arg(&q_rs)
        .arg(&k_bs)
        .arg(&k_rs)
        .arg(&v_bs)
        .arg(&v_rs);
    l.arg(&causal).arg(&q_offset).arg(&window).arg(&o.scale);
    if flash {
        // q's rows, then one or two tiles each of k and v, rows padded by 8 elements, each
        // region rounded to 128 bytes (the kernel carves them in that order). Two stages
        // where the keys span more than one tile and the buffers stay small.
        let warps = len_q.div_ceil(FLASH_ROWS_PER_WARP).min(FLASH_MAX_WARPS);
        let rows = warps * FLASH_ROWS_PER_WARP;
        let region = |r: usize| (r * (o.head_dim + 8) * elem as usize).next_multiple_of(128);
        let stages: i32 = if o.head_dim <= 64 && ks[1] > FLASH_KEY_TILE {
            2
        } else {
            1
        };
        let tile = if short_keys {
            FLASH_KEY_TILE / 2
        } else {
            FLASH_KEY_TILE
        };
        let smem = region(rows) + 2 * stages as usize * region(tile);
        l.arg(&stages);
        super::train_ops::allow_smem(&f, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (len_q.div_ceil(rows) as u32, o.heads as u32, batch as u32),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: argument types match attn_flash's signature (attention_train.cu); the
        // shared memory is what it carves.
        launched(OP, unsafe { l.launch(cfg) })?;
        return Ok(out);
    }
    l.arg(&tp).arg(&bp);
    let (kn, kn_bs, vn_off, at_dev, at) = match append {
        Some(a) => (
            a.src.ptr() + a.cols.0 as u64 * elem,
            a.src_width as i64,
            a.cols.1 as i32 - a.cols.0 as i32,
            a.row_on_device.map_or(0, |r| r.ptr()),
            a.row as i32,
        ),
        None => (0, 0, 0, 0, 0),
    };
    let key_rows = append.and_then(|a| a.key_rows).map_or(0, |t| t.ptr());
    // The single-query kernels read the key ranges, the write position, the row table and
    // their first tile of cached keys and values before waiting for the kernel before, where
    // the caller vouches that that kernel wrote none of them (`settled`: it computed q).
    let early = i32::from(settled && !grouped && !super::early_reads_off());
    if decode {
        l.arg(&kn)
            .arg(&kn_bs)
            .arg(&vn_off)
            .arg(&at_dev)
            .arg(&at)
            .arg(&key_rows)
            .arg(&kv_div_i)
            .arg(&early);
    }
    let cfg = if grouped {
        LaunchConfig {
            grid_dim: (o.heads as u32, (batch / kv_div) as u32, 1),
            block_dim: (DEC_GROUP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    } else if decode {
        LaunchConfig {
            grid_dim: (o.heads as u32, batch as u32, 1),
            block_dim: (DEC_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    } else if tiled {
        let smem = (2 * TILED_K * (o.head_dim + 1) + TILED_Q * o.head_dim) * 4;
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| cuda_err("attention shared memory", e))?;
        }
        LaunchConfig {
            grid_dim: (len_q.div_ceil(TILED_Q) as u32, o.heads as u32, batch as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    } else {
        LaunchConfig {
            grid_dim: (
                len_q.div_ceil(ATT_WARPS) as u32,
                o.heads as u32,
                batch as u32,
            ),
            block_dim: (32 * ATT_WARPS as u32, 1, 1),
            shared_mem_bytes: (ATT_WARPS * o.head_dim * 4) as u32,
        }
    };
    // SAFETY: argument types match the kernel's signature in attention.cu (the decode
    // kernel's last seven: the appended rows, null when none, the key rows, whose values
    // the decode state keeps below batch, and the query rows per key row; the front end
    // checked that they fit the caches).
    launched(OP, unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Conversion between float dtypes (through the host; used off the hot path).
/// Converts between float dtypes on the device (through f32 when neither side is f32).
pub(crate) fn cast(x: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    let dev = x.device();
    let n = x.len();
    let launch = |name: &str, kdt: DType, src: u64, dst: u64| -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let f = dev.kernel(name, kdt)?;
        let total = n as i64;
        let mut l = dev.launch(&f);
        l.arg(&src).arg(&dst).arg(&total);
        // SAFETY: argument types match the kernels' signatures in elementwise.cu.
        launched(name, unsafe { l.launch(grid_1d(n, 256)) })
    };
    match (x.dtype(), dtype) {
        (DType::F32, DType::F32) => {
            let y = dev.alloc(DType::F32, n)?;
            launch("to_f32", DType::F32, x.ptr(), y.ptr())?;
            Ok(y)
        }
        (DType::F32, b) => {
            let y = dev.alloc(b, n)?;
            launch("from_f32", b, x.ptr(), y.ptr())?;
            Ok(y)
        }
        (a, DType::F32) => {
            let y = dev.alloc(DType::F32, n)?;
            launch("to_f32", a, x.ptr(), y.ptr())?;
            Ok(y)
        }
        (a, b) => {
            let tmp = dev.alloc(DType::F32, n)?;
            launch("to_f32", a, x.ptr(), tmp.ptr())?;
            let y = dev.alloc(b, n)?;
            launch("from_f32", b, tmp.ptr(), y.ptr())?;
            Ok(y)
        }
    }
}

pub(crate) fn rms_norm(
    x: &CudaStorage,
    residual: Option<&CudaStorage>,
    gamma: &CudaStorage,
    eps: f32,
    rows: usize,
    h: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), rows * h)?;
    if rows == 0 {
        return Ok(out);
    }
    let f = dev.kernel("rms_norm", x.dtype())?;
    let (xp, rp, gp, op) = (
        x.ptr(),
        residual.map(|r| r.ptr()).unwrap_or(0),
        gamma.ptr(),
        out.ptr(),
    );
    let hh = h as i32;
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&rp).arg(&gp).arg(&op).arg(&hh).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(h).min(512), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel's signature in layer_norm.cu.
    launched("rms_norm", unsafe { l.launch(cfg) })?;
    Ok(out)
}

pub(crate) fn glu(x: &CudaStorage, act: Activation, rows: usize, n: usize) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), rows * n)?;
    if rows * n == 0 {
        return Ok(out);
    }
    let f = dev.kernel("glu", x.dtype())?;
    let (xp, op, code, r, nn) = (x.ptr(), out.ptr(), act.code(), rows as i64, n as i32);
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&op).arg(&code).arg(&r).arg(&nn);
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("glu", unsafe { l.launch(grid_1d(rows * n, 256)) })?;
    Ok(out)
}

pub(crate) fn scale(x: &CudaStorage, s: f32) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), x.len())?;
    if x.len() == 0 {
        return Ok(out);
    }
    let f = dev.kernel("scale", x.dtype())?;
    let (xp, op, total) = (x.ptr(), out.ptr(), x.len() as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&op).arg(&s).arg(&total);
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("scale", unsafe { l.launch(grid_1d(x.len(), 256)) })?;
    Ok(out)
}

pub(crate) fn rotary(
    x: &CudaStorage,
    positions: &CudaStorage,
    inv_freq: &CudaStorage,
    g: &RotaryGeometry,
) -> Result<()> {
    if g.rows == 0 || g.half == 0 {
        return Ok(());
    }
    let dev = x.device();
    let f = dev.kernel("rotary", x.dtype())?;
    let (xp, pp, fp) = (x.ptr(), positions.ptr(), inv_freq.ptr());
    let (w, c, h, hd, half) = (
        g.width as i32,
        g.col as i32,
        g.heads as i32,
        g.head_dim as i32,
        g.half as i32,
    );
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&pp)
        .arg(&fp)
        .arg(&w)
        .arg(&c)
        .arg(&h)
        .arg(&hd)
        .arg(&half)
        .arg(&g.attention_scaling);
    let cfg = LaunchConfig {
        grid_dim: (g.rows as u32, 1, 1),
        block_dim: (row_threads(g.heads * g.half).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel's signature in rotary.cu.
    launched("rotary", unsafe { l.launch(cfg) })
}

pub(crate) fn index_select(x: &CudaStorage, idx: &[usize], row: usize) -> Result<CudaStorage> {
    let ids: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
    let ids = x.device().upload_i32(&ids)?;
    index_select_dev(x, &ids, idx.len(), row)
}

/// Row i of every tensor in `xs` (same dtype, `rows` rows `row_stride` elements apart) takes
/// the first `prefix` elements of row idx[i], in place: [`reorder_prefix_one`] for each,
/// through one scratch.
pub(crate) fn reorder_prefix(
    xs: &[&CudaStorage],
    idx: &CudaStorage,
    rows: usize,
    row_stride: usize,
    prefix: usize,
) -> Result<()> {
    xs.iter().for_each(|x| x.mark_written());
    let Some(first) = xs.first() else {
        return Ok(());
    };
    if rows == 0 || prefix == 0 {
        return Ok(());
    }
    let scratch = first.device().alloc(first.dtype(), rows * prefix)?;
    for x in xs {
        reorder_prefix_one(x, idx, &scratch, rows, row_stride, prefix)?;
    }
    Ok(())
}

/// Row i of `x` (`rows` rows `row_stride` elements apart) takes the first `prefix` elements
/// of row idx[i], in place, through `scratch` (at least rows x prefix elements of x's
/// dtype), which a caller reordering every step keeps: pass 0 gathers the rows' prefixes
/// into the scratch, pass 1 writes them back.
pub(crate) fn reorder_prefix_one(
    x: &CudaStorage,
    idx: &CudaStorage,
    scratch: &CudaStorage,
    rows: usize,
    row_stride: usize,
    prefix: usize,
) -> Result<()> {
    x.mark_written();
    if rows == 0 || prefix == 0 {
        return Ok(());
    }
    let dt = x.dtype();
    if scratch.dtype() != dt || scratch.len() < rows * prefix || idx.len() < rows {
        return Err(Error::op(
            "reorder_prefix_one",
            format!(
                "scratch of {} x {} and {} indices for {rows} rows of {prefix}",
                scratch.len(),
                scratch.dtype(),
                idx.len()
            ),
        ));
    }
    let dev = x.device();
    // The kernel only copies: i32 tables move as f32 bit patterns.
    let kernel_dt = if dt == DType::I32 { DType::F32 } else { dt };
    let f = dev.kernel("reorder_prefix_one", kernel_dt)?;
    let packs = prefix.div_ceil(16 / dt.size());
    let (xp, ip, sp) = (x.ptr(), idx.ptr(), scratch.ptr());
    let (rs, pf) = (row_stride as i64, prefix as i64);
    let cfg = LaunchConfig {
        grid_dim: (packs.div_ceil(256).min(64) as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    for pass in [0i32, 1] {
        let mut l = dev.launch(&f);
        l.arg(&xp).arg(&ip).arg(&sp).arg(&rs).arg(&pf).arg(&pass);
        // SAFETY: argument types match reorder_prefix_one in elementwise.cu; x holds rows x
        // row_stride elements (the caller checks), idx `rows` indices below rows (one block
        // row each), scratch rows x prefix elements (checked above).
        launched("reorder_prefix_one", unsafe { l.launch(cfg) })?;
    }
    Ok(())
}

pub(crate) fn index_select_dev(
    x: &CudaStorage,
    ids: &CudaStorage,
    n: usize,
    row: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let out = dev.alloc(x.dtype(), n * row)?;
    if n == 0 || row == 0 {
        return Ok(out);
    }
    let f = dev.kernel("index_select", x.dtype())?;
    let (xp, ip, op, nn, r) = (x.ptr(), ids.ptr(), out.ptr(), n as i64, row as i64);
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&ip).arg(&op).arg(&nn).arg(&r);
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("index_select", unsafe { l.launch(grid_1d(n * row, 256)) })?;
    Ok(out)
}

pub(crate) fn write_rows(
    dst: &CudaStorage,
    src: &CudaStorage,
    row_on_device: Option<&CudaStorage>,
    g: &RowCopy,
) -> Result<()> {
    dst.mark_written();
    let total = g.batch * g.rows * g.width;
    if total == 0 {
        return Ok(());
    }
    let dev = dst.device();
    let f = dev.kernel("write_rows", dst.dtype())?;
    let (dp, sp) = (dst.ptr(), src.ptr());
    let rp = row_on_device.map_or(0, |r| r.ptr());
    let a = row_copy_args(g, None);
    let mut l = dev.launch(&f);
    l.arg(&dp).arg(&sp).arg(&rp);
    for v in &a {
        l.arg(v);
    }
    // SAFETY: argument types match the kernel's signature in elementwise.cu.
    launched("write_rows", unsafe { l.launch(grid_1d(total, 256)) })
}

/// The integer arguments of `write_rows` in elementwise.cu, in its order; with `src_col1`,
/// `write_rows2`'s, whose second source column follows the first.
fn row_copy_args(g: &RowCopy, src_col1: Option<usize>) -> Vec<i32> {
    let mut a = vec![g.batch, g.rows, g.width, g.src_width, g.src_col];
    a.extend(src_col1);
    a.extend([g.dst_rows, g.dst_width, g.dst_row, g.dst_col]);
    a.into_iter().map(|v| v as i32).collect()
}

/// [`write_rows`] of one source into two destinations of one shape (a layer's key and value
/// caches) in one launch: `dst.0` from column `g.src_col`, `dst.1` from `src_col1`.
pub(crate) fn write_rows2(
    dst: (&CudaStorage, &CudaStorage),
    src: &CudaStorage,
    row_on_device: Option<&CudaStorage>,
    g: &RowCopy,
    src_col1: usize,
) -> Result<()> {
    dst.0.mark_written();
    dst.1.mark_written();
    let total = g.batch * g.rows * g.width;
    if total == 0 {
        return Ok(());
    }
    let dev = dst.0.device();
    let f = dev.kernel("write_rows2", dst.0.dtype())?;
    let (d0, d1, sp) = (dst.0.ptr(), dst.1.ptr(), src.ptr());
    let rp = row_on_device.map_or(0, |r| r.ptr());
    let a = row_copy_args(g, Some(src_col1));
    let mut l = dev.launch(&f);
    l.arg(&d0).arg(&d1).arg(&sp).arg(&rp);
    for v in &a {
        l.arg(v);
    }
    let mut cfg = grid_1d(total, 256);
    cfg.grid_dim.1 = 2;
    // SAFETY: argument types match write_rows2 in elementwise.cu; both destinations have
    // the shape the front end checked.
    launched("write_rows2", unsafe { l.launch(cfg) })
}

pub(crate) fn logprob_topk(
    x: &CudaStorage,
    rows: usize,
    vocab: usize,
    k: usize,
    mask_eos: Option<crate::ops::EosMask>,
) -> Result<crate::ops::TopK> {
    let out = logprob_topk_on_device(x, rows, vocab, k, mask_eos)?;
    topk_download(&out, rows, k)
}

/// [`logprob_topk`]'s buffer, left on the device: rows * k log-probabilities, rows * k ids
/// (as f32 bits), rows log-sum-exps.
pub(crate) fn logprob_topk_on_device(
    x: &CudaStorage,
    rows: usize,
    vocab: usize,
    k: usize,
    mask_eos: Option<crate::ops::EosMask>,
) -> Result<CudaStorage> {
    let dev = x.device();
    // Candidates live in shared memory: 8 bytes each.
    if k == 0 || k > 4096 {
        return Err(Error::op(
            "logprob_topk",
            format!("k = {k} on CUDA (1 to 4096)"),
        ));
    }
    // Log-probabilities, ids (as f32 bits) and log-sum-exps in one buffer: one download.
    let out = dev.alloc(DType::F32, 2 * rows * k + rows)?;
    // Flags: 0 unmasked, 1 masked, 2 masked and renormalized (search.cu).
    let (mask, eos) = match mask_eos {
        Some(m) => {
            let on = 1 + m.renormalize as i32;
            let flags: Vec<i32> = m.rows.iter().map(|&b| if b { on } else { 0 }).collect();
            let e: Vec<i32> = m.eos.iter().map(|&t| t as i32).collect();
            (Some(dev.upload_i32(&flags)?), Some(dev.upload_i32(&e)?))
        }
        None => (None, None),
    };
    let n_eos = mask_eos.map_or(0, |m| m.eos.len()) as i32;
    let (xp, mp, ep) = (
        x.ptr(),
        mask.as_ref().map_or(0, |m| m.ptr()),
        eos.as_ref().map_or(0, |e| e.ptr()),
    );
    let op = out.ptr();
    let (r, v, kk) = (rows as i32, vocab as i32, k as i32);
    let slices = vocab.div_ceil(TOPK_SLICE);
    // Slices (per-thread lists in registers), then a merge of their candidates; one block a
    // row (a radix select) for larger k, more candidates than the merge holds, or rows past
    // a grid's y dimension (the rows of the slice kernel), 65535.
    if rows > 0 && rows <= 65535 && k <= TOPK_SLICED_MAX_K && slices * k <= TOPK_MERGE_MAX {
        // Candidates (u64 keys, as two i32 each) and (max, sum) per slice.
        let cand = dev.alloc(DType::I32, 2 * rows * slices * k)?;
        let stats = dev.alloc(DType::F32, 2 * rows * slices)?;
        let (cp, sp) = (cand.ptr(), stats.ptr());
        let f = dev.kernel("logprob_topk_slices", x.dtype())?;
        let filter = topk_filter_on() as i32;
        let mut l = dev.launch(&f);
        l.arg(&xp).arg(&v).arg(&kk).arg(&mp).arg(&ep).arg(&n_eos);
        l.arg(&filter).arg(&cp).arg(&sp);
        let cfg = LaunchConfig {
            grid_dim: (slices as u32, rows as u32, 1),
            block_dim: (TOPK_SLICE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match logprob_topk_slices in search.cu, which needs exactly
        // TK_SLICE_THREADS threads and k <= TK_MAX_K; cand and stats hold rows * slices * k
        // keys and rows * slices pairs.
        launched("logprob_topk_slices", unsafe { l.launch(cfg) })?;
        let f = dev.kernel("logprob_topk_merge", x.dtype())?;
        let s32 = slices as i32;
        let mut l = dev.launch(&f);
        l.arg(&cp).arg(&sp).arg(&r).arg(&kk).arg(&s32).arg(&op);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (8 * slices * k) as u32,
        };
        // SAFETY: argument types match logprob_topk_merge; the shared memory holds the
        // row's candidates.
        launched("logprob_topk_merge", unsafe { l.launch(cfg) })?;
        return Ok(out);
    }
    let f = dev.kernel("logprob_topk", x.dtype())?;
    let mut l = dev.launch(&f);
    l.arg(&xp)
        .arg(&r)
        .arg(&v)
        .arg(&kk)
        .arg(&mp)
        .arg(&ep)
        .arg(&n_eos)
        .arg(&op);
    // One block per row reads it about seven times; wide blocks for long rows.
    let threads = if vocab >= 8192 { 1024 } else { 256 };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: (k * 8) as u32,
    };
    // SAFETY: argument types match the kernel's signature in search.cu.
    launched("logprob_topk", unsafe { l.launch(cfg) })?;
    Ok(out)
}

/// Beam search's next beams on the device (search.cu `beam_select`): from `topk`
/// ([`logprob_topk_on_device`]'s buffer, `kt` a row), `params` (f32: each row's running
/// score, then each group's flag) and the EOS ids (i32, None for none), writes `ids` and
/// `src` (i32 [rows]) and `record` (f32 [groups, 2 kc]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn beam_select(
    topk: &CudaStorage,
    rows: usize,
    kt: usize,
    kc: usize,
    vocab: usize,
    gs: usize,
    params: &CudaStorage,
    eos: Option<&CudaStorage>,
    fill: i64,
    out: (&CudaStorage, &CudaStorage, &CudaStorage),
) -> Result<()> {
    const OP: &str = "beam_select";
    let n = gs * kt;
    let smem = 8 * n + 16 * kc;
    if gs == 0
        || !rows.is_multiple_of(gs)
        || kc > n
        || smem > 48 * 1024
        || vocab * gs > i32::MAX as usize
        || eos.is_some_and(|e| e.dtype() != DType::I32)
    {
        return Err(Error::op(
            OP,
            format!("{rows} rows in groups of {gs}, {kt} a row, {kc} kept"),
        ));
    }
    let groups = rows / gs;
    let dev = topk.device();
    let f = dev.kernel("beam_select", DType::F32)?;
    let (tp, pp, ep) = (topk.ptr(), params.ptr(), eos.map_or(0, |t| t.ptr()));
    let (ip, sp, rp) = (out.0.ptr(), out.1.ptr(), out.2.ptr());
    let (r, kt_i, kc_i, v, g) = (rows as i32, kt as i32, kc as i32, vocab as i32, gs as i32);
    let (ne, fl) = (eos.map_or(0, |e| e.len()) as i32, fill as i32);
    let mut l = dev.launch(&f);
    l.arg(&tp).arg(&r).arg(&kt_i).arg(&kc_i).arg(&v).arg(&g);
    l.arg(&pp).arg(&ep).arg(&ne).arg(&fl);
    l.arg(&ip).arg(&sp).arg(&rp);
    let cfg = LaunchConfig {
        grid_dim: (groups as u32, 1, 1),
        block_dim: (n.next_multiple_of(32).min(256) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: argument types match beam_select in search.cu; topk holds rows * kt values
    // and ids, params rows + groups values, the outputs rows, rows and groups * 2 kc.
    launched(OP, unsafe { l.launch(cfg) })
}

/// `LIGHTSEQ_TOPK_FILTER=0`: the top-k's slice blocks sort every slice instead of ranking
/// only the keys at or above a threshold (search.cu `logprob_topk_slices_filter`).
fn topk_filter_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::env_equals(&OFF, "LIGHTSEQ_TOPK_FILTER", "0")
}

/// Slice length of the two-stage top-k (search.cu: TK_SLICE).
const TOPK_SLICE: usize = 2048;
/// Threads of a slice block (search.cu: TK_SLICE_THREADS).
const TOPK_SLICE_THREADS: u32 = 256;
/// The two-stage top-k serves k up to this (search.cu: TK_MAX_K)...
const TOPK_SLICED_MAX_K: usize = 64;
/// ... when a row's candidates (slices x k) number at most this (the merge holds them in
/// dynamic shared memory, 8 bytes each: 47 KiB, under the 48 KiB a launch takes without
/// opting in, less the merge kernel's own 512 bytes of static shared memory).
const TOPK_MERGE_MAX: usize = 6016;

/// The top-k buffer (log-probabilities, ids as f32 bits, log-sum-exps) on the host.
fn topk_download(out: &CudaStorage, rows: usize, k: usize) -> Result<crate::ops::TopK> {
    let mut all = out.download_f32()?;
    let lse = all.split_off(2 * rows * k);
    let ids = all
        .split_off(rows * k)
        .iter()
        .map(|v| v.to_bits() as i32)
        .collect();
    Ok(crate::ops::TopK {
        k,
        logprobs: all,
        ids,
        lse,
    })
}
