//! Attention layers: projections around `ops::attention`.

use super::Linear;
use crate::error::Result;
use crate::ops::{self, Activation, AttentionOptions, Heads, RelativeBias};
use crate::tensor::Tensor;

/// Rotary position embedding parameters (Llama family).
pub struct Rope {
    /// f32 [rotary_dim / 2]
    pub inv_freq: Tensor,
    /// Multiplies cos and sin.
    pub attention_scaling: f32,
}

/// Per-call extras of self-attention.
#[derive(Default)]
pub struct SelfAttentionExtras<'a> {
    /// Relative position bias (T5).
    pub bias: Option<RelativeBias<'a>>,
    /// Rotary embedding and the position id of every row (i32 [batch * len]).
    pub rope: Option<(&'a Rope, &'a Tensor)>,
    /// Sliding window (Mistral).
    pub window: Option<usize>,
    /// The key ranges on the device (see `ops::AttentionOptions::ranges_on_device`).
    pub ranges: Option<&'a Tensor>,
    /// `q_offset` on the device (i32 [1]), where the cache writes read it: with it and
    /// `ranges`, a single-token step passes no step-dependent value to its kernels, so it
    /// can be captured once and replayed.
    pub offset: Option<&'a Tensor>,
    /// Added to the output by the output projection (a pre-norm block's residual,
    /// [batch * len, hidden_out]).
    pub residual: Option<&'a Tensor>,
}

/// Self-attention with one fused q/k/v projection ([q | k | v] rows of the weight).
pub struct SelfAttention {
    /// [ (heads + 2 kv_heads) * head_dim, hidden ]
    pub qkv: Linear,
    /// [hidden_out, heads * head_dim]
    pub out: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl SelfAttention {
    /// The fused projection [batch, len, q | k | v], rotary positions applied to q and k.
    fn project(
        &self,
        x: &Tensor,
        batch: usize,
        len: usize,
        rope: Option<(&Rope, &Tensor)>,
    ) -> Result<Tensor> {
        let (qd, kd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut qkv = self
            .qkv
            .forward(x, Activation::None)?
            .reshape(&[batch, len, qd + 2 * kd])?;
        if let Some((rope, positions)) = rope {
            for (col, heads) in [(0, self.heads), (qd, self.kv_heads)] {
                ops::rotary(
                    &mut qkv,
                    col,
                    heads,
                    self.head_dim,
                    positions,
                    &rope.inv_freq,
                    rope.attention_scaling,
                )?;
            }
        }
        Ok(qkv)
    }

    /// x: [batch * len, hidden] -> [batch * len, hidden_out].
    pub fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        len: usize,
        key_ranges: &[(usize, usize)],
        causal: bool,
        extras: SelfAttentionExtras,
    ) -> Result<Tensor> {
        let (qd, kd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let qkv = self.project(x, batch, len, extras.rope)?;
        let opts = AttentionOptions {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            causal,
            q_offset: 0,
            window: extras.window,
            key_ranges: key_ranges.to_vec(),
            bias: extras.bias,
            ranges_on_device: extras.ranges,
        };
        let side = |col| Heads { tensor: &qkv, col };
        let a =
            ops::attention(side(0), side(qd), side(qd + kd), &opts)?.reshape(&[batch * len, qd])?;
        self.out.forward(&a, Activation::None)
    }
}

/// Attention from decoder states to an encoder's output, with fused k/v projections.
pub struct CrossAttention {
    /// [heads * head_dim, hidden]
    pub q: Linear,
    /// [2 * heads * head_dim, hidden_enc]
    pub kv: Linear,
    /// [hidden, heads * head_dim]
    pub out: Linear,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl CrossAttention {
    /// Keys and values of the encoder output `memory` [batch * src_len, hidden]
    /// -> [batch, src_len, 2 * heads * head_dim], computed once per source.
    pub fn memory(&self, memory: &Tensor, batch: usize, src_len: usize) -> Result<Tensor> {
        self.kv.forward(memory, Activation::None)?.reshape(&[
            batch,
            src_len,
            2 * self.heads * self.head_dim,
        ])
    }

    /// x: [batch * len, hidden], kv from [`CrossAttention::memory`]. `ranges_on_device`
    /// optionally holds `src_ranges` on the device (see `ops::AttentionOptions`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        len: usize,
        kv: &Tensor,
        src_ranges: &[(usize, usize)],
        ranges_on_device: Option<&Tensor>,
        bias: Option<RelativeBias>,
    ) -> Result<Tensor> {
        let qd = self.heads * self.head_dim;
        let q = self
            .q
            .forward(x, Activation::None)?
            .reshape(&[batch, len, qd])?;
        let opts = AttentionOptions {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.head_dim,
            scale: self.scale,
            causal: false,
            q_offset: 0,
            window: None,
            key_ranges: src_ranges.to_vec(),
            bias,
            ranges_on_device,
        };
        // The projection above is the last thing launched before.
        let a = ops::attention_after_projection(
            Heads { tensor: &q, col: 0 },
            Heads { tensor: kv, col: 0 },
            Heads {
                tensor: kv,
                col: qd,
            },
            &opts,
        )?
        .reshape(&[batch * len, qd])?;
        self.out.forward(&a, Activation::None)
    }
}

/// Keys and values of one attention layer: [rows, capacity, kv_heads * head_dim] each.
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
    /// Beam search on CUDA: the row of `k` and `v` holding each position of each sequence
    /// (i32 [rows, capacity], shared by a state's caches); reorders compose it instead of
    /// moving the rows (see `DecodeState::reorder`). None: every sequence's own row.
    pub(crate) rows: Option<std::sync::Arc<Tensor>>,
}

impl KvCache {
    /// Caches for `rows` sequences of up to `capacity` positions.
    pub fn new(
        rows: usize,
        capacity: usize,
        width: usize,
        dtype: crate::tensor::DType,
        device: &crate::tensor::Device,
    ) -> Result<Self> {
        Ok(KvCache {
            k: ops::zeros(&[rows, capacity, width], dtype, device)?,
            v: ops::zeros(&[rows, capacity, width], dtype, device)?,
            rows: None,
        })
    }
}

impl SelfAttention {
    /// Causal self-attention over `t` new positions per row that appends their keys and
    /// values to `cache` at `q_offset`: x [batch * t, hidden] -> [batch * t, hidden_out].
    /// `key_ranges` are the valid cache positions of each row after this step.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(
        &self,
        x: &Tensor,
        batch: usize,
        t: usize,
        cache: &mut KvCache,
        q_offset: usize,
        key_ranges: &[(usize, usize)],
        extras: SelfAttentionExtras,
    ) -> Result<Tensor> {
        let (qd, kd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let qkv = self.project(x, batch, t, extras.rope)?;
        // One query per row sees keys up to its own position, which the key ranges (ending
        // at q_offset + 1 at most) already enforce; the causal test would read q_offset.
        let causal = t > 1 || extras.window.is_some();
        let opts = AttentionOptions {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            causal,
            q_offset,
            window: extras.window,
            key_ranges: key_ranges.to_vec(),
            bias: extras.bias,
            ranges_on_device: extras.ranges,
        };
        let a = ops::attention_cached_rows(
            Heads {
                tensor: &qkv,
                col: 0,
            },
            (&mut cache.k, &mut cache.v),
            q_offset,
            extras.offset,
            &qkv,
            (qd, qd + kd),
            &opts,
            cache.rows.as_deref(),
            // The projection above is the last thing launched before.
            true,
        )?
        .reshape(&[batch * t, qd])?;
        match extras.residual {
            Some(r) => self.out.forward_add(&a, r),
            None => self.out.forward(&a, Activation::None),
        }
    }
}
