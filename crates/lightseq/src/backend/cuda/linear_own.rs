//! The linears our own kernels take before cuBLASLt: the few-row kernels (linear_small.rs)
//! up to 32 rows, then on sm_90 the warpgroup-MMA kernels: linear_wg.rs up to 128 rows,
//! linear_tiled.rs beyond. All take the same
//! arguments in the same order: x, w, bias, residual, y; m, n, k, the activation code, and
//! what they may read before the wait for the kernel before.

use super::launch::Launch;
use super::CudaStorage;
use crate::error::Result;
use crate::ops::Activation;
use crate::tensor::DType;

/// `y [m, n] = act(x [m, k] w [n, k]^T + b) + r`, b and r optional.
#[derive(Clone, Copy)]
pub(crate) struct Linear<'a> {
    pub x: &'a CudaStorage,
    pub w: &'a CudaStorage,
    pub b: Option<&'a CudaStorage>,
    pub r: Option<&'a CudaStorage>,
    pub act: Activation,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// `op` by our kernels, or None where neither applies (cuBLASLt's then).
pub(crate) fn linear_own(op: &Linear) -> Result<Option<CudaStorage>> {
    if let Some(y) = super::linear_small::linear_small(op)? {
        return Ok(Some(y));
    }
    if let Some(y) = super::linear_wg::linear_wg(op)? {
        return Ok(Some(y));
    }
    super::linear_tiled::linear_tiled(op)
}

/// Columns the warpgroup-MMA kernels take at most: wider outputs (LM heads) are a long read
/// of the weight, which cuBLASLt streams well.
pub(super) const WG_MAX_COLS: usize = 16384;

impl Linear<'_> {
    /// Whether the operands suit the warpgroup-MMA kernels (linear_wg.rs, linear_tiled.rs)
    /// on the GPU: sm_90, f16 or bf16, 1 to [`WG_MAX_COLS`] columns, k a whole number of
    /// 16-byte packs, sizes that index in i32, row blocks of `block_rows` that fit a grid's
    /// y, and every operand 16-byte aligned. Each kernel adds its own limits on rows and k.
    pub(super) fn fits_warpgroup_kernels(&self, block_rows: usize) -> bool {
        let aligned = |p: u64| p.is_multiple_of(16);
        let (m, n, k) = (self.m, self.n, self.k);
        self.x.device().arch() == (9, 0)
            && (1..=WG_MAX_COLS).contains(&n)
            && k > 0
            && k.is_multiple_of(8)
            && m.max(n).max(k) <= i32::MAX as usize / 2
            && m.div_ceil(block_rows) <= u16::MAX as usize
            && matches!(self.x.dtype(), DType::F16 | DType::BF16)
            && aligned(self.x.ptr())
            && aligned(self.w.ptr())
            && self.b.is_none_or(|b| aligned(b.ptr()))
            && self.r.is_none_or(|r| aligned(r.ptr()))
    }

    /// Whether the kernels may read the weight and the bias before their wait (see
    /// [`super::read_early`]).
    pub(super) fn weights_read_early(&self) -> bool {
        super::read_early(&[Some(self.w), self.b])
    }

    /// The kernels' arguments for output `y` and read-ahead mode `mode`.
    pub(super) fn args(&self, y: &CudaStorage, mode: i32) -> LinearArgs {
        LinearArgs {
            ptrs: [
                self.x.ptr(),
                self.w.ptr(),
                self.b.map_or(0, |b| b.ptr()),
                self.r.map_or(0, |r| r.ptr()),
                y.ptr(),
            ],
            ints: [
                self.m as i32,
                self.n as i32,
                self.k as i32,
                self.act.code(),
                mode,
            ],
        }
    }
}

/// A linear kernel's arguments, in its parameters' order.
pub(super) struct LinearArgs {
    /// x, w, bias, residual, y (0 for an absent bias or residual).
    ptrs: [u64; 5],
    /// m, n, k, the activation code, the read-ahead mode.
    ints: [i32; 5],
}

impl LinearArgs {
    /// Appends the arguments to a launch.
    pub(super) fn push<'a>(&'a self, l: &mut Launch<'a>) {
        l.arg(&self.ptrs[0]).arg(&self.ptrs[1]);
        self.push_after_operands(l);
    }

    /// Appends the arguments after x and w (bias, residual, y, then the integers), for a
    /// kernel that takes x and w in another form (linear_tiled.rs: tensor maps).
    pub(super) fn push_after_operands<'a>(&'a self, l: &mut Launch<'a>) {
        for p in &self.ptrs[2..] {
            l.arg(p);
        }
        for i in &self.ints {
            l.arg(i);
        }
    }
}
