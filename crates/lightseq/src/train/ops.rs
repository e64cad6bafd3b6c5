//! Device-dispatching ops of the training path: the GEMMs of the backward passes, the
//! softmax and its backward for attention, layer-norm/activation/embedding backward, the
//! fused label-smoothed cross entropy, the fused Adam(W) step, and Philox dropout.
//!
//! Float tensors on the CPU run in f32; on CUDA in their dtype with f32 accumulation.
//! Parameter gradients (`column_sum`, `layer_norm_backward`'s dgamma/dbeta,
//! `embedding_backward`) are f32 whatever the input dtype: they feed f32 master weights.

use crate::backend::cpu::train as cpu;
pub use crate::backend::cpu::train::AdamHyper;
use crate::backend::cuda::train_ops as cuda;
use crate::backend::GemmStrides;
use crate::error::{Error, Result};
use crate::ops::Activation;
use crate::tensor::{DType, Storage, Tensor};

pub(super) fn float_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let dt = ts[0].dtype();
    let dev = ts[0].cuda_device().map(|d| d.ordinal());
    for t in ts {
        if t.dtype() == DType::I32 {
            return Err(Error::op(op, "expected a float tensor, got i32"));
        }
        if t.dtype() != dt {
            return Err(Error::op(
                op,
                format!("mixed dtypes {dt} and {}", t.dtype()),
            ));
        }
        if t.cuda_device().map(|d| d.ordinal()) != dev {
            return Err(Error::op(op, "tensors are on different devices"));
        }
    }
    Ok(dt)
}

pub(super) fn need(op: &'static str, ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::op(op, what()))
    }
}

fn cpu_out(shape: &[usize], dt: DType, v: Vec<f32>) -> Tensor {
    Tensor::from_parts(shape.to_vec(), dt, Storage::CpuF32(v))
}

pub(super) fn cuda_out(shape: &[usize], dt: DType, s: crate::backend::cuda::CudaStorage) -> Tensor {
    Tensor::from_parts(shape.to_vec(), dt, Storage::Cuda(s))
}

/// Batched GEMM: for each of `batch`, C[m, n] = op(A) @ op(B), where op(A) is A [m, k]
/// (or A^T of A stored [k, m] when `ta`) and op(B) is B [k, n] (or B^T of B stored [n, k]
/// when `tb`). Batches are contiguous. The result has shape `out_shape` (m*n*batch elements).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    const OP: &str = "matmul";
    let dt = float_dtype(OP, &[a, b])?;
    need(
        OP,
        a.len() == batch * m * k
            && b.len() == batch * k * n
            && out_shape.iter().product::<usize>() == batch * m * n,
        || {
            format!(
                "a {:?}, b {:?} and out {out_shape:?} do not fit batch {batch} x [{m}, {k}] @ [{k}, {n}]",
                a.shape(),
                b.shape()
            )
        },
    )?;
    Ok(match (&a.storage, &b.storage) {
        (Storage::CpuF32(av), Storage::CpuF32(bv)) => {
            cpu_out(out_shape, dt, cpu::matmul(av, ta, bv, tb, batch, m, n, k))
        }
        (Storage::Cuda(x), Storage::Cuda(y)) => cuda_out(
            out_shape,
            dt,
            cuda::matmul(x, ta, y, tb, batch, m, n, k, false)?,
        ),
        _ => unreachable!("checked by float_dtype"),
    })
}

/// One operand of [`matmul_strided`]: matrices inside `t`, matrix i starting at element
/// `i * stride`, its rows `ld` elements apart.
#[derive(Clone, Copy)]
pub struct Mats<'a> {
    pub t: &'a Tensor,
    pub ld: usize,
    pub stride: usize,
}

/// [`matmul`] over matrices at arbitrary strides: for i in 0..batch, C_i = op(A_i) @ op(B_i)
/// with A_i and B_i read where `a` and `b` place them, and C_i written from element
/// `i * c_stride` of a new tensor of `out_shape`, rows `c_ld` apart. The C matrices must
/// not overlap and must cover the output (batch * m * n elements). Attention uses it to
/// read heads in place from [tokens, heads * head_dim] activations and to write them back.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    a: Mats,
    ta: bool,
    b: Mats,
    tb: bool,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    c_ld: usize,
    c_stride: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    const OP: &str = "matmul_strided";
    let dt = float_dtype(OP, &[a.t, b.t])?;
    let out_len: usize = out_shape.iter().product();
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    let fits = |x: &Mats, rows: usize, cols: usize| {
        x.ld >= cols && GemmStrides::extent(x.ld, x.stride, batch, rows, cols) <= x.t.len()
    };
    need(
        OP,
        fits(&a, ar, ac)
            && fits(&b, br, bc)
            && c_ld >= n
            && out_len == batch * m * n
            && GemmStrides::extent(c_ld, c_stride, batch, m, n) <= out_len,
        || {
            format!(
                "a {:?} (ld {}, stride {}), b {:?} (ld {}, stride {}) and out {out_shape:?} (ld {c_ld}, stride {c_stride}) do not fit batch {batch} x [{m}, {k}] @ [{k}, {n}]",
                a.t.shape(), a.ld, a.stride, b.t.shape(), b.ld, b.stride
            )
        },
    )?;
    let st = GemmStrides {
        lda: a.ld,
        ldb: b.ld,
        ldc: c_ld,
        batch_a: a.stride,
        batch_b: b.stride,
        batch_c: c_stride,
    };
    Ok(match (&a.t.storage, &b.t.storage) {
        (Storage::CpuF32(av), Storage::CpuF32(bv)) => {
            let mut c = vec![0f32; out_len];
            crate::backend::cpu::matmul_strided(av, ta, bv, tb, batch, m, n, k, &st, &mut c);
            cpu_out(out_shape, dt, c)
        }
        (Storage::Cuda(x), Storage::Cuda(y)) => cuda_out(
            out_shape,
            dt,
            cuda::matmul_strided(x, ta, y, tb, batch, m, n, k, &st, out_len)?,
        ),
        _ => unreachable!("checked by float_dtype"),
    })
}

/// `x @ w^T (+ b) + r`, r of the output's shape: a linear whose output is added to a
/// residual. On CUDA the GEMM reads `r` in its epilogue (no pass of its own, and the
/// linear's output alone is never stored); elsewhere a linear, then an add.
pub fn linear_add(x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_add";
    let mut all = vec![x, w, r];
    all.extend(b);
    let dt = float_dtype(OP, &all)?;
    let (n, k) = match w.shape() {
        &[n, k] => (n, k),
        s => return Err(Error::op(OP, format!("w {s:?} is not 2-D"))),
    };
    let m = x.len() / k.max(1);
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    need(
        OP,
        x.shape().last() == Some(&k)
            && k > 0
            && r.shape() == shape.as_slice()
            && b.is_none_or(|b| b.shape() == [n]),
        || {
            let bias = b.map(|b| b.shape());
            format!(
                "x {:?}, w {:?}, bias {bias:?}, r {:?}",
                x.shape(),
                w.shape(),
                r.shape()
            )
        },
    )?;
    match (&x.storage, &w.storage, &r.storage) {
        (Storage::Cuda(xs), Storage::Cuda(ws), Storage::Cuda(rs)) if k > 0 => {
            let bias = b.map(|b| b.cuda(OP)).transpose()?;
            let y = cuda::linear_add(xs, ws, bias, rs, m, n, k)?;
            Ok(cuda_out(&shape, dt, y))
        }
        _ => crate::ops::add(&crate::ops::linear(x, w, b, Activation::None)?, r),
    }
}

/// The input gradient of `y = x @ w^T`: `dy [..., n] @ w [n, k]` -> [..., k].
pub fn linear_input_grad(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = dy.len() / n.max(1);
    let mut shape = dy.shape().to_vec();
    *shape.last_mut().unwrap() = k;
    matmul(dy, false, w, false, 1, rows, k, n, &shape)
}

/// `acc += dy @ w`: adds the input gradient of `y = x @ w^T` into `acc` (dy's dtype and
/// x's shape; on CUDA the GEMM accumulates into it). `acc` must not share its storage.
pub fn linear_input_grad_into(acc: &mut Tensor, dy: &Tensor, w: &Tensor) -> Result<()> {
    const OP: &str = "linear_input_grad_into";
    float_dtype(OP, &[acc, dy, w])?;
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = dy.len() / n.max(1);
    need(OP, acc.len() == rows * k && dy.len() == rows * n, || {
        format!(
            "acc {:?}, dy {:?}, w {:?}",
            acc.shape(),
            dy.shape(),
            w.shape()
        )
    })?;
    match (&mut acc.storage, &dy.storage, &w.storage) {
        (Storage::Cuda(a), Storage::Cuda(d), Storage::Cuda(ws)) => {
            cuda::input_grad_into(a, d, ws, rows, n, k)
        }
        _ => {
            let g = linear_input_grad(dy, w)?;
            *acc = crate::ops::add(acc, &g)?;
            Ok(())
        }
    }
}

/// The weight gradient of `y = x @ w^T`: dy^T @ x over all rows, [n, k].
pub fn linear_weight_grad(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let n = dy.shape().last().copied().unwrap_or(1);
    let k = x.shape().last().copied().unwrap_or(1);
    let rows = dy.len() / n.max(1);
    matmul(dy, true, x, false, 1, n, k, rows, &[n, k])
}

/// [`linear_weight_grad_into`] with dy the column block [col, col + n) of `dy_wide`
/// [rows, w], read in place (on CUDA; on the CPU only the whole of dy_wide, col 0 and
/// n = w: packed gradients come from the fused attention). On CUDA an overwritten `acc`
/// may also be in dy's dtype: the GEMM then writes the gradient rounded to it, as PyTorch
/// AMP's weight gradients are.
pub fn linear_weight_grad_cols_into(
    acc: &mut Tensor,
    bias_acc: Option<&mut Tensor>,
    (dy_wide, col, n): (&Tensor, usize, usize),
    x: &Tensor,
    overwrite: bool,
) -> Result<()> {
    const OP: &str = "linear_weight_grad_cols_into";
    float_dtype(OP, &[dy_wide, x])?;
    let w = dy_wide.shape().last().copied().unwrap_or(1);
    let k = x.shape().last().copied().unwrap_or(1);
    let rows = dy_wide.len() / w.max(1);
    // An overwritten gradient may be kept in dy's dtype (on CUDA, the GEMM's output).
    let narrow_ok =
        overwrite && acc.dtype() == dy_wide.dtype() && matches!(acc.storage, Storage::Cuda(_));
    need(
        OP,
        col + n <= w
            && (acc.dtype() == DType::F32 || narrow_ok)
            && acc.len() == n * k
            && x.len() == rows * k
            && bias_acc
                .as_ref()
                .is_none_or(|b| b.dtype() == DType::F32 && b.len() == n),
        || {
            format!(
                "acc {:?}, columns {col}..{} of dy {:?}, x {:?}",
                acc.shape(),
                col + n,
                dy_wide.shape(),
                x.shape()
            )
        },
    )?;
    let mut all = vec![dy_wide, &*acc, x];
    all.extend(bias_acc.as_deref());
    crate::ops::same_device(OP, &all)?;
    if let (Storage::Cuda(a), Storage::Cuda(d), Storage::Cuda(xs)) =
        (&acc.storage, &dy_wide.storage, &x.storage)
    {
        let b = bias_acc.map(|b| b.cuda(OP)).transpose()?;
        return cuda::weight_grad_into((a, overwrite), b, (d, col), xs, rows, n, k, w);
    }
    if col != 0 || n != w {
        return Err(Error::op(
            OP,
            "column blocks of a gradient are read on CUDA only",
        ));
    }
    let g = linear_weight_grad(dy_wide, x)?;
    if overwrite {
        *acc = crate::ops::zeros(acc.shape(), DType::F32, &acc.device())?;
    }
    add_scaled_into(acc, &g, 1.0)?;
    match bias_acc {
        Some(b) => add_scaled_into(b, &column_sum(dy_wide)?, 1.0),
        None => Ok(()),
    }
}

/// `acc += dy^T @ x` over all rows (`acc = dy^T @ x` with `overwrite`, when acc's values
/// are stale): accumulates the weight gradient of `y = x @ w^T` into f32 `acc [n, k]` (on
/// CUDA the GEMM writes into it directly, and an overwritten `acc` may be in dy's dtype:
/// see [`linear_weight_grad_cols_into`]); with `bias_acc`, also adds the bias gradient
/// (dy's column sums) into f32 `bias_acc [n]` (on CUDA a column reduction that adds into
/// it).
pub fn linear_weight_grad_into(
    acc: &mut Tensor,
    bias_acc: Option<&mut Tensor>,
    dy: &Tensor,
    x: &Tensor,
    overwrite: bool,
) -> Result<()> {
    let n = dy.shape().last().copied().unwrap_or(1);
    linear_weight_grad_cols_into(acc, bias_acc, (dy, 0, n), x, overwrite)
}

/// Dropout of attention probabilities in the fused attention: (rate, seed, Philox offset),
/// the mask [`dropout`] would draw at that offset over the [batch, heads, lq, lk]
/// probabilities.
pub type AttentionDrop = (f32, u64, u64);

/// q, k and v for the fused attention: three tensors (q [lq, batch, heads * d], k and v
/// [lk, batch, heads * d]); one projection's output [len, batch, 3 * heads * d] holding
/// q, k and v as column blocks (self-attention); or q and one output [lk, batch, 2 * heads
/// * d] holding k and v (cross attention). The kernels read the blocks in place.
#[derive(Clone, Copy)]
pub enum Qkv<'a> {
    Separate(&'a Tensor, &'a Tensor, &'a Tensor),
    Packed(&'a Tensor),
    PackedKv(&'a Tensor, &'a Tensor),
}

impl<'a> Qkv<'a> {
    /// (lq, lk, batch, q's width), when the shapes are position-major.
    pub fn dims(&self) -> Option<(usize, usize, usize, usize)> {
        match self {
            Qkv::Separate(q, k, _) => {
                let (qs, ks) = (q.shape(), k.shape());
                (qs.len() == 3 && ks.len() == 3).then(|| (qs[0], ks[0], qs[1], qs[2]))
            }
            Qkv::Packed(t) => {
                let s = t.shape();
                (s.len() == 3 && s[2] % 3 == 0).then(|| (s[0], s[0], s[1], s[2] / 3))
            }
            Qkv::PackedKv(q, kv) => {
                let (qs, ks) = (q.shape(), kv.shape());
                (qs.len() == 3 && ks.len() == 3).then(|| (qs[0], ks[0], qs[1], qs[2]))
            }
        }
    }

    fn layout(&self) -> cuda::QkvLayout {
        match self {
            Qkv::Separate(..) => cuda::QkvLayout::Separate,
            Qkv::Packed(_) => cuda::QkvLayout::Packed,
            Qkv::PackedKv(..) => cuda::QkvLayout::PackedKv,
        }
    }

    fn tensors(&self) -> Vec<&'a Tensor> {
        match *self {
            Qkv::Separate(q, k, v) => vec![q, k, v],
            Qkv::Packed(t) => vec![t],
            Qkv::PackedKv(q, kv) => vec![q, kv],
        }
    }

    /// Whether [`short_attention`] runs for these inputs (CUDA, f16/bf16, sm_80+, both
    /// lengths at most 64, head_dim a multiple of 16 up to 128, within 96 KiB of shared
    /// memory: all of it up to head_dim 64).
    pub fn fits(&self, heads: usize) -> bool {
        let Storage::Cuda(s) = &self.tensors()[0].storage else {
            return false;
        };
        if self.tensors().iter().any(|t| t.cuda_device().is_none()) {
            return false;
        }
        let Some((lq, lk, _, h)) = self.dims() else {
            return false;
        };
        if heads == 0 || h % heads != 0 {
            return false;
        }
        cuda::short_attention_smem(s.device(), s.dtype(), lq, lk, h / heads, true).is_some()
    }

    /// The kernels' view of q, k and v; the shapes are checked.
    fn blocks(
        &self,
        op: &'static str,
    ) -> Result<(
        cuda::HeadBlock<'a>,
        cuda::HeadBlock<'a>,
        cuda::HeadBlock<'a>,
    )> {
        let (_, lk, b, h) = self
            .dims()
            .ok_or_else(|| Error::op(op, "q, k and v must be [len, batch, width]"))?;
        let block = |t: &'a Tensor, col, w| -> Result<cuda::HeadBlock<'a>> {
            Ok(cuda::HeadBlock {
                s: t.cuda(op)?,
                col,
                w,
            })
        };
        match *self {
            Qkv::Separate(q, k, v) => {
                need(
                    op,
                    k.shape() == [lk, b, h] && v.shape() == [lk, b, h],
                    || format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()),
                )?;
                Ok((block(q, 0, h)?, block(k, 0, h)?, block(v, 0, h)?))
            }
            Qkv::Packed(t) => Ok((
                block(t, 0, 3 * h)?,
                block(t, h, 3 * h)?,
                block(t, 2 * h, 3 * h)?,
            )),
            Qkv::PackedKv(q, kv) => {
                need(op, kv.shape() == [lk, b, 2 * h], || {
                    format!("q {:?}, kv {:?}", q.shape(), kv.shape())
                })?;
                Ok((block(q, 0, h)?, block(kv, 0, 2 * h)?, block(kv, h, 2 * h)?))
            }
        }
    }
}

/// Whether [`short_attention`] runs for q [lq, batch, heads * d] and k [lk, batch, heads * d]
/// (see [`Qkv::fits`]).
pub fn short_attention_fits(q: &Tensor, k: &Tensor, heads: usize) -> bool {
    Qkv::Separate(q, k, k).fits(heads)
}

/// Fused multi-head attention for short sequences, one pass over q, k and v (position-major,
/// see [`Qkv`]): ctx [lq, batch, heads * d], as `masked_softmax` of the scaled scores with
/// `key_lens` and `causal`, then dropout, then the product with v. None where [`Qkv::fits`]
/// is false. The probabilities are not kept: [`short_attention_backward`] computes them
/// again from q, k and the same mask.
#[allow(clippy::too_many_arguments)]
pub fn short_attention(
    qkv: Qkv,
    heads: usize,
    scale: f32,
    key_lens: Option<&Tensor>,
    causal: bool,
    drop: Option<AttentionDrop>,
) -> Result<Option<Tensor>> {
    const OP: &str = "short_attention";
    if !qkv.fits(heads) {
        return Ok(None);
    }
    float_dtype(OP, &qkv.tensors())?;
    let blocks = qkv.blocks(OP)?;
    let (lq, lk, b, h) = qkv.dims().expect("checked by fits");
    let kl = key_lens_arg(OP, key_lens, b)?;
    let Some(ctx) = cuda::short_attention_forward(
        blocks,
        kl,
        (b, heads, lq, lk, h / heads),
        scale,
        causal,
        drop,
    )?
    else {
        return Ok(None);
    };
    let dt = qkv.tensors()[0].dtype();
    Ok(Some(cuda_out(&[lq, b, h], dt, ctx)))
}

/// The fused attention's key lengths: i32 [batch] on the device, checked.
fn key_lens_arg<'a>(
    op: &'static str,
    key_lens: Option<&'a Tensor>,
    batch: usize,
) -> Result<Option<&'a crate::backend::cuda::CudaStorage>> {
    if let Some(kl) = key_lens {
        need(
            op,
            kl.dtype() == DType::I32 && kl.shape() == [batch],
            || format!("key lengths {:?}, expected i32 [{batch}]", kl.shape()),
        )?;
    }
    key_lens.map(|k| k.cuda(op)).transpose()
}

/// Gradients of q, k and v, laid out as the inputs were ([`Qkv`]). (One per attention
/// layer and step: boxing the larger variant would only add an allocation.)
#[allow(clippy::large_enum_variant)]
pub enum QkvGrads {
    Separate(Tensor, Tensor, Tensor),
    Packed(Tensor),
    /// dq, and dk and dv as the column blocks of one [lk, batch, 2 h] gradient.
    PackedKv(Tensor, Tensor),
}

impl QkvGrads {
    /// (dq, dk, dv) for separate inputs; None for packed ones.
    pub fn separate(self) -> Option<(Tensor, Tensor, Tensor)> {
        match self {
            QkvGrads::Separate(dq, dk, dv) => Some((dq, dk, dv)),
            QkvGrads::Packed(_) | QkvGrads::PackedKv(..) => None,
        }
    }
}

/// The backward of [`short_attention`] from dctx [lq, batch, heads * d]: the gradients of
/// q, k and v in their inputs' layout; None where it does not apply. `key_lens`, `causal`,
/// `scale` and `drop` are the forward's. With `bias_sums`, also partial column sums of dq,
/// dk and dv, f32 [rows, 3 heads d] (dq's columns, dk's, dv's; summed over the kernel's rows
/// before rounding): their column sums are the three projections' bias gradients.
pub fn short_attention_backward(
    qkv: Qkv,
    dctx: &Tensor,
    heads: usize,
    scale: f32,
    (key_lens, causal): (Option<&Tensor>, bool),
    drop: Option<AttentionDrop>,
    bias_sums: bool,
) -> Result<Option<(QkvGrads, Option<Tensor>)>> {
    const OP: &str = "short_attention_backward";
    if !qkv.fits(heads) {
        return Ok(None);
    }
    let mut all = qkv.tensors();
    all.push(dctx);
    float_dtype(OP, &all)?;
    let blocks = qkv.blocks(OP)?;
    let (lq, lk, b, h) = qkv.dims().expect("checked by fits");
    need(OP, dctx.shape() == [lq, b, h], || {
        format!("dctx {:?}, expected [{lq}, {b}, {h}]", dctx.shape())
    })?;
    let kl = key_lens_arg(OP, key_lens, b)?;
    let Some((grads, sums)) = cuda::short_attention_backward(
        blocks,
        qkv.layout(),
        kl,
        dctx.cuda(OP)?,
        (b, heads, lq, lk, h / heads),
        scale,
        causal,
        drop,
        bias_sums,
    )?
    else {
        return Ok(None);
    };
    let dt = dctx.dtype();
    let sums = sums.map(|s| cuda_out(&[s.rows, 3 * h], DType::F32, s.sums));
    let grads = match grads {
        cuda::AttnGrads::Separate(dq, dk, dv) => QkvGrads::Separate(
            cuda_out(&[lq, b, h], dt, dq),
            cuda_out(&[lk, b, h], dt, dk),
            cuda_out(&[lk, b, h], dt, dv),
        ),
        cuda::AttnGrads::Packed(g) => QkvGrads::Packed(cuda_out(&[lq, b, 3 * h], dt, g)),
        cuda::AttnGrads::PackedKv(dq, dkv) => QkvGrads::PackedKv(
            cuda_out(&[lq, b, h], dt, dq),
            cuda_out(&[lk, b, 2 * h], dt, dkv),
        ),
    };
    Ok(Some((grads, sums)))
}

/// `parts` stacked along their first dimension (same dtype, device and trailing dims).
pub fn concat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "concat_rows";
    let first = parts.first().ok_or_else(|| Error::op(OP, "no parts"))?;
    need(OP, !first.shape().is_empty(), || "scalar parts".to_string())?;
    let tail = &first.shape()[1..];
    need(
        OP,
        parts.iter().all(|p| {
            p.shape().len() == first.shape().len()
                && &p.shape()[1..] == tail
                && p.dtype() == first.dtype()
        }),
        || {
            format!(
                "parts {:?}",
                parts.iter().map(|p| p.shape()).collect::<Vec<_>>()
            )
        },
    )?;
    let mut shape = first.shape().to_vec();
    shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
    let dt = first.dtype();
    match &first.storage {
        Storage::Cuda(_) => {
            let st: Vec<_> = parts.iter().map(|p| p.cuda(OP)).collect::<Result<_>>()?;
            Ok(cuda_out(&shape, dt, cuda::concat(&st)?))
        }
        _ => {
            let mut v = Vec::new();
            for p in parts {
                v.extend(p.to_f32_vec()?);
            }
            Ok(cpu_out(&shape, dt, v))
        }
    }
}

/// [a, b, c, d] -> [a, c, b, d] (heads to the front and back).
pub fn transpose_12(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose_12";
    let s = x.shape();
    need(OP, s.len() == 4, || format!("expected 4 dims, got {s:?}"))?;
    let (a, b, c, d) = (s[0], s[1], s[2], s[3]);
    let dt = x.dtype();
    let shape = [a, c, b, d];
    Ok(match &x.storage {
        Storage::CpuF32(v) => cpu_out(&shape, dt, cpu::transpose_12(v, a, b, c, d)),
        Storage::Cuda(v) => cuda_out(&shape, dt, cuda::transpose_12(v, a, b, c, d)?),
        Storage::CpuI32(_) => return Err(Error::op(OP, "expected a float tensor")),
    })
}

/// Softmax over the last dim of `scale * s`, s [batch, heads, lq, lk]; keys at or past
/// `key_lens[b]` (i32 [batch]) and, when `causal`, keys after the query are masked.
/// Rows with every key masked come out as zeros.
pub fn masked_softmax(
    s: &Tensor,
    key_lens: Option<&Tensor>,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    const OP: &str = "masked_softmax";
    let dt = float_dtype(OP, &[s])?;
    let sh = s.shape();
    need(OP, sh.len() == 4, || format!("expected 4 dims, got {sh:?}"))?;
    let (batch, heads, lq, lk) = (sh[0], sh[1], sh[2], sh[3]);
    if let Some(kl) = key_lens {
        need(
            OP,
            kl.dtype() == DType::I32 && kl.shape() == [batch],
            || {
                format!(
                    "key lengths {:?} {}, expected i32 [{batch}]",
                    kl.shape(),
                    kl.dtype()
                )
            },
        )?;
    }
    Ok(match &s.storage {
        Storage::CpuF32(v) => {
            let kl = key_lens.map(|k| k.cpu_i32(OP)).transpose()?;
            cpu_out(
                sh,
                dt,
                cpu::masked_softmax(v, kl, heads, lq, lk, scale, causal),
            )
        }
        Storage::Cuda(v) => {
            let kl = key_lens.map(|k| k.cuda(OP)).transpose()?;
            cuda_out(
                sh,
                dt,
                cuda::masked_softmax(v, kl, heads, lq, lk, scale, causal)?,
            )
        }
        Storage::CpuI32(_) => unreachable!(),
    })
}

/// Gradient of `masked_softmax` at its input: `scale * P * (dP - rowsum(P * dP))`.
pub fn softmax_backward(p: &Tensor, dp: &Tensor, scale: f32) -> Result<Tensor> {
    const OP: &str = "softmax_backward";
    let dt = float_dtype(OP, &[p, dp])?;
    need(OP, p.shape() == dp.shape(), || {
        format!("{:?} != {:?}", p.shape(), dp.shape())
    })?;
    let cols = p.shape().last().copied().unwrap_or(1);
    Ok(match (&p.storage, &dp.storage) {
        (Storage::CpuF32(a), Storage::CpuF32(b)) => {
            cpu_out(p.shape(), dt, cpu::softmax_backward(a, b, cols, scale))
        }
        (Storage::Cuda(a), Storage::Cuda(b)) => cuda_out(
            p.shape(),
            dt,
            cuda::softmax_backward(a, b, p.len() / cols.max(1), cols, scale)?,
        ),
        _ => unreachable!(),
    })
}

/// Layer norm over the last dim of `s = x + y` (y optional), returning `s` (when `y` is
/// given: the layer norm's input, which its backward needs) and the normalized output.
/// One fused pass on CUDA.
pub fn add_layer_norm(
    x: &Tensor,
    y: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Option<Tensor>, Tensor)> {
    let f = add_layer_norm_stats(x, y, gamma, beta, eps, false)?;
    Ok((f.sum, f.out))
}

/// What [`add_layer_norm_stats`] returns.
pub struct LnForward {
    /// `x + y`, when y was given.
    pub sum: Option<Tensor>,
    pub out: Tensor,
    /// Each row's (mean, rstd), f32 [rows, 2], when asked for and the CUDA kernel that
    /// keeps them ran; [`layer_norm_backward_into`] then reads them instead of computing
    /// them again.
    pub stats: Option<Tensor>,
}

/// [`add_layer_norm`], keeping each row's statistics for the backward when `want_stats`.
pub fn add_layer_norm_stats(
    x: &Tensor,
    y: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    want_stats: bool,
) -> Result<LnForward> {
    const OP: &str = "add_layer_norm";
    let mut all = vec![x, gamma, beta];
    all.extend(y);
    let dt = float_dtype(OP, &all)?;
    let h = x.shape().last().copied().unwrap_or(1);
    need(
        OP,
        gamma.shape() == [h] && beta.shape() == [h] && y.is_none_or(|y| y.shape() == x.shape()),
        || {
            format!(
                "x {:?}, y {:?}, gamma {:?}",
                x.shape(),
                y.map(|y| y.shape()),
                gamma.shape()
            )
        },
    )?;
    let rows = x.len() / h.max(1);
    Ok(match (&x.storage, &gamma.storage, &beta.storage) {
        (Storage::CpuF32(xv), Storage::CpuF32(g), Storage::CpuF32(b)) => {
            let yv = y.map(|y| y.cpu_f32(OP)).transpose()?;
            let (s, out) = cpu::add_layer_norm(xv, yv, g, b, rows, h, eps);
            LnForward {
                sum: s.map(|s| cpu_out(x.shape(), dt, s)),
                out: cpu_out(x.shape(), dt, out),
                stats: None,
            }
        }
        (Storage::Cuda(xv), Storage::Cuda(g), Storage::Cuda(b)) => {
            let yv = y.map(|y| y.cuda(OP)).transpose()?;
            let (s, out, st) =
                cuda::add_layer_norm(xv, yv, g, b, rows, h, eps, (true, want_stats))?;
            LnForward {
                sum: s.map(|s| cuda_out(x.shape(), dt, s)),
                out: cuda_out(x.shape(), dt, out),
                stats: st.map(|st| cuda_out(&[rows, 2], DType::F32, st)),
            }
        }
        _ => unreachable!(),
    })
}

/// [`layer_norm_backward`] adding dgamma and dbeta into the f32 accumulators `dg_acc` and
/// `db_acc` [h] (on CUDA the reduction adds into them directly); returns dx. With `dx_acc`,
/// the column sums of dx go into it too: the bias gradient of a linear whose output (plus a
/// residual) was normalized, summed on CUDA in the same pass. `stats` are the forward's
/// ([`LnForward::stats`] of this `x`); without them the statistics are computed again.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_into(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f32,
    dg_acc: &mut Tensor,
    db_acc: &mut Tensor,
    dx_acc: Option<&mut Tensor>,
    stats: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "layer_norm_backward_into";
    let dt = float_dtype(OP, &[x, gamma, dy])?;
    let h = x.shape().last().copied().unwrap_or(1);
    let rows = x.len() / h.max(1);
    let acc_ok = |a: &Tensor| a.dtype() == DType::F32 && a.len() == h;
    if let Some(s) = stats {
        crate::ops::same_device(OP, &[x, s])?;
    }
    let stats_ok = stats.is_none_or(|s| s.dtype() == DType::F32 && s.len() == 2 * rows);
    need(
        OP,
        gamma.shape() == [h]
            && dy.shape() == x.shape()
            && acc_ok(dg_acc)
            && acc_ok(db_acc)
            && dx_acc.as_deref().is_none_or(acc_ok)
            && stats_ok,
        || {
            format!(
                "x {:?}, gamma {:?}, dy {:?}, accumulators {:?} {:?} {:?}",
                x.shape(),
                gamma.shape(),
                dy.shape(),
                dg_acc.shape(),
                db_acc.shape(),
                dx_acc.as_deref().map(Tensor::shape)
            )
        },
    )?;
    match (
        &x.storage,
        &gamma.storage,
        &dy.storage,
        &dg_acc.storage,
        &db_acc.storage,
        dx_acc.as_deref().map(|a| &a.storage),
    ) {
        (
            Storage::Cuda(xv),
            Storage::Cuda(g),
            Storage::Cuda(d),
            Storage::Cuda(ga),
            Storage::Cuda(ba),
            None | Some(Storage::Cuda(_)),
        ) => {
            let da = match dx_acc.as_deref().map(|a| &a.storage) {
                Some(Storage::Cuda(da)) => Some(da),
                _ => None,
            };
            let st = match stats.map(|s| &s.storage) {
                Some(Storage::Cuda(st)) => Some(st),
                _ => None,
            };
            let sums = (ga, ba, da);
            let dx = cuda::layer_norm_backward(xv, g, d, st, rows, h, eps, sums, true)?;
            Ok(cuda_out(x.shape(), dt, dx))
        }
        _ => {
            let (dx, dg, db) = layer_norm_backward(x, gamma, dy, eps)?;
            add_scaled_into(dg_acc, &dg, 1.0)?;
            add_scaled_into(db_acc, &db, 1.0)?;
            if let Some(acc) = dx_acc {
                add_scaled_into(acc, &column_sum(&dx)?, 1.0)?;
            }
            Ok(dx)
        }
    }
}

/// Backward of `layer_norm(x)` over the last dim: (dx, dgamma f32, dbeta f32).
pub fn layer_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm_backward";
    let dt = float_dtype(OP, &[x, gamma, dy])?;
    let h = x.shape().last().copied().unwrap_or(1);
    need(OP, gamma.shape() == [h] && dy.shape() == x.shape(), || {
        format!(
            "x {:?}, gamma {:?}, dy {:?}",
            x.shape(),
            gamma.shape(),
            dy.shape()
        )
    })?;
    let rows = x.len() / h.max(1);
    Ok(match (&x.storage, &gamma.storage, &dy.storage) {
        (Storage::CpuF32(xv), Storage::CpuF32(g), Storage::CpuF32(d)) => {
            let (dx, dg, db) = cpu::layer_norm_backward(xv, g, d, rows, h, eps);
            (
                cpu_out(x.shape(), dt, dx),
                cpu_out(&[h], DType::F32, dg),
                cpu_out(&[h], DType::F32, db),
            )
        }
        (Storage::Cuda(xv), Storage::Cuda(g), Storage::Cuda(d)) => {
            let dev = xv.device();
            let (dg, db) = (dev.alloc(DType::F32, h)?, dev.alloc(DType::F32, h)?);
            let dx =
                cuda::layer_norm_backward(xv, g, d, None, rows, h, eps, (&dg, &db, None), false)?;
            (
                cuda_out(x.shape(), dt, dx),
                cuda_out(&[h], DType::F32, dg),
                cuda_out(&[h], DType::F32, db),
            )
        }
        _ => unreachable!(),
    })
}

/// `act(x)` element-wise.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    const OP: &str = "activate";
    let dt = float_dtype(OP, &[x])?;
    Ok(match &x.storage {
        Storage::CpuF32(v) => cpu_out(x.shape(), dt, cpu::activate(v, act)),
        Storage::Cuda(v) => cuda_out(x.shape(), dt, cuda::activate(v, act)?),
        Storage::CpuI32(_) => unreachable!(),
    })
}

/// `dy * act'(pre)` element-wise.
pub fn activation_backward(pre: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
    const OP: &str = "activation_backward";
    let dt = float_dtype(OP, &[pre, dy])?;
    need(OP, pre.shape() == dy.shape(), || {
        format!("{:?} != {:?}", pre.shape(), dy.shape())
    })?;
    Ok(match (&pre.storage, &dy.storage) {
        (Storage::CpuF32(a), Storage::CpuF32(b)) => {
            cpu_out(pre.shape(), dt, cpu::activation_backward(a, b, act))
        }
        (Storage::Cuda(a), Storage::Cuda(b)) => {
            cuda_out(pre.shape(), dt, cuda::activation_backward(a, b, act)?)
        }
        _ => unreachable!(),
    })
}

/// [`activation_backward`] with the column sums of its result (the bias gradient of the
/// linear that produced `pre`) added to the f32 `bias_acc` [cols]: on CUDA one pass where
/// the shapes allow, otherwise the two ops.
pub fn activation_backward_bias_into(
    pre: &Tensor,
    dy: &Tensor,
    act: Activation,
    bias_acc: &mut Tensor,
) -> Result<Tensor> {
    const OP: &str = "activation_backward_bias_into";
    let dt = float_dtype(OP, &[pre, dy])?;
    let cols = pre.shape().last().copied().unwrap_or(1);
    need(
        OP,
        pre.shape() == dy.shape() && bias_acc.dtype() == DType::F32 && bias_acc.len() == cols,
        || {
            format!(
                "pre {:?}, dy {:?}, bias acc {:?} {}",
                pre.shape(),
                dy.shape(),
                bias_acc.shape(),
                bias_acc.dtype()
            )
        },
    )?;
    crate::ops::same_device(OP, &[pre, bias_acc])?;
    if let (Storage::Cuda(p), Storage::Cuda(d), Storage::Cuda(b)) =
        (&pre.storage, &dy.storage, &bias_acc.storage)
    {
        let rows = pre.len() / cols.max(1);
        let dx = match cuda::activation_backward_colsum(p, d, act, (rows, cols), b)? {
            Some(dx) => dx,
            None => {
                let dx = cuda::activation_backward(p, d, act)?;
                cuda::column_sum_into(b, (&dx, 0), rows, cols, cols)?;
                dx
            }
        };
        return Ok(cuda_out(pre.shape(), dt, dx));
    }
    let dx = activation_backward(pre, dy, act)?;
    add_scaled_into(bias_acc, &column_sum(&dx)?, 1.0)?;
    Ok(dx)
}

/// Sum over all rows of the last dim: the bias gradient, f32 [cols].
pub fn column_sum(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "column_sum";
    float_dtype(OP, &[x])?;
    let cols = x.shape().last().copied().unwrap_or(1);
    let rows = x.len() / cols.max(1);
    Ok(match &x.storage {
        Storage::CpuF32(v) => cpu_out(&[cols], DType::F32, cpu::column_sum(v, rows, cols)),
        Storage::Cuda(v) => cuda_out(&[cols], DType::F32, cuda::column_sum(v, rows, cols)?),
        Storage::CpuI32(_) => unreachable!(),
    })
}

/// `accs[i] += column sums of x's column block i`, for x [.., accs.len() * n] and up to three
/// f32 accumulators [n]: the bias gradients of projections whose outputs are packed, in one
/// pass over x.
pub fn column_sum_parts_into(accs: &mut [&mut Tensor], x: &Tensor) -> Result<()> {
    const OP: &str = "column_sum_parts_into";
    float_dtype(OP, &[x])?;
    let parts = accs.len();
    let w = x.shape().last().copied().unwrap_or(1);
    let n = w / parts.max(1);
    need(
        OP,
        (1..=3).contains(&parts)
            && n * parts == w
            && accs.iter().all(|a| a.dtype() == DType::F32 && a.len() == n),
        || {
            let shapes: Vec<_> = accs.iter().map(|a| a.shape().to_vec()).collect();
            format!("x {:?}, accumulators {shapes:?}", x.shape())
        },
    )?;
    let mut all = vec![x];
    all.extend(accs.iter().map(|a| &**a));
    crate::ops::same_device(OP, &all)?;
    if let Storage::Cuda(xs) = &x.storage {
        let outs: Vec<_> = accs.iter().map(|a| a.cuda(OP)).collect::<Result<_>>()?;
        return cuda::column_sum_parts_into(&outs, xs, x.len() / w.max(1), n, w);
    }
    let sums = column_sum(x)?.to_f32_vec()?;
    for (i, acc) in accs.iter_mut().enumerate() {
        let part = Tensor::from_f32(&sums[i * n..(i + 1) * n], &[n], DType::F32, &acc.device())?;
        add_scaled_into(acc, &part, 1.0)?;
    }
    Ok(())
}

/// Gradient of a table [vocab, h] under `out[i] = scale * table[ids[i]]`; f32. Negative or
/// out-of-range ids contribute nothing.
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, vocab: usize, scale: f32) -> Result<Tensor> {
    const OP: &str = "embedding_backward";
    float_dtype(OP, &[dy])?;
    crate::ops::same_device(OP, &[ids, dy])?;
    let h = dy.shape().last().copied().unwrap_or(1);
    need(
        OP,
        ids.dtype() == DType::I32 && ids.len() * h == dy.len(),
        || format!("ids {:?} {}, dy {:?}", ids.shape(), ids.dtype(), dy.shape()),
    )?;
    Ok(match &dy.storage {
        Storage::CpuF32(d) => cpu_out(
            &[vocab, h],
            DType::F32,
            cpu::embedding_backward(ids.cpu_i32(OP)?, d, h, vocab, scale),
        ),
        Storage::Cuda(d) => cuda_out(
            &[vocab, h],
            DType::F32,
            cuda::embedding_backward(ids.cuda(OP)?, d, ids.len(), h, vocab, scale)?,
        ),
        Storage::CpuI32(_) => unreachable!(),
    })
}

/// [`embedding_backward`] added into the f32 accumulator `acc [vocab, h]` (on CUDA the
/// kernel adds into it directly, without a zeroed table and an add pass).
pub fn embedding_backward_into(
    acc: &mut Tensor,
    ids: &Tensor,
    dy: &Tensor,
    scale: f32,
) -> Result<()> {
    const OP: &str = "embedding_backward_into";
    float_dtype(OP, &[dy])?;
    let h = dy.shape().last().copied().unwrap_or(1);
    let vocab = acc.len() / h.max(1);
    need(
        OP,
        acc.dtype() == DType::F32 && acc.len() == vocab * h,
        || format!("acc {:?}, dy {:?}", acc.shape(), dy.shape()),
    )?;
    match (&acc.storage, &dy.storage) {
        (Storage::Cuda(a), Storage::Cuda(d)) => {
            need(
                OP,
                ids.dtype() == DType::I32 && ids.len() * h == dy.len(),
                || format!("ids {:?} {}, dy {:?}", ids.shape(), ids.dtype(), dy.shape()),
            )?;
            if ids.cuda_device().map(|d| d.ordinal()) != Some(d.device().ordinal())
                || a.device().ordinal() != d.device().ordinal()
            {
                return Err(Error::op(OP, "tensors are on different devices"));
            }
            cuda::embedding_backward_into(a, ids.cuda(OP)?, d, ids.len(), h, vocab, scale)
        }
        _ => {
            let g = embedding_backward(ids, dy, vocab, scale)?;
            add_scaled_into(acc, &g, 1.0)
        }
    }
}

/// The fused label-smoothed cross entropy of `logits [n, vocab]` against i32 `targets [n]`
/// (negative = ignored): per-row loss and nll (f32 [n]) and `grad_scale * d loss/d logits`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    eps: f32,
    grad_scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "cross_entropy";
    let dt = float_dtype(OP, &[logits])?;
    let vocab = logits.shape().last().copied().unwrap_or(1);
    let n = logits.len() / vocab.max(1);
    need(
        OP,
        targets.dtype() == DType::I32 && targets.len() == n,
        || format!("logits {:?}, targets {:?}", logits.shape(), targets.shape()),
    )?;
    Ok(match &logits.storage {
        Storage::CpuF32(l) => {
            let t = targets.cpu_i32(OP)?;
            if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab && t >= 0) {
                return Err(Error::op(
                    OP,
                    format!("target {bad} outside a vocabulary of {vocab}"),
                ));
            }
            let (loss, nll, d) = cpu::cross_entropy(l, t, vocab, eps, grad_scale);
            (
                cpu_out(&[n], DType::F32, loss),
                cpu_out(&[n], DType::F32, nll),
                cpu_out(logits.shape(), dt, d),
            )
        }
        Storage::Cuda(l) => {
            // Targets were checked against the vocabulary by the callers that build them
            // (the trainer); the kernel marks any out-of-range row with NaN instead of
            // reading past the row.
            let (loss, nll, d) =
                cuda::cross_entropy(l, targets.cuda(OP)?, n, vocab, vocab, eps, grad_scale)?;
            (
                cuda_out(&[n], DType::F32, loss),
                cuda_out(&[n], DType::F32, nll),
                cuda_out(logits.shape(), dt, d),
            )
        }
        Storage::CpuI32(_) => unreachable!(),
    })
}

/// Whether `grad` is kept in the dtype of the parameter's CUDA compute copy (a weight
/// gradient as its GEMM wrote it; see `Params::weight_grads`).
fn grad_in_copy(grad: &Tensor, copy: Option<&Tensor>) -> bool {
    matches!(grad.storage, Storage::Cuda(_)) && copy.is_some_and(|c| c.dtype() == grad.dtype())
}

/// Checks one Adam step's tensors: f32 `param`, `grad`, `m`, `v` of one size on one
/// device (on CUDA `grad` may be in `copy`'s dtype instead), and `copy` (if any) a float
/// tensor of that size on the same device.
fn check_adam(
    op: &'static str,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    copy: Option<&Tensor>,
) -> Result<()> {
    if let Some(c) = copy {
        let same_device =
            c.cuda_device().map(|d| d.ordinal()) == param.cuda_device().map(|d| d.ordinal());
        need(
            op,
            c.len() == param.len() && c.dtype() != DType::I32 && same_device,
            || {
                format!(
                    "expected a float copy of {} elements on the parameter's device",
                    param.len()
                )
            },
        )?;
    }
    for t in [param, grad, m, v] {
        need(
            op,
            t.len() == param.len()
                && (t.dtype() == DType::F32 || (std::ptr::eq(t, grad) && grad_in_copy(grad, copy))),
            || {
                format!(
                    "expected f32 tensors of {} elements (the gradient may be in the dtype of \
                     the parameter's CUDA copy)",
                    param.len()
                )
            },
        )?;
    }
    // The gradient's dtype may differ (checked above); its device may not.
    float_dtype(op, &[grad])?;
    crate::ops::same_device(op, &[param, grad])?;
    float_dtype(op, &[param, m, v]).map(|_| ())
}

/// One fused Adam(W) step on f32 `param` with `grad` (f32, or on CUDA in `copy`'s dtype)
/// and moments `m`, `v`, in place;
/// `copy` (a tensor of param's size in another float dtype), when given, receives the new
/// values rounded to its dtype in the same pass.
pub fn adam_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    copy: Option<&mut Tensor>,
    h: &AdamHyper,
) -> Result<()> {
    check_adam("adam_step", param, grad, m, v, copy.as_deref())?;
    match (
        &mut param.storage,
        &grad.storage,
        &mut m.storage,
        &mut v.storage,
    ) {
        (Storage::CpuF32(p), Storage::CpuF32(g), Storage::CpuF32(mv), Storage::CpuF32(vv)) => {
            cpu::adam_step(p, g, mv, vv, h);
        }
        (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(mv), Storage::Cuda(vv)) => {
            if let Some(Storage::Cuda(c)) = copy.as_ref().map(|c| &c.storage) {
                return cuda::adam_step(p, g, mv, vv, Some(c), h);
            }
            cuda::adam_step(p, g, mv, vv, None, h)?;
        }
        _ => unreachable!(),
    }
    if let Some(c) = copy {
        *c = crate::ops::to_dtype(param, c.dtype())?;
    }
    Ok(())
}

/// One parameter's tensors for [`adam_step_all`]: as [`adam_step`]'s arguments, with the
/// parameter's own bias-correction step.
pub struct AdamSlot<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
    pub copy: Option<&'a mut Tensor>,
    pub step: u64,
}

/// [`adam_step`] on every slot (`h.step` is replaced by each slot's step); on CUDA in one
/// launch over all of them.
pub fn adam_step_all(slots: &mut [AdamSlot], h: &AdamHyper) -> Result<()> {
    let all_cuda = slots.iter().all(|s| {
        [&*s.param, s.grad, &*s.m, &*s.v]
            .into_iter()
            .chain(s.copy.as_deref())
            .all(|t| matches!(t.storage, Storage::Cuda(_)))
    });
    if !all_cuda || slots.is_empty() {
        for s in slots.iter_mut() {
            let hp = AdamHyper { step: s.step, ..*h };
            adam_step(s.param, s.grad, s.m, s.v, s.copy.as_deref_mut(), &hp)?;
        }
        return Ok(());
    }
    const OP: &str = "adam_step_all";
    let dev = slots[0].param.cuda_device().map(|d| d.ordinal());
    for s in slots.iter() {
        check_adam(OP, s.param, s.grad, s.m, s.v, s.copy.as_deref())?;
        need(
            OP,
            s.param.cuda_device().map(|d| d.ordinal()) == dev,
            || "parameters on different devices".into(),
        )?;
    }
    fn st(t: &Tensor) -> &crate::backend::cuda::CudaStorage {
        match &t.storage {
            Storage::Cuda(c) => c,
            _ => unreachable!("checked above"),
        }
    }
    let views: Vec<cuda::AdamBufs> = slots
        .iter()
        .map(|s| cuda::AdamBufs {
            param: st(s.param),
            grad: st(s.grad),
            m: st(s.m),
            v: st(s.v),
            copy: s.copy.as_deref().map(st),
            step: s.step,
        })
        .collect();
    cuda::adam_step_many(&views, h)
}

/// Sum of squares of all elements, in f64.
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    const OP: &str = "sum_squares";
    float_dtype(OP, &[x])?;
    match &x.storage {
        Storage::CpuF32(v) => Ok(cpu::sum_squares(v)),
        Storage::Cuda(v) => cuda::sum_squares(v),
        Storage::CpuI32(_) => unreachable!(),
    }
}

/// Sum of squares over all elements of all `xs` (one host round trip on CUDA).
pub fn sum_squares_all(xs: &[&Tensor]) -> Result<f64> {
    const OP: &str = "sum_squares_all";
    if xs.is_empty() {
        return Ok(0.0);
    }
    // Float tensors of any dtypes (gradients may be f32 or in the compute dtype).
    for x in xs {
        float_dtype(OP, &[x])?;
    }
    crate::ops::same_device(OP, xs)?;
    if xs[0].cuda_device().is_some() {
        let s: Vec<&crate::backend::cuda::CudaStorage> =
            xs.iter().map(|x| x.cuda(OP)).collect::<Result<_>>()?;
        return cuda::sum_squares_many(&s);
    }
    xs.iter().map(|x| sum_squares(x)).sum()
}

/// Inverted dropout with rate `p`; the mask is Philox(seed, offset, element index), so
/// calling it again with the output gradient and the same (seed, offset) is its backward.
pub fn dropout(x: &Tensor, p: f32, seed: u64, offset: u64) -> Result<Tensor> {
    const OP: &str = "dropout";
    let dt = float_dtype(OP, &[x])?;
    need(OP, (0.0..1.0).contains(&p), || {
        format!("rate {p} outside [0, 1)")
    })?;
    Ok(match &x.storage {
        Storage::CpuF32(v) => cpu_out(x.shape(), dt, cpu::dropout(v, p, seed, offset)),
        Storage::Cuda(v) => cuda_out(x.shape(), dt, cuda::dropout(v, p, seed, offset)?),
        Storage::CpuI32(_) => unreachable!(),
    })
}

/// `acc = src[offset..offset + acc.len()]`, or `acc +=` it unless `overwrite`; both f32,
/// or overwriting on CUDA, both of one dtype (a block of a gradient computed for several
/// parameters at once).
pub fn add_range_into(
    acc: &mut Tensor,
    src: &Tensor,
    offset: usize,
    overwrite: bool,
) -> Result<()> {
    const OP: &str = "add_range_into";
    crate::ops::same_device(OP, &[acc, src])?;
    // f32 into f32, or (overwriting, on CUDA) a copy in the source's dtype.
    let same_dtype_copy =
        overwrite && acc.dtype() == src.dtype() && matches!(acc.storage, Storage::Cuda(_));
    need(
        OP,
        ((acc.dtype() == DType::F32 && src.dtype() == DType::F32) || same_dtype_copy)
            && offset
                .checked_add(acc.len())
                .is_some_and(|end| end <= src.len()),
        || {
            format!(
                "acc {:?} {} from element {offset} of {:?} {}",
                acc.shape(),
                acc.dtype(),
                src.shape(),
                src.dtype()
            )
        },
    )?;
    match (&mut acc.storage, &src.storage) {
        (Storage::CpuF32(a), Storage::CpuF32(s)) => {
            let s = &s[offset..offset + a.len()];
            if overwrite {
                a.copy_from_slice(s);
            } else {
                cpu::add_scaled_into(a, s, 1.0);
            }
        }
        (Storage::Cuda(a), Storage::Cuda(s)) => cuda::add_range_into(a, s, offset, overwrite)?,
        _ => return Err(Error::op(OP, "tensors are on different devices")),
    }
    Ok(())
}

/// `acc += alpha * x`; acc is f32, x any float dtype of the same element count.
pub fn add_scaled_into(acc: &mut Tensor, x: &Tensor, alpha: f32) -> Result<()> {
    const OP: &str = "add_scaled_into";
    crate::ops::same_device(OP, &[acc, x])?;
    need(
        OP,
        acc.dtype() == DType::F32 && acc.len() == x.len() && x.dtype() != DType::I32,
        || {
            format!(
                "acc {:?} {} and x {:?} {}",
                acc.shape(),
                acc.dtype(),
                x.shape(),
                x.dtype()
            )
        },
    )?;
    match (&mut acc.storage, &x.storage) {
        (Storage::CpuF32(a), Storage::CpuF32(b)) => cpu::add_scaled_into(a, b, alpha),
        (Storage::Cuda(a), Storage::Cuda(b)) => cuda::add_scaled_into(a, b, alpha)?,
        _ => return Err(Error::op(OP, "tensors are on different devices")),
    }
    Ok(())
}
