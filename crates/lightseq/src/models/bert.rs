//! BERT (`model_type: bert`): learned positions, token types, post-LN encoder layers.
//! Reads BertModel checkpoints and the `bert.`-prefixed ones of BertForMaskedLM,
//! BertForSequenceClassification and friends; returns the last hidden state.

use super::forward_graph::{self, ForwardGraphs};
use super::{config_check, parse_config, Batch, Model, ModelInfo, ModelOutput, Padded};
use crate::error::Result;
use crate::io::ModelDir;
use crate::nn::{LayerNorm, Linear, Weights};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde::Deserialize;

/// The config.json fields BERT uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_positions() -> usize {
    512
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

struct Layer {
    qkv: Linear,
    out: Linear,
    ln_attn: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ln_ffn: LayerNorm,
}

/// A loaded BERT encoder.
pub struct Bert {
    cfg: BertConfig,
    act: Activation,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln_emb: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
    graphs: ForwardGraphs,
}

impl Bert {
    /// Loads BERT weights from `dir`.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: BertConfig = parse_config(dir)?;
        let h = cfg.hidden_size;
        config_check(
            dir,
            cfg.num_attention_heads > 0 && h.is_multiple_of(cfg.num_attention_heads),
            || {
                format!(
                    "hidden_size {h} is not a multiple of num_attention_heads {}",
                    cfg.num_attention_heads
                )
            },
        )?;
        let pet = cfg.position_embedding_type.as_deref().unwrap_or("absolute");
        config_check(dir, pet == "absolute", || {
            format!("position_embedding_type `{pet}` is not supported (only `absolute`)")
        })?;
        let act = Activation::from_hf(&cfg.hidden_act).map_err(|e| crate::Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let root = Weights::new(&dir.checkpoint, dtype, device);
        let w = if dir
            .checkpoint
            .contains("bert.embeddings.word_embeddings.weight")
        {
            root.pp("bert")
        } else {
            root
        };
        let emb = w.pp("embeddings");
        let eps = cfg.layer_norm_eps as f32;
        let word = emb.tensor("word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = emb.tensor(
            "position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = emb.tensor("token_type_embeddings.weight", &[cfg.type_vocab_size, h])?;
        let ln_emb = LayerNorm::load(&emb, "LayerNorm", h, eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = w.pp("encoder.layer").pp(i);
            let att = l.pp("attention");
            layers.push(Layer {
                qkv: Linear::load_fused(&att.pp("self"), &["query", "key", "value"], h, h)?,
                out: Linear::load(&att.pp("output"), "dense", h, h, true)?,
                ln_attn: LayerNorm::load(&att.pp("output"), "LayerNorm", h, eps)?,
                ffn_in: Linear::load(
                    &l.pp("intermediate"),
                    "dense",
                    h,
                    cfg.intermediate_size,
                    true,
                )?,
                ffn_out: Linear::load(&l.pp("output"), "dense", cfg.intermediate_size, h, true)?,
                ln_ffn: LayerNorm::load(&l.pp("output"), "LayerNorm", h, eps)?,
            });
        }
        Ok(Bert {
            cfg,
            act,
            word,
            position,
            token_type,
            ln_emb,
            layers,
            device: device.clone(),
            graphs: ForwardGraphs::default(),
        })
    }
}

impl Bert {
    fn run(&self, batch: &Batch) -> Result<(Tensor, Padded)> {
        batch.text_only()?;
        let cfg = &self.cfg;
        let p = Padded::new(
            &batch.input_ids,
            cfg.vocab_size,
            cfg.max_position_embeddings,
        )?;
        let types = match &batch.token_type_ids {
            Some(t) => {
                if t.len() != p.batch || t.iter().zip(&p.lengths).any(|(r, &n)| r.len() != n) {
                    return Err(crate::Error::Input(
                        "token_type_ids must have the same ragged shape as input_ids".into(),
                    ));
                }
                Padded::new(t, cfg.type_vocab_size, usize::MAX)?;
                p.flatten(t, 0)
            }
            None => vec![0; p.batch * p.len],
        };
        let n = p.batch * p.len;
        let h = cfg.hidden_size;
        // Key ranges on the device (starts, then ends), so that a captured forward reads
        // nothing from the host.
        let mut ranges = vec![0i32; p.batch];
        ranges.extend(p.lengths.iter().map(|&l| l as i32));
        let host = [p.flatten(&batch.input_ids, 0), p.positions(), types, ranges];
        // Every length-dependent value reaches the kernels through `ranges` on the
        // device, so one graph serves every batch of this padded shape.
        let shape = forward_graph::Shape {
            key: vec![p.batch, p.len],
            tokens: n,
            out: (&[n, h], self.word.dtype()),
        };
        let x = self
            .graphs
            .run(&self.device, shape, &host, |t| self.layers_from(&p, t))?;
        Ok((x, p))
    }

    /// The encoder from device inputs: token ids, positions, token types, key ranges.
    fn layers_from(&self, p: &Padded, inputs: &[Tensor]) -> Result<Tensor> {
        let [ids, pos, typ, ranges] = inputs else {
            return Err(crate::Error::op("bert", "expected four inputs"));
        };
        let cfg = &self.cfg;
        let (n, h) = (p.batch * p.len, cfg.hidden_size);
        let e = ops::embed(&[
            (&self.word, ids),
            (&self.position, pos),
            (&self.token_type, typ),
        ])?;
        let mut x = self.ln_emb.forward(&e, None)?;
        drop(e);
        let heads = cfg.num_attention_heads;
        let opts = ops::AttentionOptions {
            heads,
            kv_heads: heads,
            head_dim: h / heads,
            scale: 1.0 / ((h / heads) as f32).sqrt(),
            causal: false,
            q_offset: 0,
            window: None,
            key_ranges: p.lengths.iter().map(|&l| (0, l)).collect(),
            bias: None,
            ranges_on_device: Some(ranges),
        };
        // Intermediates are dropped as soon as they are used, which lowers the peak.
        for l in &self.layers {
            let qkv = l
                .qkv
                .forward(&x, Activation::None)?
                .reshape(&[p.batch, p.len, 3 * h])?;
            let side = |i: usize| ops::Heads {
                tensor: &qkv,
                col: i * h,
            };
            let a = ops::attention(side(0), side(1), side(2), &opts)?.reshape(&[n, h])?;
            drop(qkv);
            x = l.out.forward_add_norm(&a, &x, &l.ln_attn)?;
            drop(a);
            let f = l.ffn_in.forward(&x, self.act)?;
            x = l.ffn_out.forward_add_norm(&f, &x, &l.ln_ffn)?;
        }
        Ok(x)
    }
}

impl Model for Bert {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        let (x, p) = self.run(batch)?;
        p.output("hidden", &x)
    }

    fn forward_on_device(&self, batch: &Batch) -> Option<Result<Tensor>> {
        Some(self.run(batch).map(|r| r.0))
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
pub fn info(c: &BertConfig) -> ModelInfo {
    ModelInfo {
        architecture: format!("BERT encoder (post-LN, {})", c.hidden_act),
        sizes: vec![
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("intermediate_size", c.intermediate_size),
            ("max_position_embeddings", c.max_position_embeddings),
            ("type_vocab_size", c.type_vocab_size),
        ],
    }
}
