//! T5 (`model_type: t5`, v1.0 and v1.1) and mT5 (`mt5`): RMS norms, relative position
//! buckets (computed by the first block of each stack, shared by the others), no attention
//! scaling, relu or gated FFNs, `d_kv * heads` that may differ from `d_model`.

use super::decode::{
    decoder_forward, decoder_logits, enc_dec_begin, enc_dec_begin_from_states,
    enc_dec_encode_sources, ids_tensor, DecodeState, Decoder, EncoderDecoder,
};
use super::{config_check, Batch, Model, ModelInfo, ModelOutput, Padded};
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::nn::{
    BiasMode, CrossAttention, Linear, RmsNorm, SelfAttention, SelfAttentionExtras, Weights,
};
use crate::ops::{self, Activation, RelativeBias};
use crate::tensor::{DType, Device, Tensor};
use serde_json::Value;
use std::sync::Arc;

/// The config.json fields T5 uses.
#[derive(Debug, Clone)]
pub struct T5Config {
    pub mt5: bool,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub eps: f64,
    pub gated: bool,
    pub act: String,
    pub scale_decoder_outputs: bool,
    pub pad_token_id: i64,
}

impl T5Config {
    /// Reads config.json with HF's defaults (mT5's where they differ).
    pub fn parse(dir: &ModelDir, mt5: bool) -> Result<Self> {
        let v = &dir.config;
        let u = |k: &str, d: usize| {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(d)
        };
        let proj = v
            .get("feed_forward_proj")
            .and_then(Value::as_str)
            .unwrap_or(if mt5 { "gated-gelu" } else { "relu" })
            .to_string();
        let parts: Vec<&str> = proj.split('-').collect();
        let gated = parts[0] == "gated";
        config_check(dir, parts.len() == 1 || (parts.len() == 2 && gated), || {
            format!("feed_forward_proj `{proj}` is not `ACT` or `gated-ACT`")
        })?;
        let mut act = if proj == "gated-gelu" {
            "gelu_new".to_string()
        } else {
            parts[parts.len() - 1].to_string()
        };
        if let Some(a) = v.get("dense_act_fn").and_then(Value::as_str) {
            act = a.to_string();
        }
        // HF 5.x: T5 scales the decoder output by d_model^-0.5 unless the config says
        // otherwise (old configs: unless the head is untied); mT5 never does.
        let scale_decoder_outputs = !mt5
            && match v.get("scale_decoder_outputs").and_then(Value::as_bool) {
                Some(b) => b,
                None => v.get("tie_word_embeddings").and_then(Value::as_bool) != Some(false),
            };
        let num_layers = u("num_layers", if mt5 { 8 } else { 6 });
        let cfg = T5Config {
            mt5,
            vocab_size: u("vocab_size", if mt5 { 250112 } else { 32128 }),
            d_model: u("d_model", 512),
            d_kv: u("d_kv", 64),
            d_ff: u("d_ff", if mt5 { 1024 } else { 2048 }),
            num_layers,
            num_decoder_layers: v
                .get("num_decoder_layers")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(num_layers),
            num_heads: u("num_heads", if mt5 { 6 } else { 8 }),
            num_buckets: u("relative_attention_num_buckets", 32),
            max_distance: u("relative_attention_max_distance", 128),
            eps: v
                .get("layer_norm_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            gated,
            act,
            scale_decoder_outputs,
            pad_token_id: v.get("pad_token_id").and_then(Value::as_i64).unwrap_or(0),
        };
        config_check(dir, cfg.num_heads > 0 && cfg.d_kv > 0, || {
            "num_heads and d_kv must be positive".into()
        })?;
        config_check(
            dir,
            cfg.num_buckets >= 4 && cfg.max_distance > cfg.num_buckets / 4,
            || "relative_attention_num_buckets / max_distance out of range".into(),
        )?;
        Ok(cfg)
    }
}

/// HF's `_relative_position_bucket` for `rel = key_pos - query_pos`, in f32 as HF computes it.
pub fn relative_bucket(
    rel: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> i32 {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            bucket += nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        return (bucket + n) as i32;
    }
    let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = ((n as f32 / max_exact as f32).ln() / scale * (nb - max_exact) as f32) as i64;
    (bucket + (max_exact + large).min(nb - 1)) as i32
}

struct Ffn {
    /// relu: wi; gated: [wi_0 | wi_1]
    wi: Linear,
    wo: Linear,
}

struct EncoderBlock {
    ln_attn: RmsNorm,
    attn: SelfAttention,
    ln_ffn: RmsNorm,
    ffn: Ffn,
}

struct DecoderBlock {
    ln_attn: RmsNorm,
    attn: SelfAttention,
    ln_cross: RmsNorm,
    cross: CrossAttention,
    ln_ffn: RmsNorm,
    ffn: Ffn,
}

/// A loaded T5 or mT5.
pub struct T5 {
    cfg: T5Config,
    act: Activation,
    dtype: DType,
    shared: Arc<Tensor>,
    enc_bias: Tensor,
    dec_bias: Tensor,
    encoder: Vec<EncoderBlock>,
    decoder: Vec<DecoderBlock>,
    enc_norm: RmsNorm,
    dec_norm: RmsNorm,
    head: Arc<Tensor>,
    device: Device,
}

fn attention(w: &Weights, c: &T5Config) -> Result<SelfAttention> {
    let inner = c.num_heads * c.d_kv;
    Ok(SelfAttention {
        qkv: Linear::load_fused_parts(
            w,
            &[("q", inner), ("k", inner), ("v", inner)],
            c.d_model,
            BiasMode::None,
        )?,
        out: Linear::load(w, "o", inner, c.d_model, false)?,
        heads: c.num_heads,
        kv_heads: c.num_heads,
        head_dim: c.d_kv,
        scale: 1.0,
    })
}

fn ffn(w: &Weights, c: &T5Config) -> Result<Ffn> {
    let wi = if c.gated {
        Linear::load_fused_parts(
            w,
            &[("wi_0", c.d_ff), ("wi_1", c.d_ff)],
            c.d_model,
            BiasMode::None,
        )?
    } else {
        Linear::load(w, "wi", c.d_model, c.d_ff, false)?
    };
    Ok(Ffn {
        wi,
        wo: Linear::load(w, "wo", c.d_ff, c.d_model, false)?,
    })
}

impl T5 {
    /// Loads T5ForConditionalGeneration / T5Model (and the mT5 equivalents) weights.
    pub fn load(dir: &ModelDir, mt5: bool, dtype: DType, device: &Device) -> Result<Self> {
        let c = T5Config::parse(dir, mt5)?;
        let act = Activation::from_hf(&c.act).map_err(|e| Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let w = Weights::new(&dir.checkpoint, dtype, device);
        // The bias tables stay f32: they are added to f32 scores.
        let w32 = Weights::new(&dir.checkpoint, DType::F32, device);
        let (d, inner, eps) = (c.d_model, c.num_heads * c.d_kv, c.eps as f32);
        let shared = Arc::new(w.tensor("shared.weight", &[c.vocab_size, d])?);
        let bias_name = |stack: &str| {
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        };
        let enc_bias = w32.tensor(&bias_name("encoder"), &[c.num_buckets, c.num_heads])?;
        let dec_bias = w32.tensor(&bias_name("decoder"), &[c.num_buckets, c.num_heads])?;
        let mut encoder = Vec::new();
        for i in 0..c.num_layers {
            let b = w.pp("encoder.block").pp(i).pp("layer");
            encoder.push(EncoderBlock {
                ln_attn: RmsNorm::load(&b.pp(0), "layer_norm", d, eps)?,
                attn: attention(&b.pp(0).pp("SelfAttention"), &c)?,
                ln_ffn: RmsNorm::load(&b.pp(1), "layer_norm", d, eps)?,
                ffn: ffn(&b.pp(1).pp("DenseReluDense"), &c)?,
            });
        }
        let mut decoder = Vec::new();
        for i in 0..c.num_decoder_layers {
            let b = w.pp("decoder.block").pp(i).pp("layer");
            let x = b.pp(1).pp("EncDecAttention");
            decoder.push(DecoderBlock {
                ln_attn: RmsNorm::load(&b.pp(0), "layer_norm", d, eps)?,
                attn: attention(&b.pp(0).pp("SelfAttention"), &c)?,
                ln_cross: RmsNorm::load(&b.pp(1), "layer_norm", d, eps)?,
                cross: CrossAttention {
                    q: Linear::load(&x, "q", d, inner, false)?,
                    kv: Linear::load_fused_parts(
                        &x,
                        &[("k", inner), ("v", inner)],
                        d,
                        BiasMode::None,
                    )?,
                    out: Linear::load(&x, "o", inner, d, false)?,
                    heads: c.num_heads,
                    head_dim: c.d_kv,
                    scale: 1.0,
                },
                ln_ffn: RmsNorm::load(&b.pp(2), "layer_norm", d, eps)?,
                ffn: ffn(&b.pp(2).pp("DenseReluDense"), &c)?,
            });
        }
        let head = if w.contains("lm_head.weight") {
            Arc::new(w.tensor("lm_head.weight", &[c.vocab_size, d])?)
        } else {
            shared.clone()
        };
        Ok(T5 {
            enc_norm: RmsNorm::load(&w.pp("encoder"), "final_layer_norm", d, eps)?,
            dec_norm: RmsNorm::load(&w.pp("decoder"), "final_layer_norm", d, eps)?,
            cfg: c,
            act,
            dtype,
            shared,
            enc_bias,
            dec_bias,
            encoder,
            decoder,
            head,
            device: device.clone(),
        })
    }

    /// Buckets for queries at positions q_offset..q_offset + len_q over len_k keys, indexed
    /// by key - query + q_offset + len_q - 1 (see `ops::RelativeBias`).
    fn buckets(
        &self,
        q_offset: usize,
        len_q: usize,
        len_k: usize,
        bidirectional: bool,
    ) -> Vec<i32> {
        let base = (q_offset + len_q) as i64 - 1;
        (0..q_offset + len_q + len_k - 1)
            .map(|r| {
                relative_bucket(
                    r as i64 - base,
                    bidirectional,
                    self.cfg.num_buckets,
                    self.cfg.max_distance,
                )
            })
            .collect()
    }

    fn ffn(&self, f: &Ffn, x: &Tensor) -> Result<Tensor> {
        let h = if self.cfg.gated {
            ops::glu(&f.wi.forward(x, Activation::None)?, self.act)?
        } else {
            f.wi.forward(x, self.act)?
        };
        f.wo.forward(&h, Activation::None)
    }

    fn pad_ids(&self, rows: &[Vec<i64>]) -> Result<(Tensor, Padded)> {
        let p = Padded::new(rows, self.cfg.vocab_size, usize::MAX)?;
        let ids = Tensor::from_i32(&p.flatten(rows, 0), &[p.batch * p.len], &self.device)?;
        Ok((ids, p))
    }
}

impl EncoderDecoder for T5 {
    fn name(&self) -> String {
        "T5".into()
    }

    /// The memory is the encoder's output after its final norm.
    fn encode(&self, src: &[Vec<i64>]) -> Result<(Tensor, Padded)> {
        let (ids, sp) = self.pad_ids(src)?;
        let mut x = ops::embed(&[(&self.shared, &ids)])?;
        let src_ranges: Vec<(usize, usize)> = sp.lengths.iter().map(|&n| (0, n)).collect();
        let buckets = self.buckets(0, sp.len, sp.len, true);
        for b in &self.encoder {
            let h = b.ln_attn.forward(&x, None)?;
            let bias = RelativeBias {
                table: &self.enc_bias,
                buckets: buckets.clone(),
            };
            let extras = SelfAttentionExtras {
                bias: Some(bias),
                ..Default::default()
            };
            x = ops::add(
                &x,
                &b.attn
                    .forward(&h, sp.batch, sp.len, &src_ranges, false, extras)?,
            )?;
            let h = b.ln_ffn.forward(&x, None)?;
            x = ops::add(&x, &self.ffn(&b.ffn, &h)?)?;
        }
        Ok((self.enc_norm.forward(&x, None)?, sp))
    }

    fn cross_attentions(&self) -> Vec<&CrossAttention> {
        self.decoder.iter().map(|b| &b.cross).collect()
    }

    fn cache_width(&self) -> usize {
        self.cfg.num_heads * self.cfg.d_kv
    }

    fn memory_layout(&self) -> (usize, DType, &Device) {
        (self.cfg.d_model, self.dtype, &self.device)
    }
}

impl Decoder for T5 {
    fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }

    fn is_encoder_decoder(&self) -> bool {
        true
    }

    fn decoder_device(&self) -> &Device {
        &self.device
    }

    fn max_decoder_positions(&self) -> usize {
        usize::MAX
    }

    fn default_decoder_start(&self) -> Option<i64> {
        // T5 starts decoding from its pad token.
        Some(self.cfg.pad_token_id)
    }

    fn begin(
        &self,
        sources: Option<&[Vec<i64>]>,
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState> {
        enc_dec_begin(self, sources, rows, capacity)
    }

    fn encode_sources(&self, sources: &[Vec<i64>]) -> Result<(Tensor, Vec<usize>)> {
        enc_dec_encode_sources(self, sources)
    }

    fn begin_from_states(
        &self,
        states: &Tensor,
        lengths: &[usize],
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState> {
        enc_dec_begin_from_states(self, states, lengths, rows, capacity)
    }

    fn decode(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor> {
        let t = st.check_step(tokens)?;
        let ids = ids_tensor(tokens, self.cfg.vocab_size, &self.device)?;
        let mut x = ops::embed(&[(&self.shared, &ids)])?;
        let ranges = st.key_ranges(t);
        let rt = st.key_ranges_on(t, &self.device)?;
        let buckets = self.buckets(st.len, t, st.capacity, false);
        let (rows, len) = (st.rows, st.len);
        for ((b, cache), kv) in self.decoder.iter().zip(st.caches.iter_mut()).zip(&st.cross) {
            let h = b.ln_attn.forward(&x, None)?;
            let bias = RelativeBias {
                table: &self.dec_bias,
                buckets: buckets.clone(),
            };
            let extras = SelfAttentionExtras {
                bias: Some(bias),
                ranges: Some(&rt),
                ..Default::default()
            };
            x = ops::add(
                &x,
                &b.attn
                    .forward_cached(&h, rows, t, cache, len, &ranges, extras)?,
            )?;
            let h = b.ln_cross.forward(&x, None)?;
            x = ops::add(
                &x,
                &b.cross.forward(
                    &h,
                    rows,
                    t,
                    kv,
                    &st.src_ranges,
                    st.src_ranges_dev.as_ref(),
                    None,
                )?,
            )?;
            let h = b.ln_ffn.forward(&x, None)?;
            x = ops::add(&x, &self.ffn(&b.ffn, &h)?)?;
        }
        st.len += t;
        let y = self.dec_norm.forward(&x, None)?;
        if self.cfg.scale_decoder_outputs {
            ops::scale(&y, (self.cfg.d_model as f32).powf(-0.5))
        } else {
            Ok(y)
        }
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::linear(hidden, &self.head, None, Activation::None)
    }
}

impl Model for T5 {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        decoder_forward(self, "T5", batch, 0)
    }

    fn forward_on_device(&self, batch: &Batch) -> Option<Result<Tensor>> {
        Some(decoder_logits(self, "T5", batch, 0).map(|(_, logits)| logits))
    }

    fn info(&self) -> ModelInfo {
        info(&self.cfg)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        usize::MAX
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Architecture and sizes from the config alone.
pub fn info(c: &T5Config) -> ModelInfo {
    ModelInfo {
        architecture: format!(
            "{} encoder-decoder (RMS pre-norm, relative positions, {}{})",
            if c.mt5 { "mT5" } else { "T5" },
            if c.gated { "gated-" } else { "" },
            c.act
        ),
        sizes: vec![
            ("vocab_size", c.vocab_size),
            ("d_model", c.d_model),
            ("d_kv", c.d_kv),
            ("d_ff", c.d_ff),
            ("num_layers", c.num_layers),
            ("num_decoder_layers", c.num_decoder_layers),
            ("num_heads", c.num_heads),
            ("relative_attention_num_buckets", c.num_buckets),
        ],
    }
}
