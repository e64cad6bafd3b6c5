//! GEMMs of 33-128 rows (batched decode steps, short forwards) on sm_90 by
//! `kernels/linear_wg.cu` (Hopper's warpgroup MMA) instead of cuBLASLt. Alone, a launch
//! is no faster than the library's (H200, ncu, Transformer-base's GEMMs at 128 rows:
//! 5.8-8.5 us against 5.0-7.0), but the kernel takes part in programmatic dependent
//! launch, which cuBLASLt's do not: it reads its weight before waiting for the kernel
//! before, and lets the kernel after start while it runs. In a decode step that made
//! Transformer-base's beam search at batch 32 4-7% faster (docs/performance.md, run 24).
//! The kernel splits k over a thread-block cluster, so that each block's loads are few
//! and all in flight at once.

use super::linear_own::Linear;
use super::ops::launched;
use super::CudaStorage;
use crate::error::Result;
use cudarc::driver::LaunchConfig;

/// Rows the kernel takes by default.
const MAX_ROWS: usize = 128;
/// Rows of a block's tile (LWG_ROWS).
const BLOCK_ROWS: usize = 64;
/// Chunks of 64 k a block takes at most.
const MAX_CHUNKS: usize = 8;
/// Blocks a cluster has at most (k is split over them).
const MAX_SPLIT: usize = 8;
/// Shared memory an sm_90 SM has for blocks, and what the driver keeps of it a block.
pub(super) const SM_SMEM: usize = 228 << 10;
pub(super) const SMEM_PER_BLOCK_RESERVED: usize = 1 << 10;

/// Whether LIGHTSEQ_WG_GEMM=0 sends these GEMMs to cuBLASLt.
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&OFF, "LIGHTSEQ_WG_GEMM", "0")
}

/// The most rows the kernel takes (LIGHTSEQ_WG_GEMM_ROWS, for comparisons).
pub(super) fn max_rows() -> usize {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    super::env_count(&ROWS, "LIGHTSEQ_WG_GEMM_ROWS").unwrap_or(MAX_ROWS)
}

/// Bytes of shared memory a block of width `bn` takes for `per` chunks: its tiles or the
/// partial tile that reuses them, the slices received from the cluster, its barrier, and
/// room to align the tiles to 1024 bytes.
fn smem_bytes(bn: usize, per: usize) -> usize {
    let red = BLOCK_ROWS * (bn + 4) * 4;
    (per * (BLOCK_ROWS + bn) * 128).max(red) + red + 16 + 1024
}

/// A launch's shape: the block width and the blocks a cluster splits k over.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Plan {
    width: usize,
    split: usize,
}

/// The blocks a cluster splits k of `chunks` chunks of 64 over: one for up to two chunks,
/// two for up to four, four for up to sixteen (k <= 1024), eight beyond, so that a block
/// takes two chunks, or three to four in fours, or up to eight in eights. H200, over a
/// generation at 128 rows: k = 512 (8 chunks) in fours beat pairs (Transformer-base
/// 32 x 32, run 24), k = 1024 (16) in fours beat eights (Transformer-big 32 x 32,
/// 15.56-15.59 ms against 15.89-16.11, run 25), and k = 2048 (32) in eights beat fours
/// (Transformer-base 32 x 32, 10.98-11.01 against 11.25).
fn default_split(chunks: usize) -> usize {
    match chunks {
        0..=2 => 1,
        3..=4 => 2,
        5..=16 => 4,
        _ => MAX_SPLIT,
    }
}

/// The widths the kernel is built for (BN), and the one taken unless another is asked for.
const WIDTHS: [usize; 4] = [8, 16, 32, 64];
const DEFAULT_WIDTH: usize = 32;

/// The plan for n columns, `row_blocks` blocks of rows and k of `chunks` chunks, with the
/// width and split LIGHTSEQ_WG_GEMM_COLS and LIGHTSEQ_WG_GEMM_SPLIT ask for (for
/// comparisons; a width the kernel is not built for is ignored); see [`plan_with`].
fn plan(n: usize, row_blocks: usize, chunks: usize, sms: usize, smem: usize) -> Option<Plan> {
    static COLS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    static SPLIT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let want_cols = super::env_count(&COLS, "LIGHTSEQ_WG_GEMM_COLS").filter(|c| WIDTHS.contains(c));
    let want_split = super::env_count(&SPLIT, "LIGHTSEQ_WG_GEMM_SPLIT");
    plan_with(n, row_blocks, chunks, sms, smem, want_cols, want_split)
}

/// The plan: 32 columns a block (or `want_cols`), k split by [`default_split`] (or over
/// `want_split` blocks, rounded down to a power of two); None where it does not fit (more
/// than [`MAX_CHUNKS`] chunks or `smem` bytes a block, or more blocks than the GPU holds at
/// once), and cuBLASLt takes the GEMM. H200, over generations and
/// forwards: 32 columns in clusters of 4 (two chunks a block) beat 8 or 16 columns unsplit
/// at Transformer-base's 128 rows (8.2 us a launch at 512 x 512, generation +7-12%) and 64
/// columns in clusters of 8 (run 24). Narrower blocks never fit where 32 columns do not:
/// halving the width doubles the blocks and less than doubles the blocks an SM holds. With
/// 64 columns tried where 32 did not fit, the 2304- and 3072-wide GEMMs of BERT-base at 128
/// rows took 64-column blocks in fours and its forward went from 0.45 ms to 0.52 (run 25,
/// together with the 768 x 768 GEMMs' split going from eight to four), so a block takes 64
/// columns only when asked.
fn plan_with(
    n: usize,
    row_blocks: usize,
    chunks: usize,
    sms: usize,
    smem: usize,
    want_cols: Option<usize>,
    want_split: Option<usize>,
) -> Option<Plan> {
    let split = want_split.map_or_else(|| default_split(chunks), |s| 1 << s.min(MAX_SPLIT).ilog2());
    let per = chunks.div_ceil(split);
    let fits = |width: usize| {
        let bytes = smem_bytes(width, per);
        let blocks = n.div_ceil(width) * row_blocks * split;
        per <= MAX_CHUNKS
            && bytes <= smem
            && blocks <= SM_SMEM / (bytes + SMEM_PER_BLOCK_RESERVED) * sms
    };
    let width = want_cols.unwrap_or(DEFAULT_WIDTH);
    fits(width).then_some(Plan { width, split })
}

/// `y [m, n] = act(x [m, k] w [n, k]^T + b) + r` (r and b optional) by the warpgroup-MMA
/// kernel, or None where it does not apply: more rows than it takes ([`MAX_ROWS`]), k over
/// what its blocks hold (see [`plan_with`]), or operands the warpgroup kernels do not take
/// ([`Linear::fits_warpgroup_kernels`]: a GPU other than sm_90, more than 16384 columns, k
/// not a multiple of 8, f32, operands not 16-byte aligned).
pub(crate) fn linear_wg(op: &Linear) -> Result<Option<CudaStorage>> {
    let Linear { x, m, n, k, .. } = *op;
    let dev = x.device();
    let dt = x.dtype();
    let applies =
        !disabled() && (1..=max_rows()).contains(&m) && op.fits_warpgroup_kernels(BLOCK_ROWS);
    if !applies {
        return Ok(None);
    }
    let row_blocks = m.div_ceil(BLOCK_ROWS);
    let chunks = k.div_ceil(64);
    let smem_max = dev.smem_per_block();
    let Some(Plan { width, split }) = plan(n, row_blocks, chunks, dev.sm_count(), smem_max) else {
        return Ok(None);
    };
    let smem = smem_bytes(width, chunks.div_ceil(split));
    let f = dev.kernel(&format!("linear_wg_n{width}"), dt)?;
    // The function's limit is set to what any launch of it may take, so that launches on
    // other threads never lower it under this one.
    let most = (1..=MAX_CHUNKS)
        .map(|per| smem_bytes(width, per))
        .filter(|&b| b <= smem_max)
        .max()
        .unwrap_or(smem);
    super::train_ops::allow_smem(&f, most)?;
    let y = dev.alloc(dt, m * n)?;
    // The weight and the bias are read before the wait for the kernel before only where no
    // kernel that may still be running writes them (see linear_small.rs).
    let args = op.args(&y, i32::from(op.weights_read_early()));
    let mut l = dev.launch(&f);
    args.push(&mut l);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(width) as u32, row_blocks as u32, split as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: argument types match linear_wg_n*'s signature; x is [m, k], w [n, k], b [n]
    // and r [m, n] of dt (the front ends checked the shapes), all 16-byte aligned; the
    // shared memory holds the block's tiles as the kernel lays them out, and the grid is
    // whole clusters of `split` along z.
    launched("linear_wg", unsafe {
        l.launch_cluster(cfg, (1, 1, split as u32))
    })?;
    Ok(Some(y))
}

/// An H200's SMs and the shared memory a block may opt into, for the launch plans' tests
/// (here and in linear_tiled.rs).
#[cfg(test)]
pub(super) const H200_SMS: usize = 132;
#[cfg(test)]
pub(super) const H200_SMEM: usize = 227 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use super::{H200_SMEM as SMEM, H200_SMS as SMS};

    fn default_plan(n: usize, rows: usize, k: usize) -> Option<Plan> {
        plan_with(
            n,
            rows.div_ceil(BLOCK_ROWS),
            k.div_ceil(64),
            SMS,
            SMEM,
            None,
            None,
        )
    }

    #[test]
    fn plans_fit_the_gpu_at_once() {
        for rows in [1usize, 33, 64, 100, 128] {
            for chunks in 1..=72 {
                for n in (8..=16384)
                    .step_by(8 * 37)
                    .chain([512, 768, 1024, 2304, 3072])
                {
                    for want_cols in [None, Some(8), Some(16), Some(32), Some(64)] {
                        for want_split in [None, Some(1), Some(3), Some(8)] {
                            let row_blocks = rows.div_ceil(BLOCK_ROWS);
                            let Some(p) =
                                plan_with(n, row_blocks, chunks, SMS, SMEM, want_cols, want_split)
                            else {
                                continue;
                            };
                            let per = chunks.div_ceil(p.split);
                            let bytes = smem_bytes(p.width, per);
                            let blocks = n.div_ceil(p.width) * row_blocks * p.split;
                            let resident = SM_SMEM / (bytes + SMEM_PER_BLOCK_RESERVED) * SMS;
                            assert!(want_cols.is_none_or(|c| c == p.width), "{p:?}");
                            assert!(want_cols.is_some() || p.width == DEFAULT_WIDTH, "{p:?}");
                            assert!(p.split.is_power_of_two() && p.split <= MAX_SPLIT, "{p:?}");
                            assert!(per <= MAX_CHUNKS && bytes <= SMEM, "{p:?} {chunks}");
                            assert!(blocks <= resident, "{p:?} n {n} rows {rows} {chunks}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_by_chunks() {
        for chunks in 1..=80 {
            let s = default_split(chunks);
            let want = if chunks <= 2 {
                1
            } else if chunks <= 4 {
                2
            } else if chunks <= 16 {
                4
            } else {
                8
            };
            assert_eq!(s, want, "{chunks} chunks");
        }
        // k over 4096 leaves a block more than it holds: cuBLASLt's.
        assert_eq!(
            default_plan(512, 128, 4096),
            Some(Plan {
                width: 32,
                split: 8
            })
        );
        assert_eq!(default_plan(512, 128, 4160), None);
        // A split asked for is rounded down to a power of two.
        assert_eq!(
            plan_with(512, 2, 8, SMS, SMEM, None, Some(3)).map(|p| p.split),
            Some(2)
        );
    }

    #[test]
    fn measured_shapes_take_the_measured_plans() {
        let on = |width, split| Some(Plan { width, split });
        // Transformer-base's decode GEMMs at 128 rows (run 24).
        assert_eq!(default_plan(1536, 128, 512), on(32, 4));
        assert_eq!(default_plan(512, 128, 512), on(32, 4));
        assert_eq!(default_plan(2048, 128, 512), on(32, 4));
        assert_eq!(default_plan(512, 128, 2048), on(32, 8));
        // Transformer-big's 1024 x 1024 GEMMs in fours; its QKV and FFN GEMMs to cuBLASLt.
        assert_eq!(default_plan(1024, 128, 1024), on(32, 4));
        assert_eq!(default_plan(3072, 128, 1024), None);
        assert_eq!(default_plan(4096, 128, 1024), None);
        assert_eq!(default_plan(1024, 128, 4096), None);
        // BERT-base at 128 rows: the 2304- and 3072-wide GEMMs to cuBLASLt (64-column blocks
        // lost there, run 25); at 64 rows every GEMM on 32 columns.
        assert_eq!(default_plan(2304, 128, 768), None);
        assert_eq!(default_plan(3072, 128, 768), None);
        assert_eq!(default_plan(768, 128, 768), on(32, 4));
        assert_eq!(default_plan(2304, 64, 768), on(32, 4));
        assert_eq!(default_plan(3072, 64, 768), on(32, 4));
        assert_eq!(default_plan(768, 64, 3072), on(32, 8));
    }
}
