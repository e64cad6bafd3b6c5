//! The Llama family: `llama`, `mistral` and `qwen2`. RMS pre-norms, rotary positions,
//! grouped-query attention, SwiGLU feed-forward. Differences: biases (Llama: per config;
//! Qwen2: q/k/v always; Mistral: none) and sliding-window attention (Mistral; Qwen2 per layer).

use super::decode::{
    decode_via_inputs, decoder_forward, decoder_logits, decoder_only_state, standard_step_inputs,
    DecodeState, Decoder, Parking,
};
use super::{config_check, Batch, Model, ModelInfo, ModelOutput};
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::nn::{BiasMode, Linear, RmsNorm, Rope, SelfAttention, SelfAttentionExtras, Weights};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde_json::Value;
use std::sync::Arc;

/// Which family member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Llama,
    Mistral,
    Qwen2,
}

/// HF's defaults for config.json fields a family member may leave out (the config classes'
/// constructor defaults in transformers 5.x).
struct Defaults {
    vocab_size: usize,
    max_positions: usize,
    /// None: the number of attention heads.
    kv_heads: Option<usize>,
    /// Where `sliding_window` is absent (an explicit null means none).
    sliding_window: Option<usize>,
}

impl Flavor {
    fn defaults(self) -> Defaults {
        match self {
            Flavor::Llama => Defaults {
                vocab_size: 32000,
                max_positions: 2048,
                kv_heads: None,
                sliding_window: None,
            },
            Flavor::Mistral => Defaults {
                vocab_size: 32000,
                max_positions: 4096 * 32,
                kv_heads: Some(8),
                sliding_window: Some(4096),
            },
            Flavor::Qwen2 => Defaults {
                vocab_size: 151936,
                max_positions: 32768,
                kv_heads: Some(32),
                sliding_window: Some(4096),
            },
        }
    }

    /// The flavor of a `model_type`.
    pub fn from_model_type(mt: &str) -> Option<Self> {
        Some(match mt {
            "llama" => Flavor::Llama,
            "mistral" => Flavor::Mistral,
            "qwen2" => Flavor::Qwen2,
            _ => return None,
        })
    }
}

/// How rotary frequencies are derived (HF's `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    Default,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: f64,
    },
}

/// The config.json fields the family uses.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub flavor: Flavor,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub act: String,
    pub max_positions: usize,
    /// max_position_embeddings (HF's default for the flavor where the config leaves it
    /// out): HF caps a default generation length there (positions past it are still
    /// computed).
    pub length_cap: Option<usize>,
    pub rope_theta: f64,
    pub rope: RopeKind,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Sliding window of each layer (None: full causal).
    pub windows: Vec<Option<usize>>,
}

impl LlamaConfig {
    /// Reads config.json, including HF 5.x `rope_parameters` and older `rope_theta` /
    /// `rope_scaling` forms.
    pub fn parse(dir: &ModelDir, flavor: Flavor) -> Result<Self> {
        let v = &dir.config;
        let bad = |msg: String| Error::Config {
            path: dir.path.join("config.json"),
            msg,
        };
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let u = |k: &str, d: usize| {
            get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(d)
        };
        let hidden = get("hidden_size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("missing `hidden_size`".into()))? as usize;
        let defaults = flavor.defaults();
        let heads = u("num_attention_heads", 32);
        config_check(dir, heads > 0, || {
            "num_attention_heads must be positive".into()
        })?;
        // HF: a left-out count takes the class default, an explicit null the head count.
        let kv_heads = match v.get("num_key_value_heads") {
            None => defaults.kv_heads.unwrap_or(heads),
            Some(x) => x.as_u64().map_or(heads, |x| x as usize),
        };
        let head_dim = u("head_dim", hidden / heads);
        config_check(dir, kv_heads > 0 && heads.is_multiple_of(kv_heads), || {
            format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        })?;
        let num_layers = u("num_hidden_layers", 32);
        let max_positions = u("max_position_embeddings", defaults.max_positions);

        // Rope parameters: a non-null legacy rope_scaling wins, then rope_parameters.
        let params = get("rope_scaling")
            .or_else(|| get("rope_parameters"))
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        let pf = |k: &str| params.get(k).and_then(Value::as_f64);
        let rope_theta = pf("rope_theta")
            .or_else(|| get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(10000.0);
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor =
            || pf("factor").ok_or_else(|| bad(format!("rope_type `{rope_type}` needs `factor`")));
        let rope = match rope_type {
            "default" => RopeKind::Default,
            "linear" => RopeKind::Linear { factor: factor()? },
            "dynamic" => RopeKind::Dynamic { factor: factor()? },
            "llama3" => RopeKind::Llama3 {
                factor: factor()?,
                low_freq_factor: pf("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: pf("high_freq_factor").unwrap_or(4.0),
                original_max: pf("original_max_position_embeddings")
                    .unwrap_or(max_positions as f64),
            },
            other => {
                return Err(bad(format!(
                    "rope_type `{other}` is not supported (default, linear, dynamic, llama3)"
                )))
            }
        };
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match flavor {
            Flavor::Llama => (
                flag("attention_bias"),
                flag("attention_bias"),
                flag("mlp_bias"),
            ),
            Flavor::Mistral => (false, false, false),
            Flavor::Qwen2 => (true, false, false),
        };
        let window = match v.get("sliding_window") {
            None => defaults.sliding_window,
            Some(w) => w.as_u64().map(|x| x as usize),
        };
        let windows = match flavor {
            Flavor::Llama => vec![None; num_layers],
            Flavor::Mistral => vec![window; num_layers],
            Flavor::Qwen2 => {
                let window = if flag("use_sliding_window") {
                    window
                } else {
                    None
                };
                match get("layer_types").and_then(Value::as_array) {
                    Some(types) => {
                        config_check(dir, types.len() == num_layers, || {
                            "layer_types must list every layer".into()
                        })?;
                        types
                            .iter()
                            .map(|t| {
                                if t.as_str() == Some("sliding_attention") {
                                    window
                                } else {
                                    None
                                }
                            })
                            .collect()
                    }
                    None => {
                        let first = u("max_window_layers", 28);
                        (0..num_layers)
                            .map(|i| if i >= first { window } else { None })
                            .collect()
                    }
                }
            }
        };
        Ok(LlamaConfig {
            flavor,
            vocab_size: u("vocab_size", defaults.vocab_size),
            hidden_size: hidden,
            intermediate_size: get("intermediate_size")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("missing `intermediate_size`".into()))?
                as usize,
            num_layers,
            heads,
            kv_heads,
            head_dim,
            eps: get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            act: get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu")
                .to_string(),
            max_positions,
            // An explicit null leaves HF no cap.
            length_cap: match v.get("max_position_embeddings") {
                Some(Value::Null) => None,
                _ => Some(max_positions),
            },
            rope_theta,
            rope,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings: flag("tie_word_embeddings"),
            windows,
        })
    }

    /// Inverse frequencies for a forward whose longest sequence has `seq_len` tokens, in f32
    /// as HF computes them.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.head_dim;
        let base_for = |base: f64| -> Vec<f32> {
            (0..dim / 2)
                .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32))
                .collect()
        };
        match &self.rope {
            RopeKind::Default => base_for(self.rope_theta),
            RopeKind::Linear { factor } => base_for(self.rope_theta)
                .iter()
                .map(|f| f / *factor as f32)
                .collect(),
            RopeKind::Dynamic { factor } => {
                let max = self.max_positions as f64;
                if (seq_len as f64) <= max {
                    base_for(self.rope_theta)
                } else {
                    let base = self.rope_theta
                        * ((factor * seq_len as f64 / max) - (factor - 1.0))
                            .powf(dim as f64 / (dim as f64 - 2.0));
                    base_for(base)
                }
            }
            RopeKind::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            } => {
                let (f, lf, hf, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max as f32,
                );
                let (low_wl, high_wl) = (old / lf, old / hf);
                base_for(self.rope_theta)
                    .into_iter()
                    .map(|inv| {
                        let wl = 2.0 * std::f32::consts::PI / inv;
                        let inv_l = if wl > low_wl { inv / f } else { inv };
                        let medium = wl >= high_wl && wl <= low_wl;
                        if medium {
                            let smooth = (old / wl - lf) / (hf - lf);
                            (1.0 - smooth) * inv_l / f + smooth * inv_l
                        } else {
                            inv_l
                        }
                    })
                    .collect()
            }
        }
    }
}

struct Layer {
    ln_attn: RmsNorm,
    attn: SelfAttention,
    window: Option<usize>,
    ln_mlp: RmsNorm,
    /// [gate | up]
    gate_up: Linear,
    down: Linear,
}

/// A loaded Llama, Mistral or Qwen2 causal LM.
pub struct Llama {
    cfg: LlamaConfig,
    act: Activation,
    dtype: DType,
    tokens: Arc<Tensor>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: Arc<Tensor>,
    /// Rotary frequencies on the device when they do not depend on the sequence length
    /// (every rope kind but dynamic NTK scaling).
    fixed_rope: Option<Rope>,
    device: Device,
    /// The last run, kept for the next of its shape (see `decode::Parking`).
    parking: Parking,
}

impl Llama {
    /// Loads *ForCausalLM (`model.` prefix) or base-model weights.
    pub fn load(dir: &ModelDir, flavor: Flavor, dtype: DType, device: &Device) -> Result<Self> {
        let c = LlamaConfig::parse(dir, flavor)?;
        let act = Activation::from_hf(&c.act).map_err(|e| Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let root = Weights::new(&dir.checkpoint, dtype, device);
        let w = if dir.checkpoint.contains("model.embed_tokens.weight") {
            root.pp("model")
        } else {
            root.clone()
        };
        let (d, eps) = (c.hidden_size, c.eps as f32);
        let (qd, kd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let bias = |on: bool| {
            if on {
                BiasMode::Required
            } else {
                BiasMode::None
            }
        };
        let mut layers = Vec::new();
        for i in 0..c.num_layers {
            let l = w.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(Layer {
                ln_attn: RmsNorm::load(&l, "input_layernorm", d, eps)?,
                attn: SelfAttention {
                    qkv: Linear::load_fused_parts(
                        &a,
                        &[("q_proj", qd), ("k_proj", kd), ("v_proj", kd)],
                        d,
                        bias(c.qkv_bias),
                    )?,
                    out: Linear::load(&a, "o_proj", qd, d, c.o_bias)?,
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    head_dim: c.head_dim,
                    scale: (c.head_dim as f32).powf(-0.5),
                },
                window: c.windows[i],
                ln_mlp: RmsNorm::load(&l, "post_attention_layernorm", d, eps)?,
                gate_up: Linear::load_fused_parts(
                    &m,
                    &[
                        ("gate_proj", c.intermediate_size),
                        ("up_proj", c.intermediate_size),
                    ],
                    d,
                    bias(c.mlp_bias),
                )?,
                down: Linear::load(&m, "down_proj", c.intermediate_size, d, c.mlp_bias)?,
            });
        }
        let tokens = Arc::new(w.tensor("embed_tokens.weight", &[c.vocab_size, d])?);
        // A stored head is used even when tied (HF loads every key it finds).
        let head = if root.contains("lm_head.weight") {
            Arc::new(root.tensor("lm_head.weight", &[c.vocab_size, d])?)
        } else if c.tie_word_embeddings {
            tokens.clone()
        } else {
            return Err(Error::MissingTensor {
                dir: dir.path.clone(),
                name: "lm_head.weight".into(),
            });
        };
        let fixed_rope = match c.rope {
            RopeKind::Dynamic { .. } => None,
            _ => Some(Rope {
                inv_freq: Tensor::from_f32(&c.inv_freq(0), &[c.head_dim / 2], DType::F32, device)?,
                attention_scaling: 1.0,
            }),
        };
        Ok(Llama {
            norm: RmsNorm::load(&w, "norm", d, eps)?,
            fixed_rope,
            cfg: c,
            act,
            dtype,
            tokens,
            layers,
            head,
            device: device.clone(),
            parking: Parking::default(),
        })
    }
}

impl Decoder for Llama {
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
        usize::MAX
    }

    /// Dynamic rope scales by the longest live row.
    fn idle_rows_shape_steps(&self) -> bool {
        self.fixed_rope.is_none()
    }

    /// Rotary positions have no table, but HF caps a default generation length at
    /// max_position_embeddings.
    fn default_length_cap(&self) -> usize {
        self.cfg.length_cap.unwrap_or(usize::MAX)
    }

    fn begin(
        &self,
        sources: Option<&[Vec<i64>]>,
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState> {
        let kd = self.cfg.kv_heads * self.cfg.head_dim;
        decoder_only_state(
            "this model",
            sources,
            self.cfg.num_layers,
            rows,
            capacity,
            kd,
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
        let positions = st.positions(st.check_step(tokens)?);
        standard_step_inputs(st, tokens, self.cfg.vocab_size, positions).map(Some)
    }

    fn decode(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor> {
        decode_via_inputs(self, st, tokens)
    }

    fn graph_steps(&self) -> bool {
        // Dynamic rope recomputes its frequencies as sequences grow, and sliding windows
        // clip keys by the query position: both read step-dependent host values.
        self.fixed_rope.is_some() && self.layers.iter().all(|l| l.window.is_none())
    }

    fn decode_inputs(&self, st: &mut DecodeState, inputs: &[Tensor], t: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let [ids, pos, rt, offset] = inputs else {
            return Err(Error::op(
                "decode",
                "expected the four standard step inputs",
            ));
        };
        let dynamic;
        let rope = match &self.fixed_rope {
            Some(r) => r,
            None => {
                // Dynamic rope depends on the longest sequence seen so far (rows whose
                // search has finished step on, but no longer count).
                let longest = (0..st.rows)
                    .filter(|&r| !st.is_idle(r))
                    .map(|r| (st.len + t).saturating_sub(st.key_start[r]))
                    .max()
                    .unwrap_or(0);
                dynamic = Rope {
                    inv_freq: Tensor::from_f32(
                        &c.inv_freq(longest),
                        &[c.head_dim / 2],
                        DType::F32,
                        &self.device,
                    )?,
                    attention_scaling: 1.0,
                };
                &dynamic
            }
        };
        let mut x = ops::embed(&[(&self.tokens, ids)])?;
        let ranges = st.key_ranges(t);
        for (l, cache) in self.layers.iter().zip(st.caches.iter_mut()) {
            let h = l.ln_attn.forward(&x, None)?;
            let extras = SelfAttentionExtras {
                rope: Some((rope, pos)),
                window: l.window,
                ranges: Some(rt),
                offset: Some(offset),
                residual: Some(&x),
                ..Default::default()
            };
            x = l
                .attn
                .forward_cached(&h, st.rows, t, cache, st.len, &ranges, extras)?;
            let h = l.ln_mlp.forward(&x, None)?;
            let h = ops::glu(&l.gate_up.forward(&h, Activation::None)?, self.act)?;
            x = l.down.forward_add(&h, &x)?;
        }
        st.len += t;
        self.norm.forward(&x, None)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::linear(hidden, &self.head, None, Activation::None)
    }
}

impl Model for Llama {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        decoder_forward(self, "this model", batch, 0)
    }

    fn forward_on_device(&self, batch: &Batch) -> Option<Result<Tensor>> {
        Some(decoder_logits(self, "this model", batch, 0).map(|(_, logits)| logits))
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
pub fn info(c: &LlamaConfig) -> ModelInfo {
    ModelInfo {
        architecture: format!(
            "{:?} decoder (RMS pre-norm, rotary, grouped-query attention, gated {})",
            c.flavor, c.act
        ),
        sizes: vec![
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_layers),
            ("num_attention_heads", c.heads),
            ("num_key_value_heads", c.kv_heads),
            ("head_dim", c.head_dim),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flavor: Flavor, config: Value) -> LlamaConfig {
        LlamaConfig::parse(&ModelDir::random("cfg", config, 0), flavor).unwrap()
    }

    /// Fields a config.json leaves out take the defaults of HF's config classes
    /// (transformers 5.17: `LlamaConfig()`, `MistralConfig()`, `Qwen2Config()`, and
    /// `Qwen2Config(use_sliding_window=True)` for the window).
    #[test]
    fn left_out_fields_take_hfs_defaults() {
        let base = serde_json::json!({"hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 64, "num_hidden_layers": 2});
        let with = |extra: Value| {
            let mut c = base.clone();
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            c
        };
        let llama = parse(Flavor::Llama, base.clone());
        assert_eq!(
            (llama.vocab_size, llama.max_positions, llama.kv_heads),
            (32000, 2048, 64)
        );
        assert_eq!(llama.length_cap, Some(2048));
        assert_eq!(llama.windows, vec![None, None]);
        let mistral = parse(Flavor::Mistral, base.clone());
        assert_eq!(
            (mistral.vocab_size, mistral.max_positions, mistral.kv_heads),
            (32000, 131072, 8)
        );
        assert_eq!(mistral.windows, vec![Some(4096), Some(4096)]);
        // An explicit null is no window; null head counts follow the heads; a null
        // max_position_embeddings leaves no default-length cap.
        let nulls = parse(
            Flavor::Qwen2,
            with(serde_json::json!({"num_key_value_heads": null,
                "max_position_embeddings": null})),
        );
        assert_eq!((nulls.kv_heads, nulls.length_cap), (64, None));
        let mistral = parse(
            Flavor::Mistral,
            with(serde_json::json!({"sliding_window": null})),
        );
        assert_eq!(mistral.windows, vec![None, None]);
        let qwen = parse(Flavor::Qwen2, base.clone());
        assert_eq!(
            (qwen.vocab_size, qwen.max_positions, qwen.kv_heads),
            (151936, 32768, 32)
        );
        assert_eq!(qwen.windows, vec![None, None]);
        let qwen = parse(
            Flavor::Qwen2,
            with(serde_json::json!({"use_sliding_window": true, "max_window_layers": 1})),
        );
        assert_eq!(qwen.windows, vec![None, Some(4096)]);
    }
}
