//! XGLM (`model_type: xglm`): decoder-only, fairseq sinusoidal positions at offset 2,
//! scaled token embeddings, pre-LN layers with biased projections, LM head tied to the
//! token embeddings.

use super::decode::{
    decode_via_inputs, decoder_forward, decoder_logits, decoder_only_state, standard_step_inputs,
    DecodeState, Decoder, Parking,
};
use super::{config_check, Batch, Model, ModelInfo, ModelOutput};
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::nn::positions::fairseq_sinusoidal;
use crate::nn::{LayerNorm, Linear, SelfAttention, SelfAttentionExtras, Weights};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde::Deserialize;
use std::sync::Arc;

/// The config.json fields XGLM uses.
#[derive(Debug, Clone, Deserialize)]
pub struct XglmConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default = "d_ffn")]
    pub ffn_dim: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_heads")]
    pub attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub activation_function: String,
    #[serde(default = "d_true")]
    pub scale_embedding: bool,
    #[serde(default = "d_pad")]
    pub pad_token_id: usize,
}

fn d_vocab() -> usize {
    256008
}
fn d_model() -> usize {
    1024
}
fn d_ffn() -> usize {
    4096
}
fn d_layers() -> usize {
    24
}
fn d_heads() -> usize {
    16
}
fn d_positions() -> usize {
    2048
}
fn d_act() -> String {
    "gelu".into()
}
fn d_true() -> bool {
    true
}
fn d_pad() -> usize {
    1
}

/// Position table offset (fairseq's padding_idx + 1 convention).
const OFFSET: usize = 2;
const EPS: f32 = 1e-5;

struct Layer {
    ln_attn: LayerNorm,
    attn: SelfAttention,
    ln_ffn: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A loaded XGLM.
pub struct Xglm {
    cfg: XglmConfig,
    act: Activation,
    dtype: DType,
    tokens: Arc<Tensor>,
    positions: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    head: Arc<Tensor>,
    device: Device,
    /// The last run, kept for the next of its shape (see `decode::Parking`).
    parking: Parking,
}

impl Xglm {
    /// Loads XGLMForCausalLM / XGLMModel weights.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: XglmConfig = super::parse_config(dir)?;
        let d = cfg.d_model;
        config_check(
            dir,
            cfg.attention_heads > 0 && d.is_multiple_of(cfg.attention_heads),
            || {
                format!(
                    "d_model {d} is not a multiple of attention_heads {}",
                    cfg.attention_heads
                )
            },
        )?;
        let act = Activation::from_hf(&cfg.activation_function).map_err(|e| Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let root = Weights::new(&dir.checkpoint, dtype, device);
        let w = if dir.checkpoint.contains("model.embed_tokens.weight") {
            root.pp("model")
        } else {
            root.clone()
        };
        let tokens = Arc::new(w.tensor("embed_tokens.weight", &[cfg.vocab_size, d])?);
        let rows = cfg.max_position_embeddings + OFFSET;
        let positions = w.from_f32(
            &fairseq_sinusoidal(rows, d, Some(cfg.pad_token_id)),
            &[rows, d],
        )?;
        let hd = d / cfg.attention_heads;
        let mut layers = Vec::new();
        for i in 0..cfg.num_layers {
            let l = w.pp("layers").pp(i);
            let a = l.pp("self_attn");
            layers.push(Layer {
                ln_attn: LayerNorm::load(&l, "self_attn_layer_norm", d, EPS)?,
                attn: SelfAttention {
                    qkv: Linear::load_fused(&a, &["q_proj", "k_proj", "v_proj"], d, d)?,
                    out: Linear::load(&a, "out_proj", d, d, true)?,
                    heads: cfg.attention_heads,
                    kv_heads: cfg.attention_heads,
                    head_dim: hd,
                    scale: (hd as f32).powf(-0.5),
                },
                ln_ffn: LayerNorm::load(&l, "final_layer_norm", d, EPS)?,
                fc1: Linear::load(&l, "fc1", d, cfg.ffn_dim, true)?,
                fc2: Linear::load(&l, "fc2", cfg.ffn_dim, d, true)?,
            });
        }
        let norm = LayerNorm::load(&w, "layer_norm", d, EPS)?;
        let head = if root.contains("lm_head.weight") {
            Arc::new(root.tensor("lm_head.weight", &[cfg.vocab_size, d])?)
        } else {
            tokens.clone()
        };
        Ok(Xglm {
            cfg,
            act,
            dtype,
            tokens,
            positions,
            layers,
            norm,
            head,
            device: device.clone(),
            parking: Parking::default(),
        })
    }
}

impl Decoder for Xglm {
    fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }

    fn is_encoder_decoder(&self) -> bool {
        false
    }

    fn decoder_device(&self) -> &Device {
        &self.device
    }

    fn max_decoder_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn begin(
        &self,
        sources: Option<&[Vec<i64>]>,
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState> {
        decoder_only_state(
            "XGLM",
            sources,
            self.cfg.num_layers,
            rows,
            capacity,
            self.cfg.d_model,
            self.dtype,
            &self.device,
            &self.parking,
        )
    }

    fn park(&self, st: DecodeState) {
        self.parking.park(st);
    }

    fn release_kept_state(&self) {
        self.parking.clear();
    }

    fn step_ids_from_device(&self) -> bool {
        true
    }

    fn step_inputs(&self, st: &DecodeState, tokens: &[Vec<i64>]) -> Result<Option<Vec<Vec<i32>>>> {
        let c = &self.cfg;
        let t = st.check_step(tokens)?;
        let positions: Vec<i32> = st.positions(t).iter().map(|&p| p + OFFSET as i32).collect();
        if positions
            .iter()
            .any(|&p| p as usize >= c.max_position_embeddings + OFFSET)
        {
            return Err(Error::Input(format!(
                "sequence longer than the model's {} positions",
                c.max_position_embeddings
            )));
        }
        standard_step_inputs(st, tokens, c.vocab_size, positions).map(Some)
    }

    fn decode(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor> {
        decode_via_inputs(self, st, tokens)
    }

    fn decode_inputs(&self, st: &mut DecodeState, inputs: &[Tensor], t: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let [ids, pos, rt, offset] = inputs else {
            return Err(Error::op(
                "XGLM decode",
                "expected the four standard step inputs",
            ));
        };
        let scale = if c.scale_embedding {
            (c.d_model as f32).sqrt()
        } else {
            1.0
        };
        let mut x = ops::embed_scaled(&[(&self.tokens, ids), (&self.positions, pos)], scale)?;
        let ranges = st.key_ranges(t);
        for (l, cache) in self.layers.iter().zip(st.caches.iter_mut()) {
            let h = l.ln_attn.forward(&x, None)?;
            x = l.attn.forward_cached(
                &h,
                st.rows,
                t,
                cache,
                st.len,
                &ranges,
                SelfAttentionExtras {
                    ranges: Some(rt),
                    offset: Some(offset),
                    residual: Some(&x),
                    ..Default::default()
                },
            )?;
            let h = l.ln_ffn.forward(&x, None)?;
            x = l.fc2.forward_add(&l.fc1.forward(&h, self.act)?, &x)?;
        }
        st.len += t;
        self.norm.forward(&x, None)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::linear(hidden, &self.head, None, Activation::None)
    }
}

impl Model for Xglm {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        decoder_forward(self, "XGLM", batch, self.cfg.pad_token_id as i64)
    }

    fn forward_on_device(&self, batch: &Batch) -> Option<Result<Tensor>> {
        Some(
            decoder_logits(self, "XGLM", batch, self.cfg.pad_token_id as i64)
                .map(|(_, logits)| logits),
        )
    }

    fn info(&self) -> ModelInfo {
        info(&self.cfg)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Architecture and sizes from the config alone.
pub fn info(c: &XglmConfig) -> ModelInfo {
    ModelInfo {
        architecture: format!(
            "XGLM decoder (pre-LN, sinusoidal positions, {})",
            c.activation_function
        ),
        sizes: vec![
            ("vocab_size", c.vocab_size),
            ("d_model", c.d_model),
            ("ffn_dim", c.ffn_dim),
            ("num_layers", c.num_layers),
            ("attention_heads", c.attention_heads),
            ("max_position_embeddings", c.max_position_embeddings),
        ],
    }
}
