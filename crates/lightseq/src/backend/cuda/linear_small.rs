//! Linear layers over few rows (the GEMMs of decode steps) by the kernels of
//! `kernels/linear_small.cu` instead of cuBLASLt: at 32 rows a GEMM is a read of its weight,
//! and the library's kernels for it took 5-10 us where the weight's bytes take 1-2 us.

use super::ops::launched;
use super::CudaStorage;
use crate::error::Result;
use crate::ops::Activation;
use crate::tensor::DType;
use cudarc::driver::LaunchConfig;

/// Rows the kernels take by default where the narrower side of the weight (d_model, in a
/// decode step) is over [`NARROW`]: one 16-row tile. At 1 row, GPT2 and Transformer-base
/// generation ran ~1 ms faster than with cuBLASLt; at GPT2's 32 rows (768 wide) the two-tile
/// kernels lost 4-6% to cuBLASLt on an H200 (inference runs 14 and 15's sessions).
const MAX_ROWS: usize = 16;
/// Rows the kernels take by default where the weight is at most [`NARROW`] on a side: two
/// 16-row tiles, which beat cuBLASLt at Transformer-base's 32 rows (beam 4 at batch 8: 3-5%
/// of the whole generation, four rounds, run 15's session).
const MAX_ROWS_NARROW: usize = 32;
/// The weight side up to which [`MAX_ROWS_NARROW`] applies.
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

/// LIGHTSEQ_SMALL_GEMM_ROWS=16 or 32: the most rows the kernels take, in place of the
/// default by shape.
fn rows_override() -> Option<usize> {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *ROWS.get_or_init(
        || match std::env::var("LIGHTSEQ_SMALL_GEMM_ROWS").as_deref() {
            Ok("16") => Some(MAX_ROWS),
            Ok("32") => Some(MAX_ROWS_NARROW),
            _ => None,
        },
    )
}

/// The most rows the kernels take for a weight [n, k].
fn max_rows(n: usize, k: usize) -> usize {
    rows_override().unwrap_or(if n.min(k) <= NARROW {
        MAX_ROWS_NARROW
    } else {
        MAX_ROWS
    })
}

/// Whether LIGHTSEQ_SMALL_GEMM_PREFETCH=0 turns off the kernels' L2 prefetch of their
/// weight rows ahead of the wait for the kernel before them.
fn prefetch_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&OFF, "LIGHTSEQ_SMALL_GEMM_PREFETCH", "0")
}

/// `y [m, n] = act(x [m, k] w [n, k]^T + b) + r` (r and b optional) by the few-row kernels,
/// or None where they do not apply: more rows than they take (see [`MAX_ROWS`] and
/// [`MAX_ROWS_NARROW`]) or more than [`MAX_COLS`] columns, k not a multiple of 32, f32, a GPU
/// before sm_80, operands not 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_small(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    r: Option<&CudaStorage>,
    act: Activation,
    m: usize,
    n: usize,
    k: usize,
) -> Result<Option<CudaStorage>> {
    let dev = x.device();
    let dt = x.dtype();
    let applies = !disabled()
        && (1..=max_rows(n, k)).contains(&m)
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
    let (xp, wp, bp, rp, yp) = (
        x.ptr(),
        w.ptr(),
        b.map_or(0, |b| b.ptr()),
        r.map_or(0, |r| r.ptr()),
        y.ptr(),
    );
    let (mi, ni, ki, code) = (m as i32, n as i32, k as i32, act.code());
    // Mode 2 reads the first round of w and the bias into registers before the wait for
    // the kernel before (what a decode step's GEMM waits on is x, not its weight): only for
    // buffers no kernel has written since their upload, which no kernel still running can
    // be writing. Mode 1 prefetches w into L2 before the wait, 0 does neither.
    let unchanged = w.uploaded_unchanged() && b.is_none_or(|b| b.uploaded_unchanged());
    let prefetch = if unchanged && !super::early_reads_off() {
        2
    } else {
        i32::from(!prefetch_off())
    };
    let mut l = dev.launch(&f);
    l.arg(&xp).arg(&wp).arg(&bp).arg(&rp).arg(&yp);
    l.arg(&mi).arg(&ni).arg(&ki).arg(&code).arg(&prefetch);
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
