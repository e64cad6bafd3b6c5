//! GEMMs of more than 128 rows (long forwards, prefill) on sm_90 by the pipelined
//! warpgroup-MMA kernel of `kernels/linear_wg.cu` (`linear_wgt_m*_n*`). By default it takes
//! the GEMMs whose activation cuBLASLt's epilogues lack (the exact erf GELU of BERT, SiLU,
//! quick GELU, tanh), which then need no activation pass of their own, where its blocks
//! fit one wave of the GPU; cuBLASLt keeps the rest, since the kernel alone reaches about
//! half of the library's rate. With the GELU in its epilogue it is ahead at one wave and
//! behind at more (H200, docs/performance.md: run 27, BERT-base's first FFN GEMM with its
//! GELU 15.7 us against cuBLASLt's 11.3 + 6.2 at 1024 rows; run 31, BERT-base forwards at
//! 12 x 128 0.95 against cuBLASLt's 0.85-0.86 ms, at 32 x 128 1.72-1.74 against
//! 1.69-1.70). `LIGHTSEQ_TILED_GEMM=0` sends every GEMM to cuBLASLt, `=all` every GEMM of
//! more than 128 rows to the kernel (comparisons).
//! The kernel's operands reach it through the tensor memory accelerator: each launch
//! encodes a tensor map of x and one of w (`cuTensorMapEncodeTiled`) and passes them by
//! value.

use super::linear_own::Linear;
use super::ops::{blas_epilogue_has, launched};
use super::CudaStorage;
use crate::error::{Error, Result};
use crate::ops::Activation;
use crate::tensor::DType;
use cudarc::driver::{sys, DeviceRepr, LaunchConfig};

/// Rows a warpgroup takes (LWG_ROWS), and k a stage holds.
const WG_ROWS: usize = 64;
const CHUNK: usize = 64;
/// Bytes the ring of stages may take, and the most stages it has (LWT_RING_BYTES,
/// LWT_MAX_STAGES).
const RING_BYTES: usize = 225 << 10;
const MAX_STAGES: usize = 8;
/// The widths and warpgroups a block the kernel is built for.
const WIDTHS: [usize; 3] = [128, 192, 256];
const WARPGROUPS: [usize; 2] = [2, 1];

/// Which GEMMs of more than 128 rows the kernel takes (LIGHTSEQ_TILED_GEMM).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `0`: none; cuBLASLt takes them.
    Off,
    /// Unset, `1`, or any other value: those whose activation cuBLASLt would run as a pass
    /// of its own.
    Activations,
    /// `all`: every one.
    All,
}

fn mode() -> Mode {
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| mode_from(std::env::var("LIGHTSEQ_TILED_GEMM").ok().as_deref()))
}

/// [`mode`] from the variable's value.
fn mode_from(v: Option<&str>) -> Mode {
    match v.map(str::trim) {
        Some("0") => Mode::Off,
        Some("all") => Mode::All,
        _ => Mode::Activations,
    }
}

/// Waves of blocks up to which the kernel takes the GEMMs of [`Mode::Activations`]
/// (LIGHTSEQ_TILED_GEMM_WAVES): past them cuBLASLt's GEMM and a separate activation pass
/// are shorter (H200, docs/performance.md run 31).
const MAX_WAVES: usize = 1;

/// [`MAX_WAVES`], or LIGHTSEQ_TILED_GEMM_WAVES.
fn max_waves() -> usize {
    static WAVES: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    super::env_count(&WAVES, "LIGHTSEQ_TILED_GEMM_WAVES").unwrap_or(MAX_WAVES)
}

/// The ring of a block of `rows` by `width` (the kernels' LwtRing): its stages, as many as
/// fit `budget` bytes up to `most`, and its bytes, at least the epilogue's f32 tile.
fn ring(rows: usize, width: usize, budget: usize, most: usize) -> (usize, usize) {
    let stage = (rows + width) * CHUNK * 2;
    let stages = (budget / stage).min(most);
    (stages, (stages * stage).max(rows * (width + 4) * 4))
}

/// Bytes of shared memory a block of `wgs` warpgroups and `width` columns takes: its
/// stages (the epilogue's f32 tile and the tile's bias after it reuse them), their
/// barriers, and room to align them to 1024 bytes.
fn smem_bytes(wgs: usize, width: usize) -> usize {
    let (stages, bytes) = ring(WG_ROWS * wgs, width, RING_BYTES, MAX_STAGES);
    bytes + 8 * stages + 1024
}

/// A tensor map (`CUtensorMap`), passed to the kernel by value.
#[repr(C, align(64))]
struct TensorMap([u64; 16]);

// SAFETY: 128 plain bytes, laid out as the kernel's LwtMap parameter (64-byte aligned).
unsafe impl DeviceRepr for TensorMap {}

/// The map of a row-major [rows, k] matrix of `dt` at device address `ptr`, read in boxes
/// of 64 k by `box_rows` rows in the MMA's 128-byte swizzle, zeros past its edges.
/// k must be a multiple of 8 and `ptr` 16-byte aligned.
fn tensor_map(ptr: u64, rows: usize, k: usize, box_rows: usize, dt: DType) -> Result<TensorMap> {
    let kind = match dt {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let dims = [k as u64, rows as u64];
    let strides = [(k * dt.size()) as u64];
    let boxes = [CHUNK as u32, box_rows as u32];
    let steps = [1u32, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: the arrays hold the rank's (2) dimensions, its one stride and its box; the
    // driver writes the map it is given and keeps no pointer.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            kind,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "encoding a tensor map of a [{rows}, {k}] matrix for the tiled GEMM: {r:?}"
        )));
    }
    Ok(TensorMap(map.opaque))
}

/// A launch's block: warpgroups (64 rows each) and columns.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Plan {
    warpgroups: usize,
    width: usize,
}

/// The block for an m x n output: the one whose busiest SM computes the least, counting
/// each block's whole tile (padding included) and weighing narrower MMAs as slower (an
/// n128 MMA reads its A tile once for half the work of an n256 one), and one-warpgroup
/// blocks as a little slower (they copy more bytes a FLOP). Blocks that do not
/// fit `smem` are skipped. LIGHTSEQ_TILED_GEMM_BLOCK=<warpgroups>x<width> asks for one
/// block (for comparisons; one the kernel is not built for is ignored).
fn plan(m: usize, n: usize, sms: usize, smem: usize) -> Option<Plan> {
    static WANT: std::sync::OnceLock<Option<Plan>> = std::sync::OnceLock::new();
    let want = *WANT.get_or_init(|| {
        let v = std::env::var("LIGHTSEQ_TILED_GEMM_BLOCK").ok()?;
        let (a, b) = v.trim().split_once('x')?;
        let p = Plan {
            warpgroups: a.parse().ok()?,
            width: b.parse().ok()?,
        };
        (WARPGROUPS.contains(&p.warpgroups) && WIDTHS.contains(&p.width)).then_some(p)
    });
    plan_with(m, n, sms, smem, want)
}

/// [`plan`] with the block asked for as an argument.
fn plan_with(m: usize, n: usize, sms: usize, smem: usize, want: Option<Plan>) -> Option<Plan> {
    let fits = |p: &Plan| smem_bytes(p.warpgroups, p.width) <= smem;
    if let Some(p) = want {
        return Some(p).filter(fits);
    }
    let cost = |p: &Plan| {
        let rows = WG_ROWS * p.warpgroups;
        let blocks = m.div_ceil(rows) * n.div_ceil(p.width);
        // Relative MMA rate by width, in percent.
        let rate = match p.width {
            128 => 85,
            192 => 95,
            _ => 100,
        } * if p.warpgroups == 1 { 95 } else { 100 };
        blocks.div_ceil(sms) * rows * p.width * 10_000 / rate
    };
    WARPGROUPS
        .iter()
        .flat_map(|&warpgroups| WIDTHS.iter().map(move |&width| Plan { warpgroups, width }))
        .filter(fits)
        // Ties go to the earlier (more warpgroups, narrower) block.
        .min_by_key(cost)
}

/// `y [m, n] = act(x [m, k] w [n, k]^T + b) + r` (r and b optional) by the pipelined
/// warpgroup-MMA kernel, or None where it does not apply: not its GEMM (see [`mode`]),
/// 128 rows or fewer (see linear_wg.rs), or operands the warpgroup kernels do not take
/// ([`Linear::fits_warpgroup_kernels`]: a GPU other than sm_90, more than 16384 columns, k
/// not a multiple of 8, f32, operands not 16-byte aligned).
pub(crate) fn linear_tiled(op: &Linear) -> Result<Option<CudaStorage>> {
    let Linear {
        x,
        w,
        b,
        r,
        m,
        n,
        k,
        ..
    } = *op;
    let dev = x.device();
    let dt = x.dtype();
    let wanted = match mode() {
        Mode::Off => false,
        Mode::Activations => !blas_epilogue_has(op.act, b.is_some(), dt) && r.is_none(),
        Mode::All => true,
    };
    let applies = wanted && m > super::linear_wg::max_rows() && op.fits_warpgroup_kernels(WG_ROWS);
    if !applies {
        return Ok(None);
    }
    let sms = dev.sm_count();
    let Some(Plan { warpgroups, width }) = plan(m, n, sms, dev.smem_per_block()) else {
        return Ok(None);
    };
    let rows = WG_ROWS * warpgroups;
    let blocks = m.div_ceil(rows) * n.div_ceil(width);
    if mode() == Mode::Activations && blocks > max_waves() * sms {
        return Ok(None);
    }
    let smem = smem_bytes(warpgroups, width);
    let f = dev.kernel(&format!("linear_wgt_m{warpgroups}_n{width}"), dt)?;
    super::train_ops::allow_smem(&f, smem)?;
    let map_x = tensor_map(x.ptr(), m, k, rows, dt)?;
    let map_w = tensor_map(w.ptr(), n, k, width, dt)?;
    let y = dev.alloc(dt, m * n)?;
    let args = op.args(&y, i32::from(op.weights_read_early()));
    let mut l = dev.launch(&f);
    l.arg(&map_x).arg(&map_w);
    args.push_after_operands(&mut l);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(width) as u32, m.div_ceil(rows) as u32, 1),
        block_dim: (128 * warpgroups as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: argument types match linear_wgt_m*_n*'s signature (two tensor maps, bias,
    // residual, y, then m, n, k, act, early); the maps cover x [m, k] and w [n, k], b is [n]
    // and r [m, n] of dt (the front ends checked the shapes), all 16-byte aligned; the
    // shared memory holds the block's stages and barriers as the kernel lays them out, and
    // the grid's y (at most u16::MAX blocks) covers m.
    launched("linear_wgt", unsafe { l.launch(cfg) })?;
    Ok(Some(y))
}

/// Block widths of the GEMMs with the layer norm in their epilogue (`linear_wgt_ln_n*`), the
/// blocks a cluster of them has at most (LWL_MAX_CLUSTER), the bytes of their ring and its
/// stages at most (LWL_RING_BYTES, LWL_MAX_STAGES).
const LN_WIDTHS: [usize; 3] = [64, 96, 128];
const LN_MAX_CLUSTER: usize = 8;
const LN_RING_BYTES: usize = 100 << 10;
const LN_MAX_STAGES: usize = 8;

/// Whether [`linear_tiled_layer_norm`] runs: only with LIGHTSEQ_FUSED_LN=1, since it is
/// slower than cuBLASLt's GEMM and the separate layer norm on an H200 (run 28 in
/// docs/performance.md: BERT-base 8 x 128 0.77 against 0.68 ms).
fn fused_ln_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::env_equals(&ON, "LIGHTSEQ_FUSED_LN", "1")
}

/// The blocks a cluster has and their width for rows of `n`: a cluster spans a whole row,
/// and the most blocks win (more of the GPU's SMs at a few hundred rows).
fn ln_plan(n: usize) -> Option<(usize, usize)> {
    (1..=LN_MAX_CLUSTER)
        .rev()
        .find(|&c| n.is_multiple_of(c) && LN_WIDTHS.contains(&(n / c)))
        .map(|c| (c, n / c))
}

/// Bytes of shared memory a block of the layer-norm kernel of `width` columns takes: its
/// ring (which the f32 tile reuses), the ring's barriers, the tile's bias, gamma and beta as
/// f32, the sums the cluster exchanges, and room to align them to 1024 bytes.
fn ln_smem_bytes(width: usize) -> usize {
    let (stages, bytes) = ring(WG_ROWS, width, LN_RING_BYTES, LN_MAX_STAGES);
    (bytes + 8 * stages).next_multiple_of(16)
        + 3 * width * 4
        + 2 * LN_MAX_CLUSTER * WG_ROWS * 4
        + 1024
}

/// `layer_norm(x w^T + b + r)` over rows of n (`op.r` the residual, no activation) by the
/// GEMM with the sum and the layer norm in its epilogue, or None where it does not apply:
/// not asked for ([`fused_ln_on`]), 128 rows or fewer (the few-row kernels and the
/// block-per-row layer norm are shorter there), no cluster of whole blocks spans n
/// ([`ln_plan`]: 1-8 blocks of 64, 96 or 128 columns), or operands the warpgroup kernels do
/// not take.
pub(crate) fn linear_tiled_layer_norm(
    op: &Linear,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    eps: f32,
) -> Result<Option<CudaStorage>> {
    let (x, m, n, k) = (op.x, op.m, op.n, op.k);
    let Some(r) = op.r else {
        return Ok(None);
    };
    let dev = x.device();
    let dt = x.dtype();
    let aligned = [gamma, beta].iter().all(|p| p.ptr().is_multiple_of(16));
    let plan = ln_plan(n).filter(|&(_, width)| ln_smem_bytes(width) <= dev.smem_per_block());
    let applies = fused_ln_on()
        && op.act == Activation::None
        && aligned
        && m > super::linear_wg::max_rows()
        && op.fits_warpgroup_kernels(WG_ROWS);
    let (Some((cluster, width)), true) = (plan, applies) else {
        return Ok(None);
    };
    let smem = ln_smem_bytes(width);
    let f = dev.kernel(&format!("linear_wgt_ln_n{width}"), dt)?;
    super::train_ops::allow_smem(&f, smem)?;
    let map_x = tensor_map(x.ptr(), m, k, WG_ROWS, dt)?;
    let map_w = tensor_map(op.w.ptr(), n, k, width, dt)?;
    let y = dev.alloc(dt, m * n)?;
    let early = i32::from(super::read_early(&[
        Some(op.w),
        op.b,
        Some(gamma),
        Some(beta),
    ]));
    let (bp, rp, gp, tp, yp) = (
        op.b.map_or(0, |b| b.ptr()),
        r.ptr(),
        gamma.ptr(),
        beta.ptr(),
        y.ptr(),
    );
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let mut l = dev.launch(&f);
    l.arg(&map_x).arg(&map_w);
    l.arg(&bp).arg(&rp).arg(&gp).arg(&tp).arg(&yp);
    l.arg(&mi).arg(&ni).arg(&ki).arg(&eps).arg(&early);
    let cfg = LaunchConfig {
        grid_dim: (cluster as u32, m.div_ceil(WG_ROWS) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: argument types match linear_wgt_ln_n*'s signature (two tensor maps, bias,
    // residual, gamma, beta, y, then m, n, k, eps, early); the maps cover x [m, k] and
    // w [n, k], b, gamma and beta are [n] and r [m, n] of dt (the front end checked the
    // shapes), all 16-byte aligned; n is `cluster` blocks of `width` columns, one cluster
    // along x; the shared memory holds what the kernel lays out, and the grid's y (at most
    // u16::MAX blocks) covers m.
    launched("linear_wgt_ln", unsafe {
        l.launch_cluster(cfg, (cluster as u32, 1, 1))
    })?;
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::linear_wg::{H200_SMEM as SMEM, H200_SMS as SMS};
    use super::super::linear_wg::{SMEM_PER_BLOCK_RESERVED, SM_SMEM};

    /// Blocks of `p` an SM holds at once, by shared memory.
    fn resident(p: &Plan) -> usize {
        SM_SMEM / (smem_bytes(p.warpgroups, p.width) + SMEM_PER_BLOCK_RESERVED)
    }

    fn at(warpgroups: usize, width: usize) -> Option<Plan> {
        Some(Plan { warpgroups, width })
    }

    #[test]
    fn activation_gemms_come_here_by_default() {
        assert_eq!(mode_from(None), Mode::Activations);
        assert_eq!(mode_from(Some("1")), Mode::Activations);
        assert_eq!(mode_from(Some("0")), Mode::Off);
        assert_eq!(mode_from(Some(" all ")), Mode::All);
    }

    #[test]
    fn only_activations_cublaslt_lacks_come_here() {
        use Activation::*;
        let lacks = |act, bias| !blas_epilogue_has(act, bias, DType::F16);
        for bias in [false, true] {
            assert!(!lacks(None, bias));
            assert!(!lacks(Relu, bias));
            for act in [Gelu, Silu, QuickGelu, Tanh] {
                assert!(lacks(act, bias), "{act:?}");
            }
        }
        assert!(lacks(GeluTanh, false));
        assert!(!lacks(GeluTanh, true));
        // f32 outputs take the tanh GELU as a pass.
        assert!(!blas_epilogue_has(GeluTanh, true, DType::F32));
    }

    #[test]
    fn layer_norm_clusters_span_whole_rows() {
        // BERT-base, BERT-large, Marian/BART-base, MiniLM: eight blocks where they divide n.
        assert_eq!(ln_plan(768), Some((8, 96)));
        assert_eq!(ln_plan(1024), Some((8, 128)));
        assert_eq!(ln_plan(512), Some((8, 64)));
        assert_eq!(ln_plan(384), Some((6, 64)));
        assert_eq!(ln_plan(640), Some((5, 128)));
        assert_eq!(ln_plan(96), Some((1, 96)));
        // Wider rows, or rows no cluster of whole blocks spans, are not taken.
        for n in [2048, 1000, 48, 770] {
            assert_eq!(ln_plan(n), None, "{n}");
        }
        for n in (8..=2048).step_by(8) {
            if let Some((c, w)) = ln_plan(n) {
                assert_eq!(c * w, n);
                assert!(c <= LN_MAX_CLUSTER && LN_WIDTHS.contains(&w));
            }
        }
        // Every width fits an H200.
        for w in LN_WIDTHS {
            assert!(ln_smem_bytes(w) <= SMEM, "{w}");
        }
    }

    #[test]
    fn every_block_fits_an_h200() {
        for wgs in WARPGROUPS {
            for width in WIDTHS {
                let p = Plan {
                    warpgroups: wgs,
                    width,
                };
                assert!(smem_bytes(wgs, width) <= SMEM, "{p:?}");
                assert!(resident(&p) >= 1, "{p:?}");
                assert_eq!(plan_with(4096, 768, SMS, SMEM, Some(p)), Some(p));
            }
        }
        // A block asked for that does not fit is refused, not launched.
        let big = Plan {
            warpgroups: 2,
            width: 256,
        };
        assert_eq!(plan_with(4096, 768, SMS, 100 << 10, Some(big)), None);
    }

    #[test]
    fn blocks_spread_over_the_sms() {
        // BERT-base at 1024 rows: 768-wide outputs in 96 blocks of 64 x 128, the 2304- and
        // 3072-wide ones in one wave of 128 x 192.
        assert_eq!(plan_with(1024, 768, SMS, SMEM, None), at(1, 128));
        assert_eq!(plan_with(1024, 3072, SMS, SMEM, None), at(2, 192));
        assert_eq!(plan_with(1024, 2304, SMS, SMEM, None), at(2, 192));
        // At 4096 rows: 768 wide in one wave of 128 x 192, 3072 wide in three of 128 x 256.
        assert_eq!(plan_with(4096, 768, SMS, SMEM, None), at(2, 192));
        assert_eq!(plan_with(4096, 3072, SMS, SMEM, None), at(2, 256));
        // tests/ops's shapes take every block the kernel is built for.
        for (m, n, p) in [
            (129, 64, at(1, 128)),
            (1030, 768, at(1, 128)),
            (257, 520, at(1, 128)),
            (1024, 3072, at(2, 192)),
            (2830, 320, at(1, 192)),
            (1024, 2048, at(1, 256)),
            (2830, 576, at(2, 128)),
            (4096, 1024, at(2, 256)),
        ] {
            assert_eq!(plan_with(m, n, SMS, SMEM, None), p, "{m} x {n}");
        }
        // Every plan fits, whatever the shape.
        for m in (129..=8192).step_by(97) {
            for n in (8..=super::super::linear_own::WG_MAX_COLS).step_by(8 * 61) {
                let p = plan_with(m, n, SMS, SMEM, None).unwrap();
                assert!(smem_bytes(p.warpgroups, p.width) <= SMEM, "{m} {n} {p:?}");
            }
        }
    }
}
