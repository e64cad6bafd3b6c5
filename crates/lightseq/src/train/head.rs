//! The LM head's GEMMs and loss over logits whose rows are padded: on CUDA each row of the
//! logits (and of their gradient) is `vocab` rounded up to 8 elements long, so every GEMM of
//! the head keeps 16-byte-aligned rows. cuBLASLt's fast Hopper kernels need them;
//! vocabularies such as BERT's 30522 or GPT2's 50257 otherwise fall back to kernels at a
//! third of the rate. On the CPU rows are not padded.

use super::ops::{cuda_out, float_dtype, need};
use crate::backend::cuda::train_ops as cuda;
use crate::error::Result;
use crate::ops::{self, Activation};
use crate::tensor::{DType, Storage, Tensor};

/// Logits (or their gradient) [rows, ld] of which the first `vocab` columns of each row are
/// meaningful.
pub struct HeadLogits {
    pub t: Tensor,
    pub vocab: usize,
}

impl HeadLogits {
    fn ld(&self) -> usize {
        self.t.shape().last().copied().unwrap_or(1)
    }

    fn rows(&self) -> usize {
        self.t.len() / self.ld().max(1)
    }
}

/// `x [rows, k] @ w [vocab, k]^T (+ b)`.
pub fn logits(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<HeadLogits> {
    const OP: &str = "head_logits";
    let dt = float_dtype(OP, &[x, w])?;
    let (vocab, k) = (w.shape()[0], w.shape()[1]);
    let rows = x.len() / k.max(1);
    need(
        OP,
        x.len() == rows * k && b.is_none_or(|b| b.len() == vocab),
        || format!("x {:?}, w {:?}", x.shape(), w.shape()),
    )?;
    let (Storage::Cuda(xs), Storage::Cuda(ws)) = (&x.storage, &w.storage) else {
        let t = ops::linear(x, w, b, Activation::None)?;
        return Ok(HeadLogits { t, vocab });
    };
    let bs = b.map(|b| b.cuda(OP)).transpose()?;
    let ld = vocab.next_multiple_of(8);
    let y = cuda::linear_ld(xs, ws, bs, rows, vocab, k, ld)?;
    Ok(HeadLogits {
        t: cuda_out(&[rows, ld], dt, y),
        vocab,
    })
}

/// Label-smoothed cross entropy against `targets` [rows] (i32, -1: ignored): per-row loss
/// and nll (f32), and the logits' gradient times `grad_scale` in the logits' layout.
pub fn cross_entropy(
    logits: &HeadLogits,
    targets: &Tensor,
    eps: f32,
    grad_scale: f32,
) -> Result<(Tensor, Tensor, HeadLogits)> {
    const OP: &str = "head_cross_entropy";
    let (rows, ld, vocab) = (logits.rows(), logits.ld(), logits.vocab);
    let Storage::Cuda(l) = &logits.t.storage else {
        let (loss, nll, d) = super::ops::cross_entropy(&logits.t, targets, eps, grad_scale)?;
        return Ok((loss, nll, HeadLogits { t: d, vocab }));
    };
    need(
        OP,
        targets.dtype() == DType::I32 && targets.len() == rows,
        || {
            format!(
                "logits {:?}, targets {:?}",
                logits.t.shape(),
                targets.shape()
            )
        },
    )?;
    let dt = logits.t.dtype();
    let (loss, nll, d) =
        cuda::cross_entropy(l, targets.cuda(OP)?, rows, vocab, ld, eps, grad_scale)?;
    Ok((
        cuda_out(&[rows], DType::F32, loss),
        cuda_out(&[rows], DType::F32, nll),
        HeadLogits {
            t: cuda_out(&[rows, ld], dt, d),
            vocab,
        },
    ))
}

/// The head's parameter gradients from the logits' gradient `d`: adds `d^T @ x` into the
/// weight's f32 gradient `wg` [vocab, k] (writes it there with `overwrite`, where on CUDA
/// `wg` may also be in d's dtype) and, with `bg`, adds d's column sums into the bias's.
pub fn weight_grad_into(
    wg: &mut Tensor,
    bg: Option<&mut Tensor>,
    x: &Tensor,
    d: &HeadLogits,
    overwrite: bool,
) -> Result<()> {
    // The vocabulary's columns of the padded rows (all of them on the CPU).
    super::ops::linear_weight_grad_cols_into(wg, bg, (&d.t, 0, d.vocab), x, overwrite)
}

/// The head's input gradient `d @ w` [rows, k] (w [vocab, k]).
pub fn input_grad(d: &HeadLogits, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "head_input_grad";
    let (rows, ld, vocab) = (d.rows(), d.ld(), d.vocab);
    let k = w.shape().last().copied().unwrap_or(1);
    need(OP, w.len() == vocab * k && d.t.dtype() == w.dtype(), || {
        format!("d {:?}, w {:?}", d.t.shape(), w.shape())
    })?;
    let (Storage::Cuda(ds), Storage::Cuda(ws)) = (&d.t.storage, &w.storage) else {
        return super::ops::linear_input_grad(&d.t, w);
    };
    let dev = ds.device();
    let dx = if vocab == 0 {
        dev.zeros(d.t.dtype(), rows * k)?
    } else {
        dev.alloc(d.t.dtype(), rows * k)?
    };
    cuda::input_grad_ld(&dx, 0.0, ds, ld, ws, rows, vocab, k)?;
    Ok(cuda_out(&[rows, k], d.t.dtype(), dx))
}
