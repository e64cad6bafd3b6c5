//! Linear layers over few rows (the GEMMs of decode steps) by the kernels of
//! `kernels/linear_small.cu` instead of cuBLASLt: at 32 rows a GEMM is a read of its weight,
//! and the library's kernels for it took 5-10 us where the weight's bytes take 1-2 us.

use super::linear_own::Linear;
use super::ops::launched;
use super::CudaStorage;
use crate::error::Result;
use crate::tensor::DType;
use cudarc::driver::LaunchConfig;

/// Rows the kernels take by default: two 16-row tiles. On sm_90 and later, where they
/// read the weight's first round before the wait (inference run 21 on; the choice is by
/// GPU, so it stands where those reads are off for a weight), two tiles beat cuBLASLt at
/// 17-32 rows of weights 768 wide and more too (H200, session 35: GPT2 sampling at 32 rows
/// 16.8-17.1 -> 14.6-14.8 ms, BART-base beam 4 at batch 8 12.5-12.6 -> 9.9-10.1, BERT-base
/// 1 x 32 0.40 -> 0.33, Transformer-big beam 4 at batch 8 12.3 -> 11.2).
const MAX_ROWS: usize = 32;
/// One tile: what the kernels take without the early weight reads (GPUs before sm_90)
/// where the weight is over [`NARROW`] on a side (without them, at GPT2's 32 rows, 768
/// wide, two tiles lost 4-6% to cuBLASLt: runs 14-15), and what LIGHTSEQ_SMALL_GEMM_ROWS=16
/// limits them to everywhere.
const ONE_TILE: usize = 16;
/// The weight side up to which two tiles beat cuBLASLt without the early reads (run 15).
const NARROW: usize = 512;
/// Columns the kernels take at most: wider outputs (LM heads) are a long read of the weight,
/// which cuBLASLt streams faster (GPT2's head at 32 rows: 64.5 us here against 27 us).
const MAX_COLS: usize = 16384;
/// Chunks of 32 a warp loads before its mma steps (LSM_CH in linear_small.cu).
const CHUNKS_IN_FLIGHT: usize = 2;
/// Warps a block has at most (LSM_MAX_WARPS).
const MAX_WARPS: usize = 16;

/// Whether LIGHTSEQ_SMALL_GEMM=0 sends every GEMM to cuBLASLt.
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&OFF, "LIGHTSEQ_SMALL_GEMM", "0")
}

/// The most rows the kernels take for a weight [n, k] on a GPU of compute capability
/// `arch`: LIGHTSEQ_SMALL_GEMM_ROWS=16 keeps them to one tile.
fn max_rows(n: usize, k: usize, arch: (i32, i32)) -> usize {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if super::env_equals(&ONE, "LIGHTSEQ_SMALL_GEMM_ROWS", "16")
        || (arch < (9, 0) && n.min(k) > NARROW)
    {
        ONE_TILE
    } else {
        MAX_ROWS
    }
}

/// Whether LIGHTSEQ_SMALL_GEMM_PREFETCH=0 turns off the kernels' L2 prefetch of their
/// weight rows ahead of the wait for the kernel before them.
fn prefetch_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&OFF, "LIGHTSEQ_SMALL_GEMM_PREFETCH", "0")
}

/// `y [m, n] = act(x [m, k] w [n, k]^T + b) + r` (r and b optional) by the few-row kernels,
/// or None where they do not apply: more rows than they take ([`MAX_ROWS`], or
/// [`ONE_TILE`]: see `max_rows`), more than [`MAX_COLS`] columns, k not a multiple of 32,
/// f32, a GPU before sm_80, operands not 16-byte aligned.
pub(crate) fn linear_small(op: &Linear) -> Result<Option<CudaStorage>> {
    let Linear { x, w, m, n, k, .. } = *op;
    let dev = x.device();
    let dt = x.dtype();
    let applies = !disabled()
        && (1..=max_rows(n, k, dev.arch())).contains(&m)
        && (1..=MAX_COLS).contains(&n)
        && k.is_multiple_of(32)
        && k > 0
        && n.max(k) <= i32::MAX as usize / 2
        && matches!(dt, DType::F16 | DType::BF16)
        && dev.arch() >= (8, 0)
        && x.ptr().is_multiple_of(16)
        && w.ptr().is_multiple_of(16);
    if !applies {
        return Ok(None);
    }
    // Columns a block takes: 32 where that still gives every SM a block, else 16.
    let nt = if n.div_ceil(32) >= dev.sm_count() {
        4
    } else {
        2
    };
    // Enough warps that each loads its share of k in about one round.
    let warps = (k / 32).div_ceil(CHUNKS_IN_FLIGHT).clamp(4, MAX_WARPS);
    let tiles = m.div_ceil(16);
    let name = if tiles == 1 {
        format!("linear_small_n{nt}")
    } else {
        format!("linear_small_m2_n{nt}")
    };
    let f = dev.kernel(&name, dt)?;
    let smem = warps * tiles * nt * 4 * 32 * 4;
    // The function's limit is set to what any launch of it may take, so that launches on
    // other threads with fewer warps never lower it under this one.
    super::train_ops::allow_smem(&f, MAX_WARPS * tiles * nt * 4 * 32 * 4)?;
    let y = dev.alloc(dt, m * n)?;
    // Mode 2 reads the first round of w and the bias into registers before the wait for
    // the kernel before (what a decode step's GEMM waits on is x, not its weight): only for
    // buffers no kernel has written since their upload, which no kernel still running can
    // be writing. Mode 1 prefetches w into L2 before the wait, 0 does neither.
    let prefetch = if op.weights_read_early() {
        2
    } else {
        i32::from(!prefetch_off())
    };
    let args = op.args(&y, prefetch);
    let mut l = dev.launch(&f);
    args.push(&mut l);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(8 * nt) as u32, 1, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: argument types match linear_small's signature; x is [m, k], w [n, k], b [n]
    // and r [m, n] of dt (the front ends checked the shapes), and the shared memory is the
    // warps' partial tiles the kernel indexes.
    launched("linear_small", unsafe { l.launch(cfg) })?;
    Ok(Some(y))
}
