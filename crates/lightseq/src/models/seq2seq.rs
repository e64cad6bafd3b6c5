//! The BART family of encoder-decoders: `bart`, `mbart`, `marian`, `fsmt` and `m2m_100`
//! (M2M100 and NLLB). They share layer names and attention; they differ in position
//! embeddings, embedding scale and norm, norm placement (post-LN: bart, marian, fsmt;
//! pre-LN with final norms: mbart, m2m_100), vocabularies and the LM head. Each difference
//! is decided here from `model_type`, as HF does (config keys such as `normalize_before`
//! are not read by HF's modeling code either).

use super::decode::{
    decode_via_inputs, decoder_forward, decoder_logits, enc_dec_begin, enc_dec_begin_from_states,
    enc_dec_encode_sources, ids_host, standard_step_inputs, upload_step_inputs, DecodeState,
    Decoder, EncoderDecoder, Parking,
};
use super::forward_graph::{self, ForwardGraphs};
use super::{config_check, Batch, Model, ModelInfo, ModelOutput, Padded};
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::nn::positions::{fairseq_sinusoidal, marian_sinusoidal};
use crate::nn::{CrossAttention, LayerNorm, Linear, SelfAttention, SelfAttentionExtras, Weights};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde_json::Value;
use std::sync::Arc;

/// Which member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bart,
    MBart,
    Marian,
    Fsmt,
    M2m100,
}

impl Kind {
    /// The kind for a `model_type`, if it is one of the family.
    pub fn from_model_type(mt: &str) -> Option<Self> {
        Some(match mt {
            "bart" => Kind::Bart,
            "mbart" => Kind::MBart,
            "marian" => Kind::Marian,
            "fsmt" => Kind::Fsmt,
            "m2m_100" => Kind::M2m100,
            _ => return None,
        })
    }

    fn pre_ln(self) -> bool {
        matches!(self, Kind::MBart | Kind::M2m100)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Bart => "BART",
            Kind::MBart => "mBART",
            Kind::Marian => "Marian",
            Kind::Fsmt => "FSMT",
            Kind::M2m100 => "M2M100",
        }
    }
}

/// Sizes and options read from config.json.
#[derive(Debug, Clone)]
pub struct Seq2SeqConfig {
    pub kind: Kind,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub activation: String,
    pub scale_embedding: bool,
    pub max_positions: usize,
    pub pad_token_id: usize,
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    pub tie_word_embeddings: bool,
    /// The encoder and decoder share one token table (`model.shared`): Marian's
    /// `share_encoder_decoder_embeddings`, always for BART, mBART and M2M100, never for FSMT.
    pub share_embeddings: bool,
}

fn get_usize(v: &Value, k: &str) -> Option<usize> {
    v.get(k).and_then(Value::as_u64).map(|x| x as usize)
}

impl Seq2SeqConfig {
    /// Reads config.json with each class's defaults for absent keys.
    pub fn parse(dir: &ModelDir, kind: Kind) -> Result<Self> {
        let v = &dir.config;
        let bad = |msg: String| Error::Config {
            path: dir.path.join("config.json"),
            msg,
        };
        let need =
            |k: &str| get_usize(v, k).ok_or_else(|| bad(format!("missing or invalid `{k}`")));
        let d_model = need("d_model")?;
        let share_embeddings = match kind {
            Kind::Fsmt => false,
            Kind::Marian => v
                .get("share_encoder_decoder_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            _ => true,
        };
        let (src_vocab, tgt_vocab) = match kind {
            Kind::Fsmt => (need("src_vocab_size")?, need("tgt_vocab_size")?),
            // HF sizes a shared table (and the head) by `vocab_size` alone.
            Kind::Marian if share_embeddings => {
                let n = need("vocab_size")?;
                (n, n)
            }
            Kind::Marian => {
                let v_src = need("vocab_size")?;
                (v_src, get_usize(v, "decoder_vocab_size").unwrap_or(v_src))
            }
            _ => {
                let n = need("vocab_size")?;
                (n, n)
            }
        };
        let default_act = if matches!(kind, Kind::Fsmt | Kind::M2m100) {
            "relu"
        } else {
            "gelu"
        };
        let cfg = Seq2SeqConfig {
            kind,
            d_model,
            encoder_layers: get_usize(v, "encoder_layers").unwrap_or(12),
            decoder_layers: get_usize(v, "decoder_layers").unwrap_or(12),
            encoder_heads: get_usize(v, "encoder_attention_heads").unwrap_or(16),
            decoder_heads: get_usize(v, "decoder_attention_heads").unwrap_or(16),
            encoder_ffn_dim: get_usize(v, "encoder_ffn_dim").unwrap_or(4096),
            decoder_ffn_dim: get_usize(v, "decoder_ffn_dim").unwrap_or(4096),
            activation: v
                .get("activation_function")
                .and_then(Value::as_str)
                .unwrap_or(default_act)
                .to_string(),
            scale_embedding: v
                .get("scale_embedding")
                .and_then(Value::as_bool)
                .unwrap_or(matches!(kind, Kind::Fsmt | Kind::M2m100)),
            max_positions: get_usize(v, "max_position_embeddings").unwrap_or(1024),
            pad_token_id: get_usize(v, "pad_token_id").unwrap_or(1),
            src_vocab,
            tgt_vocab,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(kind != Kind::Fsmt),
            share_embeddings,
        };
        for (heads, what) in [
            (cfg.encoder_heads, "encoder_attention_heads"),
            (cfg.decoder_heads, "decoder_attention_heads"),
        ] {
            config_check(dir, heads > 0 && d_model.is_multiple_of(heads), || {
                format!("d_model {d_model} is not a multiple of {what} {heads}")
            })?;
        }
        Ok(cfg)
    }
}

/// How positions are embedded.
enum Positions {
    /// A table indexed by `offset + i` (BART's learned table, Marian's sinusoid), at most
    /// `limit` positions.
    Table {
        table: Tensor,
        offset: usize,
        limit: usize,
    },
    /// fairseq's sinusoid, row `pad + 1 + i`, computed for any length.
    Fairseq {
        table: Tensor,
        rows: usize,
        pad: usize,
        d: usize,
    },
}

struct Embedding {
    tokens: Arc<Tensor>,
    scale: f32,
    positions: Positions,
    norm: Option<LayerNorm>,
}

impl Embedding {
    /// Table rows of a chunk of `t` tokens per row following `past` earlier positions.
    fn rows(&self, tokens: &[Vec<i64>], past: usize) -> Result<Vec<i32>> {
        let mut out = Vec::new();
        for r in tokens {
            match &self.positions {
                Positions::Table { offset, limit, .. } => {
                    if past + r.len() > *limit {
                        return Err(Error::Input(format!(
                            "decoding past the model's {limit} positions"
                        )));
                    }
                    out.extend((0..r.len()).map(|i| (offset + past + i) as i32));
                }
                // fairseq's make_positions with a cache: the k-th non-pad token of the chunk
                // sits at pad + past + k; pad tokens take the (zero) row `pad`.
                Positions::Fairseq { pad, .. } => {
                    let mut k = 0;
                    for &tok in r {
                        if tok == *pad as i64 {
                            out.push(*pad as i32);
                        } else {
                            k += 1;
                            out.push((*pad + past + k) as i32);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The largest table row [`Embedding::rows`] can give a chunk of `t` tokens per row
    /// after `past` positions.
    fn max_row(&self, past: usize, t: usize) -> usize {
        match &self.positions {
            Positions::Table { offset, .. } => offset + past + t - 1,
            Positions::Fairseq { pad, .. } => pad + past + t,
        }
    }

    /// Embeds `ids` at table rows `pos` (i32 on the device), none of which exceeds `max_row`.
    fn forward(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        max_row: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let x = match &self.positions {
            Positions::Table { table, .. } => {
                ops::embed_scaled(&[(&self.tokens, ids), (table, pos)], self.scale)?
            }
            Positions::Fairseq {
                table,
                rows: have,
                pad,
                d,
            } => {
                let need = max_row + 1;
                let grown;
                let t = if need > *have {
                    grown = Tensor::from_f32(
                        &fairseq_sinusoidal(need, *d, Some(*pad)),
                        &[need, *d],
                        dtype,
                        device,
                    )?;
                    &grown
                } else {
                    table
                };
                ops::embed_scaled(&[(&self.tokens, ids), (t, pos)], self.scale)?
            }
        };
        match &self.norm {
            Some(ln) => ln.forward(&x, None),
            None => Ok(x),
        }
    }

    /// Whether a forward up to table row `max_row` computes a larger position table on the
    /// host (fairseq's sinusoid past the rows made at load), which a capture cannot hold.
    fn grows(&self, max_row: usize) -> bool {
        matches!(&self.positions, Positions::Fairseq { rows, .. } if max_row + 1 > *rows)
    }

    fn limit(&self) -> usize {
        match &self.positions {
            Positions::Table { limit, .. } => *limit,
            Positions::Fairseq { .. } => usize::MAX,
        }
    }
}

struct Ffn {
    fc1: Linear,
    fc2: Linear,
}

struct EncoderLayer {
    attn: SelfAttention,
    ln_attn: LayerNorm,
    ffn: Ffn,
    ln_ffn: LayerNorm,
}

struct DecoderLayer {
    attn: SelfAttention,
    ln_attn: LayerNorm,
    cross: CrossAttention,
    ln_cross: LayerNorm,
    ffn: Ffn,
    ln_ffn: LayerNorm,
}

/// A loaded encoder-decoder of the BART family.
pub struct Seq2Seq {
    cfg: Seq2SeqConfig,
    act: Activation,
    dtype: DType,
    enc_embed: Embedding,
    dec_embed: Embedding,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    enc_norm: Option<LayerNorm>,
    dec_norm: Option<LayerNorm>,
    head: Arc<Tensor>,
    head_bias: Option<Tensor>,
    device: Device,
    /// The last run, kept for the next of its shape (see `decode::Parking`).
    parking: Parking,
    /// Encoder forwards replayed as CUDA graphs (see `forward_graph`).
    enc_graphs: ForwardGraphs,
}

const LN_EPS: f32 = 1e-5;

fn self_attention(w: &Weights, d: usize, heads: usize) -> Result<SelfAttention> {
    let hd = d / heads;
    Ok(SelfAttention {
        qkv: Linear::load_fused(w, &["q_proj", "k_proj", "v_proj"], d, d)?,
        out: Linear::load(w, "out_proj", d, d, true)?,
        heads,
        kv_heads: heads,
        head_dim: hd,
        scale: (hd as f32).powf(-0.5),
    })
}

fn cross_attention(w: &Weights, d: usize, heads: usize) -> Result<CrossAttention> {
    let hd = d / heads;
    Ok(CrossAttention {
        q: Linear::load(w, "q_proj", d, d, true)?,
        kv: Linear::load_fused(w, &["k_proj", "v_proj"], d, d)?,
        out: Linear::load(w, "out_proj", d, d, true)?,
        heads,
        head_dim: hd,
        scale: (hd as f32).powf(-0.5),
    })
}

/// The first of `names` the checkpoint holds.
fn first_present<'a>(w: &Weights, names: &[&'a str]) -> Result<&'a str> {
    names
        .iter()
        .copied()
        .find(|n| w.contains(n))
        .ok_or_else(|| Error::MissingTensor {
            dir: std::path::PathBuf::from(w.name("")),
            name: names.join(" or "),
        })
}

/// Full checkpoint names of the token tables and the head.
struct TableNames {
    encoder: String,
    decoder: String,
    head: String,
}

impl TableNames {
    /// Resolves the tables as HF ties them. With `tie_word_embeddings` and a shared table,
    /// the encoder's and decoder's tables and the head are one tensor: `shared` (or the
    /// first of the others present); a name present with values of its own stays its own
    /// table, as HF leaves it untied. `root` is the checkpoint's root, `w` the base model.
    fn resolve(root: &Weights, w: &Weights, cfg: &Seq2SeqConfig) -> Result<Self> {
        let lm_head = root
            .contains("lm_head.weight")
            .then(|| "lm_head.weight".to_string());
        // `name` when present with values other than `source`'s, else `source`.
        let own = |name: Option<String>, source: &str| -> Result<String> {
            Ok(match name {
                Some(n) if n != source && !root.same_values(&n, source)? => n,
                _ => source.to_string(),
            })
        };
        let present = |n: &str| w.contains(n).then(|| w.name(n));
        let first = |names: &[&str]| first_present(w, names).map(|n| w.name(n));
        if cfg.kind == Kind::Fsmt {
            let head = if cfg.tie_word_embeddings {
                w.name("decoder.embed_tokens.weight")
            } else {
                first(&[
                    "decoder.output_projection.weight",
                    "decoder.embed_tokens.weight",
                ])?
            };
            return Ok(TableNames {
                encoder: first(&["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"])?,
                decoder: first(&["decoder.embed_tokens.weight", "shared.weight"])?,
                head,
            });
        }
        if !cfg.tie_word_embeddings || !cfg.share_embeddings {
            let decoder = first(&["decoder.embed_tokens.weight", "shared.weight"])?;
            let head = if cfg.tie_word_embeddings {
                own(lm_head, &decoder)?
            } else {
                lm_head.unwrap_or_else(|| decoder.clone())
            };
            return Ok(TableNames {
                encoder: first(&["encoder.embed_tokens.weight", "shared.weight"])?,
                decoder,
                head,
            });
        }
        // One table for all three: whichever of them the checkpoint holds, as HF ties.
        let source = [
            "shared.weight",
            "decoder.embed_tokens.weight",
            "encoder.embed_tokens.weight",
        ]
        .iter()
        .find_map(|n| present(n))
        .or_else(|| lm_head.clone())
        .ok_or_else(|| Error::MissingTensor {
            dir: std::path::PathBuf::from(w.name("")),
            name: "shared.weight, an embed_tokens.weight or lm_head.weight".into(),
        })?;
        Ok(TableNames {
            encoder: own(present("encoder.embed_tokens.weight"), &source)?,
            decoder: own(present("decoder.embed_tokens.weight"), &source)?,
            head: own(lm_head, &source)?,
        })
    }
}

impl Seq2Seq {
    /// Loads a BART-family checkpoint (the *ForConditionalGeneration layout, or the base
    /// model's without the `model.` prefix).
    pub fn load(dir: &ModelDir, kind: Kind, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = Seq2SeqConfig::parse(dir, kind)?;
        let act = Activation::from_hf(&cfg.activation).map_err(|e| Error::Config {
            path: dir.path.join("config.json"),
            msg: e.to_string(),
        })?;
        let root = Weights::new(&dir.checkpoint, dtype, device);
        let has_prefix = dir
            .checkpoint
            .names()
            .any(|n| n.starts_with("model.encoder."));
        let w = if has_prefix {
            root.pp("model")
        } else {
            root.clone()
        };
        let d = cfg.d_model;
        let (sv, tv) = (cfg.src_vocab, cfg.tgt_vocab);

        // Token tables and head, resolved as HF ties them.
        let names = TableNames::resolve(&root, &w, &cfg)?;
        // Tables shared under one name (tied embeddings) are loaded once.
        let mut loaded: std::collections::HashMap<String, Arc<Tensor>> =
            std::collections::HashMap::new();
        let mut table = |full: &str, rows: usize| -> Result<Arc<Tensor>> {
            if let Some(t) = loaded.get(full) {
                if t.shape()[0] != rows {
                    return Err(Error::TensorShape {
                        dir: dir.path.clone(),
                        name: full.to_string(),
                        expected: vec![rows, d],
                        found: t.shape().to_vec(),
                    });
                }
                return Ok(t.clone());
            }
            let t = Arc::new(root.tensor(full, &[rows, d])?);
            loaded.insert(full.to_string(), t.clone());
            Ok(t)
        };
        let enc_tokens = table(&names.encoder, sv)?;
        let dec_tokens = table(&names.decoder, tv)?;
        let head = table(&names.head, tv)?;
        let head_bias = if matches!(kind, Kind::Bart | Kind::MBart | Kind::Marian)
            && root.contains("final_logits_bias")
        {
            let b = root.read_f32("final_logits_bias", &[1, tv])?;
            Some(root.from_f32(&b, &[tv])?)
        } else {
            None
        };

        let scale = if cfg.scale_embedding {
            (d as f32).sqrt()
        } else {
            1.0
        };
        let embedding = |side: &str, tokens: Arc<Tensor>| -> Result<Embedding> {
            let s = w.pp(side);
            let (positions, norm) = match kind {
                Kind::Bart | Kind::MBart => (
                    Positions::Table {
                        table: s.tensor("embed_positions.weight", &[cfg.max_positions + 2, d])?,
                        offset: 2,
                        limit: cfg.max_positions,
                    },
                    Some(LayerNorm::load(&s, "layernorm_embedding", d, LN_EPS)?),
                ),
                Kind::Marian => (
                    Positions::Table {
                        table: w.from_f32(
                            &marian_sinusoidal(cfg.max_positions, d),
                            &[cfg.max_positions, d],
                        )?,
                        offset: 0,
                        limit: cfg.max_positions,
                    },
                    None,
                ),
                Kind::Fsmt | Kind::M2m100 => {
                    let rows = cfg.max_positions + cfg.pad_token_id + 1;
                    // FSMT checkpoints store the table (HF loads it); M2M100 never does.
                    let table = if kind == Kind::Fsmt && s.contains("embed_positions.weight") {
                        s.tensor("embed_positions.weight", &[rows, d])?
                    } else {
                        w.from_f32(
                            &fairseq_sinusoidal(rows, d, Some(cfg.pad_token_id)),
                            &[rows, d],
                        )?
                    };
                    (
                        Positions::Fairseq {
                            table,
                            rows,
                            pad: cfg.pad_token_id,
                            d,
                        },
                        None,
                    )
                }
            };
            Ok(Embedding {
                tokens,
                scale,
                positions,
                norm,
            })
        };
        let enc_embed = embedding("encoder", enc_tokens)?;
        let dec_embed = embedding("decoder", dec_tokens)?;

        let mut encoder = Vec::with_capacity(cfg.encoder_layers);
        for i in 0..cfg.encoder_layers {
            let l = w.pp("encoder.layers").pp(i);
            encoder.push(EncoderLayer {
                attn: self_attention(&l.pp("self_attn"), d, cfg.encoder_heads)?,
                ln_attn: LayerNorm::load(&l, "self_attn_layer_norm", d, LN_EPS)?,
                ffn: Ffn {
                    fc1: Linear::load(&l, "fc1", d, cfg.encoder_ffn_dim, true)?,
                    fc2: Linear::load(&l, "fc2", cfg.encoder_ffn_dim, d, true)?,
                },
                ln_ffn: LayerNorm::load(&l, "final_layer_norm", d, LN_EPS)?,
            });
        }
        let mut decoder = Vec::with_capacity(cfg.decoder_layers);
        for i in 0..cfg.decoder_layers {
            let l = w.pp("decoder.layers").pp(i);
            decoder.push(DecoderLayer {
                attn: self_attention(&l.pp("self_attn"), d, cfg.decoder_heads)?,
                ln_attn: LayerNorm::load(&l, "self_attn_layer_norm", d, LN_EPS)?,
                cross: cross_attention(&l.pp("encoder_attn"), d, cfg.decoder_heads)?,
                ln_cross: LayerNorm::load(&l, "encoder_attn_layer_norm", d, LN_EPS)?,
                ffn: Ffn {
                    fc1: Linear::load(&l, "fc1", d, cfg.decoder_ffn_dim, true)?,
                    fc2: Linear::load(&l, "fc2", cfg.decoder_ffn_dim, d, true)?,
                },
                ln_ffn: LayerNorm::load(&l, "final_layer_norm", d, LN_EPS)?,
            });
        }
        let (enc_norm, dec_norm) = if kind.pre_ln() {
            (
                Some(LayerNorm::load(&w.pp("encoder"), "layer_norm", d, LN_EPS)?),
                Some(LayerNorm::load(&w.pp("decoder"), "layer_norm", d, LN_EPS)?),
            )
        } else {
            (None, None)
        };
        Ok(Seq2Seq {
            cfg,
            act,
            dtype,
            enc_embed,
            dec_embed,
            encoder,
            decoder,
            enc_norm,
            dec_norm,
            head,
            head_bias,
            device: device.clone(),
            parking: Parking::default(),
            enc_graphs: ForwardGraphs::default(),
        })
    }

    /// Post-LN: `LN(x + f(x))`; pre-LN: `x + f(LN(x))`.
    fn residual(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        f: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.cfg.kind.pre_ln() {
            let y = f(&ln.forward(x, None)?)?;
            ops::add(x, &y)
        } else {
            let y = f(x)?;
            ln.forward(&y, Some(x))
        }
    }

    fn ffn(&self, f: &Ffn, x: &Tensor) -> Result<Tensor> {
        let h = f.fc1.forward(x, self.act)?;
        f.fc2.forward(&h, Activation::None)
    }

    /// [`Seq2Seq::residual`] of the feed-forward block; post-LN, its second GEMM adds the
    /// residual and normalizes in one ([`Linear::forward_add_norm`]).
    fn ffn_block(&self, f: &Ffn, ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        if self.cfg.kind.pre_ln() {
            return self.residual(x, ln, |h| self.ffn(f, h));
        }
        let h = f.fc1.forward(x, self.act)?;
        f.fc2.forward_add_norm(&h, x, ln)
    }

    /// The encoder from device inputs: token ids, position rows (none above `max_row`), key
    /// ranges (starts, then ends; `ranges` on the host).
    fn encoder_from(
        &self,
        p: &Padded,
        ranges: &[(usize, usize)],
        max_row: usize,
        inputs: &[Tensor],
    ) -> Result<Tensor> {
        let [ids, pos, rt] = inputs else {
            return Err(Error::op("encoder", "expected three inputs"));
        };
        let mut x = self
            .enc_embed
            .forward(ids, pos, max_row, self.dtype, &self.device)?;
        for l in &self.encoder {
            x = self.residual(&x, &l.ln_attn, |h| {
                l.attn.forward(
                    h,
                    p.batch,
                    p.len,
                    ranges,
                    false,
                    SelfAttentionExtras {
                        ranges: Some(rt),
                        ..Default::default()
                    },
                )
            })?;
            x = self.ffn_block(&l.ffn, &l.ln_ffn, &x)?;
        }
        if let Some(n) = &self.enc_norm {
            x = n.forward(&x, None)?;
        }
        Ok(x)
    }
}

impl EncoderDecoder for Seq2Seq {
    fn name(&self) -> String {
        self.cfg.kind.name().to_string()
    }

    fn encode(&self, src: &[Vec<i64>]) -> Result<(Tensor, Padded)> {
        let p = Padded::new(src, self.cfg.src_vocab, self.enc_embed.limit())?;
        let pad = self.cfg.pad_token_id as i64;
        let padded = p.pad_rows(src, pad);
        let ids = ids_host(&padded, self.cfg.src_vocab)?;
        let pos = self.enc_embed.rows(&padded, 0)?;
        // The bound of the padded length, not this batch's largest row: a captured forward
        // serves every batch of its shape.
        let max_row = self.enc_embed.max_row(0, p.len.max(1));
        let ranges: Vec<(usize, usize)> = p.lengths.iter().map(|&n| (0, n)).collect();
        let mut range_ids = vec![0i32; p.batch];
        range_ids.extend(p.lengths.iter().map(|&n| n as i32));
        let host = [ids, pos, range_ids];
        let body = |t: &[Tensor]| self.encoder_from(&p, &ranges, max_row, t);
        let x = if p.len == 0 || self.enc_embed.grows(max_row) {
            body(&upload_step_inputs(&host, &self.device)?)?
        } else {
            // Every length-dependent value reaches the kernels through the ranges on the
            // device, so one graph serves every batch of this padded shape.
            let n = p.batch * p.len;
            let shape = forward_graph::Shape {
                key: vec![p.batch, p.len],
                tokens: n,
                out: (&[n, self.cfg.d_model], self.dtype),
            };
            self.enc_graphs.run(&self.device, shape, &host, body)?
        };
        Ok((x, p))
    }

    fn cross_attentions(&self) -> Vec<&CrossAttention> {
        self.decoder.iter().map(|l| &l.cross).collect()
    }

    fn cache_width(&self) -> usize {
        self.cfg.d_model
    }

    fn memory_layout(&self) -> (usize, DType, &Device) {
        (self.cfg.d_model, self.dtype, &self.device)
    }

    fn parking(&self) -> Option<&Parking> {
        Some(&self.parking)
    }
}

impl Decoder for Seq2Seq {
    fn vocab(&self) -> usize {
        self.cfg.tgt_vocab
    }

    fn is_encoder_decoder(&self) -> bool {
        true
    }

    fn decoder_device(&self) -> &Device {
        &self.device
    }

    fn max_decoder_positions(&self) -> usize {
        self.dec_embed.limit()
    }

    fn begin(
        &self,
        sources: Option<&[Vec<i64>]>,
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState> {
        enc_dec_begin(self, sources, rows, capacity)
    }

    fn park(&self, st: DecodeState) {
        self.parking.park(st);
    }

    fn release_kept_state(&self) {
        self.parking.clear();
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

    fn step_ids_from_device(&self) -> bool {
        matches!(self.dec_embed.positions, Positions::Table { .. })
    }

    fn step_inputs(&self, st: &DecodeState, tokens: &[Vec<i64>]) -> Result<Option<Vec<Vec<i32>>>> {
        let rows = self.dec_embed.rows(tokens, st.len)?;
        standard_step_inputs(st, tokens, self.cfg.tgt_vocab, rows).map(Some)
    }

    fn decode(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor> {
        decode_via_inputs(self, st, tokens)
    }

    fn decode_inputs(&self, st: &mut DecodeState, inputs: &[Tensor], t: usize) -> Result<Tensor> {
        let [ids, pos, rt, offset] = inputs else {
            return Err(Error::op(
                "decode",
                "expected the four standard step inputs",
            ));
        };
        let max_row = self.dec_embed.max_row(st.len, t);
        let mut x = self
            .dec_embed
            .forward(ids, pos, max_row, self.dtype, &self.device)?;
        let ranges = st.key_ranges(t);
        let (n_rows, len) = (st.rows, st.len);
        for ((l, cache), kv) in self.decoder.iter().zip(st.caches.iter_mut()).zip(&st.cross) {
            x = self.residual(&x, &l.ln_attn, |h| {
                l.attn.forward_cached(
                    h,
                    n_rows,
                    t,
                    cache,
                    len,
                    &ranges,
                    SelfAttentionExtras {
                        ranges: Some(rt),
                        offset: Some(offset),
                        ..Default::default()
                    },
                )
            })?;
            x = self.residual(&x, &l.ln_cross, |h| {
                l.cross.forward(
                    h,
                    n_rows,
                    t,
                    kv,
                    &st.src_ranges,
                    st.src_ranges_dev.as_ref(),
                    None,
                )
            })?;
            x = self.ffn_block(&l.ffn, &l.ln_ffn, &x)?;
        }
        st.len += t;
        match &self.dec_norm {
            Some(n) => n.forward(&x, None),
            None => Ok(x),
        }
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::linear(
            hidden,
            &self.head,
            self.head_bias.as_ref(),
            Activation::None,
        )
    }
}

impl Model for Seq2Seq {
    fn forward(&self, batch: &Batch) -> Result<ModelOutput> {
        decoder_forward(
            self,
            self.cfg.kind.name(),
            batch,
            self.cfg.pad_token_id as i64,
        )
    }

    fn forward_on_device(&self, batch: &Batch) -> Option<Result<Tensor>> {
        let pad = self.cfg.pad_token_id as i64;
        Some(decoder_logits(self, self.cfg.kind.name(), batch, pad).map(|(_, logits)| logits))
    }

    fn info(&self) -> ModelInfo {
        info(&self.cfg)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.tgt_vocab
    }

    fn max_positions(&self) -> usize {
        self.dec_embed.limit()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Architecture and sizes from the config alone.
pub fn info(c: &Seq2SeqConfig) -> ModelInfo {
    ModelInfo {
        architecture: format!(
            "{} encoder-decoder ({}, {})",
            c.kind.name(),
            if c.kind.pre_ln() { "pre-LN" } else { "post-LN" },
            c.activation
        ),
        sizes: vec![
            ("d_model", c.d_model),
            ("encoder_layers", c.encoder_layers),
            ("decoder_layers", c.decoder_layers),
            ("encoder_attention_heads", c.encoder_heads),
            ("decoder_attention_heads", c.decoder_heads),
            ("encoder_ffn_dim", c.encoder_ffn_dim),
            ("decoder_ffn_dim", c.decoder_ffn_dim),
            ("source vocab", c.src_vocab),
            ("target vocab", c.tgt_vocab),
            ("max_position_embeddings", c.max_positions),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::serialize_f32;

    /// A Marian-shaped directory holding only the named tables (`value` fills each).
    fn dir(cfg: Value, tables: &[(&str, f32)]) -> ModelDir {
        let data: Vec<(String, Vec<f32>)> = tables
            .iter()
            .map(|(n, v)| (n.to_string(), (0..24).map(|i| v + i as f32).collect()))
            .collect();
        let refs: Vec<(&str, &[usize], &[f32])> = data
            .iter()
            .map(|(n, v)| (n.as_str(), &[6usize, 4][..], &v[..]))
            .collect();
        let bytes: &'static [u8] = Box::leak(serialize_f32(&refs).into_boxed_slice());
        ModelDir::from_static("tables", &cfg.to_string(), bytes).unwrap()
    }

    fn marian(extra: Value) -> Value {
        let mut c = serde_json::json!({"model_type": "marian", "d_model": 4, "vocab_size": 6,
            "encoder_attention_heads": 1, "decoder_attention_heads": 1});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    }

    fn resolved(d: &ModelDir) -> (String, String, String) {
        let cfg = Seq2SeqConfig::parse(d, Kind::Marian).unwrap();
        let root = Weights::new(&d.checkpoint, DType::F32, &Device::Cpu);
        let t = TableNames::resolve(&root, &root.pp("model"), &cfg).unwrap();
        (t.encoder, t.decoder, t.head)
    }

    const SHARED: &str = "model.shared.weight";
    const ENC: &str = "model.encoder.embed_tokens.weight";
    const DEC: &str = "model.decoder.embed_tokens.weight";
    const HEAD: &str = "lm_head.weight";

    #[test]
    fn aliases_of_one_table_load_once() {
        // A torch .bin file stores every alias of a tied table.
        let d = dir(
            marian(serde_json::json!({})),
            &[(SHARED, 1.0), (ENC, 1.0), (DEC, 1.0), (HEAD, 1.0)],
        );
        assert_eq!(resolved(&d), (SHARED.into(), SHARED.into(), SHARED.into()));
        // Without `shared`, the decoder's table is the source.
        let d = dir(marian(serde_json::json!({})), &[(ENC, 2.0), (DEC, 2.0)]);
        assert_eq!(resolved(&d), (DEC.into(), DEC.into(), DEC.into()));
        // A random checkpoint is a fresh HF model: one table.
        let d = ModelDir::random("r", marian(serde_json::json!({})), 0);
        assert_eq!(resolved(&d), (SHARED.into(), SHARED.into(), SHARED.into()));
    }

    #[test]
    fn one_present_alias_serves_all_three() {
        let d = dir(marian(serde_json::json!({})), &[(DEC, 2.0)]);
        assert_eq!(resolved(&d), (DEC.into(), DEC.into(), DEC.into()));
        let d = dir(marian(serde_json::json!({})), &[(ENC, 2.0)]);
        assert_eq!(resolved(&d), (ENC.into(), ENC.into(), ENC.into()));
    }

    #[test]
    fn a_table_shared_by_vocabularies_of_two_sizes_is_refused() {
        // Separate vocabularies (6 and 5 ids) resolved to the one `shared` table.
        let cfg = marian(serde_json::json!({
            "share_encoder_decoder_embeddings": false, "decoder_vocab_size": 5
        }));
        // A base model's names (no `model.` prefix).
        let d = dir(cfg, &[("shared.weight", 1.0)]);
        let e = Seq2Seq::load(&d, Kind::Marian, DType::F32, &Device::Cpu).err();
        assert!(
            matches!(e, Some(Error::TensorShape { .. })),
            "expected a shape error, got {e:?}"
        );
    }

    #[test]
    fn tables_with_their_own_values_stay_untied() {
        let d = dir(
            marian(serde_json::json!({})),
            &[(SHARED, 1.0), (ENC, 3.0), (DEC, 1.0), (HEAD, 5.0)],
        );
        assert_eq!(resolved(&d), (ENC.into(), SHARED.into(), HEAD.into()));
        // Separate vocabularies: the head ties to the decoder's table only.
        let split = marian(serde_json::json!({"share_encoder_decoder_embeddings": false}));
        let d = dir(split.clone(), &[(ENC, 1.0), (DEC, 2.0), (HEAD, 2.0)]);
        assert_eq!(resolved(&d), (ENC.into(), DEC.into(), DEC.into()));
        let d = dir(split, &[(ENC, 1.0), (DEC, 2.0), (HEAD, 4.0)]);
        assert_eq!(resolved(&d), (ENC.into(), DEC.into(), HEAD.into()));
        // An untied head is the checkpoint's lm_head, whatever its values.
        let untied = marian(serde_json::json!({"tie_word_embeddings": false}));
        let d = dir(untied, &[(SHARED, 1.0), (HEAD, 1.0)]);
        assert_eq!(resolved(&d), (SHARED.into(), SHARED.into(), HEAD.into()));
    }
}
