//! Layers built from ops, and the weight loader that names their tensors as HF does.

pub mod attention;
pub mod positions;

pub use attention::{CrossAttention, KvCache, Rope, SelfAttention, SelfAttentionExtras};

use crate::error::Result;
use crate::io::Checkpoint;
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};

/// Loads tensors under a name prefix (`encoder.layer.3.`), converting to one dtype and device.
#[derive(Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    dtype: DType,
    device: &'a Device,
}

impl<'a> Weights<'a> {
    /// Loader at the checkpoint's root.
    pub fn new(ckpt: &'a Checkpoint, dtype: DType, device: &'a Device) -> Self {
        Weights {
            ckpt,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// A loader one level down: `pp("layer").pp(3)`.
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        Weights {
            prefix: format!("{}{}.", self.prefix, part),
            ..self.clone()
        }
    }

    /// Full name of `name` under this prefix.
    pub fn name(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// True when the checkpoint holds `name` under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.name(name))
    }

    /// True when `a` and `b` hold the same shape and values (see
    /// [`Checkpoint::same_values`]).
    pub fn same_values(&self, a: &str, b: &str) -> Result<bool> {
        self.ckpt.same_values(&self.name(a), &self.name(b))
    }

    /// Values of `name`, checked against `shape`.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.ckpt.read_f32(&self.name(name), shape)
    }

    /// `name` as a tensor of `shape` on the loader's device and dtype.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.ckpt
            .tensor(&self.name(name), shape, self.dtype, self.device)
    }

    /// A tensor from values already read (fused or transposed weights).
    pub fn from_f32(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_f32(data, shape, self.dtype, self.device)
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        self.device
    }

    /// The dtype tensors are loaded as.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Transposes a row-major [rows, cols] matrix.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Whether fused layers carry biases.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BiasMode {
    /// Every part has `bias`.
    Required,
    /// No part has one.
    None,
    /// Each part's `bias` is read when the checkpoint has it (zeros otherwise).
    IfPresent,
}

/// `y = act(x @ w^T + b)` with w stored [out, in].
pub struct Linear {
    /// [out, in]
    pub weight: Tensor,
    /// [out]
    pub bias: Option<Tensor>,
}

impl Linear {
    /// torch.nn.Linear: `name.weight` [out, in] and, with `bias`, `name.bias` [out].
    pub fn load(w: &Weights, name: &str, n_in: usize, n_out: usize, bias: bool) -> Result<Self> {
        let w = w.pp(name);
        Ok(Linear {
            weight: w.tensor("weight", &[n_out, n_in])?,
            bias: if bias {
                Some(w.tensor("bias", &[n_out])?)
            } else {
                None
            },
        })
    }

    /// HF's Conv1D (GPT2): `name.weight` stored [in, out], transposed here to [out, in].
    pub fn load_conv1d(w: &Weights, name: &str, n_in: usize, n_out: usize) -> Result<Self> {
        let w = w.pp(name);
        let t = transpose(&w.read_f32("weight", &[n_in, n_out])?, n_in, n_out);
        Ok(Linear {
            weight: w.from_f32(&t, &[n_out, n_in])?,
            bias: Some(w.tensor("bias", &[n_out])?),
        })
    }

    /// Several torch.nn.Linear layers over the same input fused into one (q, k, v), each
    /// with a bias.
    pub fn load_fused(w: &Weights, names: &[&str], n_in: usize, n_out: usize) -> Result<Self> {
        let parts: Vec<(&str, usize)> = names.iter().map(|n| (*n, n_out)).collect();
        Self::load_fused_parts(w, &parts, n_in, BiasMode::Required)
    }

    /// Fuses layers of different output sizes; `bias` says whether each has a bias.
    pub fn load_fused_parts(
        w: &Weights,
        parts: &[(&str, usize)],
        n_in: usize,
        bias: BiasMode,
    ) -> Result<Self> {
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut weight = Vec::with_capacity(total * n_in);
        let mut b = Vec::with_capacity(total);
        let mut any_bias = false;
        for (name, n_out) in parts {
            let p = w.pp(name);
            weight.extend(p.read_f32("weight", &[*n_out, n_in])?);
            let has = match bias {
                BiasMode::Required => true,
                BiasMode::None => false,
                BiasMode::IfPresent => p.contains("bias"),
            };
            if has {
                any_bias = true;
                b.extend(p.read_f32("bias", &[*n_out])?);
            } else {
                b.extend(std::iter::repeat_n(0.0, *n_out));
            }
        }
        Ok(Linear {
            weight: w.from_f32(&weight, &[total, n_in])?,
            bias: if any_bias {
                Some(w.from_f32(&b, &[total])?)
            } else {
                None
            },
        })
    }

    /// torch.nn.Linear whose bias is read when the checkpoint has one.
    pub fn load_opt_bias(w: &Weights, name: &str, n_in: usize, n_out: usize) -> Result<Self> {
        let has = w.pp(name).contains("bias");
        Self::load(w, name, n_in, n_out, has)
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref(), act)
    }

    /// `ln(forward(x) + r)`: a post-norm block's output ([`ops::linear_add_layer_norm`]).
    pub fn forward_add_norm(&self, x: &Tensor, r: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
        ops::linear_add_layer_norm(
            x,
            (&self.weight, self.bias.as_ref()),
            r,
            (&ln.gamma, &ln.beta),
            ln.eps,
        )
    }

    /// `forward(x) + r` (a pre-norm block's residual): on CUDA the GEMM adds `r` in its
    /// epilogue, so the sum costs no pass of its own.
    pub fn forward_add(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        crate::train::ops::linear_add(x, &self.weight, self.bias.as_ref(), r)
    }
}

/// RMS normalization with a learned scale (T5, Llama).
pub struct RmsNorm {
    /// [h]
    pub gamma: Tensor,
    /// Added to the mean square.
    pub eps: f32,
}

impl RmsNorm {
    /// `name.weight`.
    pub fn load(w: &Weights, name: &str, h: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            gamma: w.pp(name).tensor("weight", &[h])?,
            eps,
        })
    }

    /// RMSNorm(x + residual).
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        ops::rms_norm(x, residual, &self.gamma, self.eps)
    }
}

/// Layer normalization with learned scale and shift.
pub struct LayerNorm {
    /// [h]
    pub gamma: Tensor,
    /// [h]
    pub beta: Tensor,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// `name.weight` / `name.bias` (or the older `name.gamma` / `name.beta`).
    pub fn load(w: &Weights, name: &str, h: usize, eps: f32) -> Result<Self> {
        let w = w.pp(name);
        let (g, b) = if !w.contains("weight") && w.contains("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(LayerNorm {
            gamma: w.tensor(g, &[h])?,
            beta: w.tensor(b, &[h])?,
            eps,
        })
    }

    /// LN(x + residual).
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        ops::layer_norm(x, residual, &self.gamma, &self.beta, self.eps)
    }
}
