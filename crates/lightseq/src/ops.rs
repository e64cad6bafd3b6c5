//! The op set: each op checks shapes and dtypes once here, then runs its CPU body
//! (`backend::cpu`) or its CUDA body (`backend::cuda`) on the tensors' device.

use crate::backend::{cpu, cuda};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

/// Element-wise activation applied after a linear layer's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// GELU with the exact erf form (HF `gelu`).
    Gelu,
    /// GELU's tanh approximation (HF `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// max(x, 0).
    Relu,
    /// x * sigmoid(x) (HF `silu`, `swish`).
    Silu,
    /// x * sigmoid(1.702 x) (HF `quick_gelu`).
    QuickGelu,
}

impl Activation {
    /// Maps a Hugging Face activation name to an [`Activation`].
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            other => {
                return Err(Error::Input(format!(
                    "unsupported activation `{other}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish, quick_gelu)"
                )))
            }
        })
    }

    /// Index shared with the CUDA kernels' `act` argument.
    pub(crate) fn code(self) -> i32 {
        match self {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::Relu => 3,
            Activation::Silu => 4,
            Activation::QuickGelu => 5,
        }
    }

    /// Scalar definition, the reference for every backend.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
            Activation::GeluTanh => {
                let c = (2.0f32 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        }
    }
}

pub(crate) fn erf(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}

fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let first = ts[0].cuda_device().map(|d| d.ordinal());
    for t in &ts[1..] {
        if t.cuda_device().map(|d| d.ordinal()) != first {
            return Err(Error::op(op, "tensors are on different devices"));
        }
    }
    Ok(())
}

fn same_float_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let dt = ts[0].dtype();
    if dt == DType::I32 {
        return Err(Error::op(op, "expected a float tensor, got i32"));
    }
    for t in &ts[1..] {
        if t.dtype() != dt {
            return Err(Error::op(
                op,
                format!("mixed dtypes {} and {}", dt, t.dtype()),
            ));
        }
    }
    Ok(dt)
}

fn last_dim(t: &Tensor) -> usize {
    t.shape().last().copied().unwrap_or(1)
}

/// `x @ w^T + b`, then `act`. x: [..., in], w: [out, in], b: [out] -> [..., out].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    const OP: &str = "linear";
    let mut all = vec![x, w];
    all.extend(b);
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &all)?;
    if w.shape().len() != 2 || x.shape().is_empty() {
        return Err(Error::op(
            OP,
            format!("x {:?}, w {:?}", x.shape(), w.shape()),
        ));
    }
    let (n_out, k) = (w.shape()[0], w.shape()[1]);
    if last_dim(x) != k {
        return Err(Error::op(
            OP,
            format!("x {:?} does not match w {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = b {
        if b.shape() != [n_out] {
            return Err(Error::op(
                OP,
                format!("bias {:?}, expected [{n_out}]", b.shape()),
            ));
        }
    }
    let m = x.len() / k.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n_out;
    let storage = match &x.storage {
        Storage::CpuF32(xv) => Storage::CpuF32(cpu::linear(
            xv,
            w.cpu_f32(OP)?,
            b.map(|b| b.cpu_f32(OP)).transpose()?,
            act,
            m,
            n_out,
            k,
        )),
        Storage::Cuda(xs) => Storage::Cuda(cuda::ops::linear(
            xs,
            w.cuda(OP)?,
            b.map(|b| b.cuda(OP)).transpose()?,
            act,
            m,
            n_out,
            k,
        )?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(shape, dt, storage))
}

/// Layer normalization over the last dimension of `x + residual` (residual optional).
pub fn layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let mut all = vec![x, gamma, beta];
    all.extend(residual);
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &all)?;
    let h = last_dim(x);
    if gamma.shape() != [h] || beta.shape() != [h] {
        return Err(Error::op(
            OP,
            format!(
                "x {:?}, gamma {:?}, beta {:?}",
                x.shape(),
                gamma.shape(),
                beta.shape()
            ),
        ));
    }
    if let Some(r) = residual {
        if r.shape() != x.shape() {
            return Err(Error::op(
                OP,
                format!("residual {:?} != x {:?}", r.shape(), x.shape()),
            ));
        }
    }
    let rows = x.len() / h.max(1);
    let storage = match &x.storage {
        Storage::CpuF32(xv) => Storage::CpuF32(cpu::layer_norm(
            xv,
            residual.map(|r| r.cpu_f32(OP)).transpose()?,
            gamma.cpu_f32(OP)?,
            beta.cpu_f32(OP)?,
            eps,
            rows,
            h,
        )),
        Storage::Cuda(xs) => Storage::Cuda(cuda::ops::layer_norm(
            xs,
            residual.map(|r| r.cuda(OP)).transpose()?,
            gamma.cuda(OP)?,
            beta.cuda(OP)?,
            eps,
            rows,
            h,
        )?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(x.shape().to_vec(), dt, storage))
}

/// Element-wise `a + b` of equal shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    same_device(OP, &[a, b])?;
    let dt = same_float_dtype(OP, &[a, b])?;
    if a.shape() != b.shape() {
        return Err(Error::op(OP, format!("{:?} != {:?}", a.shape(), b.shape())));
    }
    let storage = match &a.storage {
        Storage::CpuF32(av) => Storage::CpuF32(cpu::add(av, b.cpu_f32(OP)?)),
        Storage::Cuda(s) => Storage::Cuda(cuda::ops::add(s, b.cuda(OP)?)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(a.shape().to_vec(), dt, storage))
}

/// Sum of row lookups: `out[i] = sum_k tables[k][ids[k][i]]`. tables: [V_k, H], ids: i32 [n].
/// Ids must already be validated against each table's row count.
pub fn embed(lookups: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    const OP: &str = "embed";
    if lookups.is_empty() || lookups.len() > 3 {
        return Err(Error::op(OP, "takes one to three (table, ids) pairs"));
    }
    let tables: Vec<&Tensor> = lookups.iter().map(|l| l.0).collect();
    let mut all = tables.clone();
    all.extend(lookups.iter().map(|l| l.1));
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &tables)?;
    let h = last_dim(tables[0]);
    let n = lookups[0].1.len();
    for (t, ids) in lookups {
        if t.shape().len() != 2 || t.shape()[1] != h || ids.dtype() != DType::I32 || ids.len() != n
        {
            return Err(Error::op(
                OP,
                format!(
                    "table {:?} with ids {:?} ({})",
                    t.shape(),
                    ids.shape(),
                    ids.dtype()
                ),
            ));
        }
    }
    let storage = match &tables[0].storage {
        Storage::CpuF32(_) => {
            let mut parts = Vec::new();
            for (t, ids) in lookups {
                parts.push((t.cpu_f32(OP)?, ids.cpu_i32(OP)?, t.shape()[0]));
            }
            Storage::CpuF32(cpu::embed(&parts, n, h)?)
        }
        Storage::Cuda(_) => {
            let mut parts = Vec::new();
            for (t, ids) in lookups {
                parts.push((t.cuda(OP)?, ids.cuda(OP)?));
            }
            Storage::Cuda(cuda::ops::embed(&parts, n, h)?)
        }
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(vec![n, h], dt, storage))
}

/// Multi-head self-attention over a packed projection.
///
/// qkv: [batch, len, 3 * heads * head_dim] holding q, k and v side by side (as a fused QKV
/// linear writes them). Sequence b has `lengths[b]` real tokens at the start (right padding);
/// keys past it are masked. With `causal`, query i sees keys j <= i. Scores are multiplied by
/// `scale`. Returns [batch, len, heads * head_dim]; rows past a sequence's length hold values
/// that callers must ignore.
pub fn self_attention(
    qkv: &Tensor,
    heads: usize,
    lengths: &[usize],
    causal: bool,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "self_attention";
    let dt = same_float_dtype(OP, &[qkv])?;
    let s = qkv.shape();
    if s.len() != 3 || heads == 0 || !s[2].is_multiple_of(3 * heads) {
        return Err(Error::op(OP, format!("qkv {s:?} with {heads} heads")));
    }
    let (b, l, h3) = (s[0], s[1], s[2]);
    if lengths.len() != b || lengths.iter().any(|&n| n > l) {
        return Err(Error::op(OP, format!("lengths {lengths:?} for qkv {s:?}")));
    }
    let hidden = h3 / 3;
    let geom = AttentionGeometry {
        batch: b,
        len: l,
        heads,
        head_dim: hidden / heads,
        causal,
        scale,
    };
    let storage = match &qkv.storage {
        Storage::CpuF32(v) => Storage::CpuF32(cpu::self_attention(v, lengths, &geom)),
        Storage::Cuda(st) => Storage::Cuda(cuda::ops::self_attention(st, lengths, &geom)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(vec![b, l, hidden], dt, storage))
}

/// Shape and options of one attention call, shared by the backends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionGeometry {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

/// The same values as another float dtype (on the CPU this rounds through the dtype).
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "to_dtype";
    same_float_dtype(OP, &[x])?;
    if dtype == DType::I32 {
        return Err(Error::op(OP, "cannot convert floats to i32"));
    }
    if dtype == x.dtype() {
        return x.to_device(&x.device());
    }
    let storage = match &x.storage {
        Storage::CpuF32(v) => Storage::CpuF32(dtype.round_f32(v)),
        Storage::Cuda(s) => Storage::Cuda(cuda::ops::cast(s, dtype)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(x.shape().to_vec(), dtype, storage))
}
