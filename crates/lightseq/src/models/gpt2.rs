//! GPT2 (`model_type: gpt2`): learned positions, pre-LN causal layers, LM head tied to the
//! token embeddings. Reads GPT2Model and GPT2LMHeadModel (`transformer.`) checkpoints;
//! returns logits.

use super::decode::{
    decode_via_inputs, decoder_forward, decoder_logits, decoder_only_state, standard_step_inputs,
    DecodeState, Decoder, Parking,
};
use super::{config_check, parse_config, Batch, Model, ModelInfo, ModelOutput};
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::nn::{LayerNorm, Linear, SelfAttention, SelfAttentionExtras, Weights};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde::Deserialize;

/// The config.json fields GPT2 uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    #[serde(default = "default_positions")]
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_positions() -> usize {
    1024
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// A loaded GPT2 language model.
pub struct Gpt2 {
    cfg: Gpt2Config,
    act: Activation,
    dtype: DType,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// Untied head [vocab, n_embd]; None when tied to `wte`.
    lm_head: Option<Tensor>,
    device: Device,
    /// The last run, kept for the next of its shape (see `decode::Parking`).
    parking: Parking,
}

impl Gpt2 {
    /// Loads GPT2 weights from `dir`.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: Gpt2Config = parse_config(dir)?;
        let h = cfg.n_embd;
        config_check(dir, cfg.n_head > 0 && h.is_multiple_of(cfg.n_head), || {
            format!("n_embd {h} is not a multiple of n_head {}", cfg.n_head)
        })?;
        let act = Activation::from_hf(&cfg.activation_function).map_err(|e| Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let eps = cfg.layer_norm_epsilon as f32;
        let root = Weights::new(&dir.checkpoint, dtype, device);
        let w = if dir.checkpoint.contains("transformer.wte.weight") {
            root.pp("transformer")
        } else {
            root.clone()
        };
        let wte = w.tensor("wte.weight", &[cfg.vocab_size, h])?;
        let wpe = w.tensor("wpe.weight", &[cfg.n_positions, h])?;
        let head_dim = h / cfg.n_head;
        let base_scale = if cfg.scale_attn_weights {
            (head_dim as f32).powf(-0.5)
        } else {
            1.0
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let b = w.pp("h").pp(i);
            let scale = if cfg.scale_attn_by_inverse_layer_idx {
                base_scale / (i + 1) as f32
            } else {
                base_scale
            };
            blocks.push(Block {
                ln_1: LayerNorm::load(&b, "ln_1", h, eps)?,
                attn: SelfAttention {
                    qkv: Linear::load_conv1d(&b.pp("attn"), "c_attn", h, 3 * h)?,
                    out: Linear::load_conv1d(&b.pp("attn"), "c_proj", h, h)?,
                    heads: cfg.n_head,
                    kv_heads: cfg.n_head,
                    head_dim,
                    scale,
                },
                ln_2: LayerNorm::load(&b, "ln_2", h, eps)?,
                c_fc: Linear::load_conv1d(&b.pp("mlp"), "c_fc", h, inner)?,
                mlp_proj: Linear::load_conv1d(&b.pp("mlp"), "c_proj", inner, h)?,
            });
        }
        let ln_f = LayerNorm::load(&w, "ln_f", h, eps)?;
        let lm_head = if !cfg.tie_word_embeddings && root.contains("lm_head.weight") {
            Some(root.tensor("lm_head.weight", &[cfg.vocab_size, h])?)
        } else {
            None
        };
        Ok(Gpt2 {
            cfg,
            act,
            dtype,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            device: device.clone(),
            parking: Parking::default(),
        })
    }
}

impl Decoder for Gpt2 {
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
        self.cfg.n_positions
    }

    fn begin(
        &self,
        sources: Option<&[Vec<i64>]>,
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState> {
        decoder_only_state(
            "GPT2",
            sources,
            self.cfg.n_layer,
            rows,
            capacity,
            self.cfg.n_embd,
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
        let t = st.check_step(tokens)?;
        let positions = st.positions(t);
        if let Some(&p) = positions.iter().max() {
            if p as usize >= self.cfg.n_positions {
                return Err(Error::Input(format!(
                    "position {p} exceeds the model's {} positions",
                    self.cfg.n_positions
                )));
            }
        }
        standard_step_inputs(st, tokens, self.cfg.vocab_size, positions).map(Some)
    }

    fn decode(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor> {
        decode_via_inputs(self, st, tokens)
    }

    fn decode_inputs(&self, st: &mut DecodeState, inputs: &[Tensor], t: usize) -> Result<Tensor> {
        let [ids, pos, rt, offset] = inputs else {
            return Err(Error::op(
                "GPT2 decode",
                "expected the four standard step inputs",
            ));
        };
        let mut x = ops::embed(&[(&self.wte, ids), (&self.wpe, pos)])?;
        let ranges = st.key_ranges(t);
        for (b, cache) in self.blocks.iter().zip(st.caches.iter_mut()) {
            let a = b.ln_1.forward(&x, None)?;
            x = b.attn.forward_cached(
                &a,
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
            let m = b.ln_2.forward(&x, None)?;
            let f = b.c_fc.forward(&m, self.act)?;
            x = b.mlp_proj.forward_add(&f, &x)?;
        }
        st.len += t;
        self.ln_f.forward(&x, None)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.wte);
        ops::linear(hidden, head, None, Activation::None)
    }
}

impl Model for Gpt2 {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        decoder_forward(self, "GPT2", batch, 0)
    }

    fn forward_on_device(&self, batch: &Batch) -> Option<Result<Tensor>> {
        Some(decoder_logits(self, "GPT2", batch, 0).map(|(_, logits)| logits))
    }

    fn info(&self) -> ModelInfo {
        info(&self.cfg)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.n_positions
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Architecture and sizes from the config alone.
pub fn info(c: &Gpt2Config) -> ModelInfo {
    ModelInfo {
        architecture: format!("GPT2 decoder (pre-LN, causal, {})", c.activation_function),
        sizes: vec![
            ("vocab_size", c.vocab_size),
            ("n_embd", c.n_embd),
            ("n_layer", c.n_layer),
            ("n_head", c.n_head),
            ("n_inner", c.n_inner.unwrap_or(4 * c.n_embd)),
            ("n_positions", c.n_positions),
        ],
    }
}
