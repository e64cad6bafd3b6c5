//! ViT (`model_type: vit`): patch embedding (a convolution with kernel = stride = patch,
//! computed as a GEMM over unfolded patches), a CLS token, learned positions, pre-LN
//! encoder layers and a final layer norm. Returns the last hidden state [batch, 1 + patches, hidden].

use super::{config_check, Batch, Model, ModelInfo, ModelOutput, Padded};
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::nn::{BiasMode, LayerNorm, Linear, SelfAttention, SelfAttentionExtras, Weights};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde_json::Value;

/// The config.json fields ViT uses.
#[derive(Debug, Clone)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub act: String,
    pub eps: f64,
    pub image: (usize, usize),
    pub patch: (usize, usize),
    pub channels: usize,
    pub qkv_bias: bool,
}

fn pair(v: Option<&Value>, d: usize) -> Option<(usize, usize)> {
    match v {
        None | Some(Value::Null) => Some((d, d)),
        Some(Value::Number(n)) => n.as_u64().map(|x| (x as usize, x as usize)),
        Some(Value::Array(a)) if a.len() == 2 => {
            Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
        }
        _ => None,
    }
}

impl VitConfig {
    /// Reads config.json with HF's defaults.
    pub fn parse(dir: &ModelDir) -> Result<Self> {
        let v = &dir.config;
        let bad = |msg: &str| Error::Config {
            path: dir.path.join("config.json"),
            msg: msg.into(),
        };
        let u = |k: &str, d: usize| {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(d)
        };
        let c = VitConfig {
            hidden_size: u("hidden_size", 768),
            num_layers: u("num_hidden_layers", 12),
            heads: u("num_attention_heads", 12),
            intermediate_size: u("intermediate_size", 3072),
            act: v
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("gelu")
                .to_string(),
            eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            image: pair(v.get("image_size"), 224).ok_or_else(|| bad("invalid `image_size`"))?,
            patch: pair(v.get("patch_size"), 16).ok_or_else(|| bad("invalid `patch_size`"))?,
            channels: u("num_channels", 3),
            qkv_bias: v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
        };
        config_check(
            dir,
            c.heads > 0 && c.hidden_size.is_multiple_of(c.heads),
            || "hidden_size is not a multiple of num_attention_heads".into(),
        )?;
        config_check(
            dir,
            c.patch.0 > 0
                && c.patch.1 > 0
                && c.image.0.is_multiple_of(c.patch.0)
                && c.image.1.is_multiple_of(c.patch.1),
            || {
                format!(
                    "image_size {:?} is not a multiple of patch_size {:?}",
                    c.image, c.patch
                )
            },
        )?;
        Ok(c)
    }

    /// Patches per column and per row.
    pub fn grid(&self) -> (usize, usize) {
        (self.image.0 / self.patch.0, self.image.1 / self.patch.1)
    }
}

struct Layer {
    ln_before: LayerNorm,
    attn: SelfAttention,
    ln_after: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A loaded ViT encoder.
pub struct Vit {
    cfg: VitConfig,
    act: Activation,
    /// [hidden, channels * ph * pw]
    patch: Linear,
    /// Row 0: cls - patch bias + position 0; row i: position i. [1 + patches, hidden]
    extra: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    device: Device,
}

impl Vit {
    /// Loads ViTModel (or `vit.`-prefixed classification) weights.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let c = VitConfig::parse(dir)?;
        let act = Activation::from_hf(&c.act).map_err(|e| Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let root = Weights::new(&dir.checkpoint, dtype, device);
        let w = if dir.checkpoint.contains("vit.embeddings.cls_token") {
            root.pp("vit")
        } else {
            root.clone()
        };
        let (d, eps) = (c.hidden_size, c.eps as f32);
        let (gh, gw) = c.grid();
        let np = gh * gw;
        let k = c.channels * c.patch.0 * c.patch.1;
        let e = w.pp("embeddings");
        let pw = e.read_f32(
            "patch_embeddings.projection.weight",
            &[d, c.channels, c.patch.0, c.patch.1],
        )?;
        let pb = e.read_f32("patch_embeddings.projection.bias", &[d])?;
        let cls = e.read_f32("cls_token", &[1, 1, d])?;
        let mut extra = e.read_f32("position_embeddings", &[1, np + 1, d])?;
        for j in 0..d {
            extra[j] += cls[j] - pb[j];
        }
        let mut layers = Vec::new();
        let hd = d / c.heads;
        for i in 0..c.num_layers {
            let l = w.pp("encoder.layer").pp(i);
            let a = l.pp("attention");
            let qkv_bias = if c.qkv_bias {
                BiasMode::Required
            } else {
                BiasMode::None
            };
            layers.push(Layer {
                ln_before: LayerNorm::load(&l, "layernorm_before", d, eps)?,
                attn: SelfAttention {
                    qkv: Linear::load_fused_parts(
                        &a.pp("attention"),
                        &[("query", d), ("key", d), ("value", d)],
                        d,
                        qkv_bias,
                    )?,
                    out: Linear::load(&a.pp("output"), "dense", d, d, true)?,
                    heads: c.heads,
                    kv_heads: c.heads,
                    head_dim: hd,
                    scale: (hd as f32).powf(-0.5),
                },
                ln_after: LayerNorm::load(&l, "layernorm_after", d, eps)?,
                fc1: Linear::load(&l.pp("intermediate"), "dense", d, c.intermediate_size, true)?,
                fc2: Linear::load(&l.pp("output"), "dense", c.intermediate_size, d, true)?,
            });
        }
        Ok(Vit {
            patch: Linear {
                weight: w.from_f32(&pw, &[d, k])?,
                bias: Some(w.from_f32(&pb, &[d])?),
            },
            extra: w.from_f32(&extra, &[np + 1, d])?,
            layers,
            norm: LayerNorm::load(&w, "layernorm", d, eps)?,
            cfg: c,
            act,
            device: device.clone(),
        })
    }

    /// Unfolds images [b, c, h, w] into rows [b * (1 + patches), c * ph * pw]: a zero row for
    /// the CLS position, then each patch in row-major grid order, values in (c, y, x) order
    /// like the convolution weight.
    fn unfold(&self, shape: &[usize], px: &[f32]) -> Vec<f32> {
        let c = &self.cfg;
        let (b, ch, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let (gh, gw) = c.grid();
        let (ph, pw) = c.patch;
        let k = ch * ph * pw;
        let mut out = vec![0f32; b * (1 + gh * gw) * k];
        for bi in 0..b {
            for gy in 0..gh {
                for gx in 0..gw {
                    let row = &mut out[(bi * (1 + gh * gw) + 1 + gy * gw + gx) * k..][..k];
                    for cc in 0..ch {
                        for y in 0..ph {
                            let src = ((bi * ch + cc) * h + gy * ph + y) * w + gx * pw;
                            row[(cc * ph + y) * pw..][..pw].copy_from_slice(&px[src..src + pw]);
                        }
                    }
                }
            }
        }
        out
    }
}

impl Model for Vit {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        let c = &self.cfg;
        let (shape, px) = batch.pixel_values.as_ref().ok_or_else(|| {
            Error::Input(
                "ViT needs `pixel_values` [batch, channels, height, width] (an .safetensors input)"
                    .into(),
            )
        })?;
        if shape.len() != 4
            || shape[1] != c.channels
            || (shape[2], shape[3]) != c.image
            || px.len() != shape.iter().product::<usize>()
        {
            return Err(Error::Input(format!(
                "pixel_values {shape:?} do not match the model's [batch, {}, {}, {}]",
                c.channels, c.image.0, c.image.1
            )));
        }
        let (gh, gw) = c.grid();
        let seq = 1 + gh * gw;
        let b = shape[0];
        let n = b * seq;
        let d = c.hidden_size;
        let k = c.channels * c.patch.0 * c.patch.1;
        let rows = Tensor::from_f32(
            &self.unfold(shape, px),
            &[n, k],
            self.extra.dtype(),
            &self.device,
        )?;
        let idx: Vec<i32> = (0..n).map(|i| (i % seq) as i32).collect();
        let idx = Tensor::from_i32(&idx, &[n], &self.device)?;
        let mut x = ops::add(
            &self.patch.forward(&rows, Activation::None)?,
            &ops::embed(&[(&self.extra, &idx)])?,
        )?;
        let ranges = vec![(0, seq); b];
        for l in &self.layers {
            let h = l.ln_before.forward(&x, None)?;
            x = ops::add(
                &x,
                &l.attn
                    .forward(&h, b, seq, &ranges, false, SelfAttentionExtras::default())?,
            )?;
            let h = l.ln_after.forward(&x, None)?;
            x = ops::add(
                &x,
                &l.fc2
                    .forward(&l.fc1.forward(&h, self.act)?, Activation::None)?,
            )?;
        }
        let x = self.norm.forward(&x, None)?.reshape(&[n, d])?;
        let p = Padded {
            batch: b,
            len: seq,
            lengths: vec![seq; b],
        };
        p.output("hidden", &x)
    }

    fn info(&self) -> ModelInfo {
        info(&self.cfg)
    }

    fn vocab_size(&self) -> usize {
        0
    }

    fn max_positions(&self) -> usize {
        let (gh, gw) = self.cfg.grid();
        1 + gh * gw
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Architecture and sizes from the config alone.
pub fn info(c: &VitConfig) -> ModelInfo {
    ModelInfo {
        architecture: format!(
            "ViT encoder (pre-LN, {}, {}x{} images, {}x{} patches)",
            c.act, c.image.0, c.image.1, c.patch.0, c.patch.1
        ),
        sizes: vec![
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_layers),
            ("num_attention_heads", c.heads),
            ("intermediate_size", c.intermediate_size),
            ("num_channels", c.channels),
        ],
    }
}
