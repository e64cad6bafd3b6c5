//! Trainable models built from [`super::layers`]: encoder-decoders of the BART family
//! (Marian, BART, mBART), GPT2 (causal LM), BERT (masked LM and sequence classification),
//! ViT (image classification, with [`super::vit`]'s patch embedding).
//! Weights load from HF checkpoints under HF names and are written back under them.

use super::head;
use super::layers::{as_dtype_of, Attn, Dropout, Emb, Ffn, Layer, LayerInputs, Lin, Ln, Positions};
use super::ops as tops;
use super::params::{Params, Pid};
use crate::error::{Error, Result};
use crate::io::{Checkpoint, ModelDir};
use crate::models::seq2seq::{Kind, Seq2SeqConfig};
use crate::nn::positions::marian_sinusoidal;
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};
use serde_json::Value;

/// One training example.
#[derive(Debug, Clone)]
pub enum Example {
    /// Encoder-decoder: the decoder reads `decoder_start` + tgt[..-1] and predicts tgt.
    Seq2Seq { src: Vec<i64>, tgt: Vec<i64> },
    /// Causal LM: predicts ids[1..] from ids[..-1].
    Causal { ids: Vec<i64> },
    /// Masked LM: predicts `labels[i]` where it is not -100.
    Masked { ids: Vec<i64>, labels: Vec<i64> },
    /// Sequence classification.
    Classify {
        ids: Vec<i64>,
        types: Option<Vec<i64>>,
        label: i64,
    },
    /// Image classification: pixel values [channels, height, width], row-major.
    Image { pixels: Vec<f32>, label: i64 },
}

impl Example {
    /// Tokens the example occupies (for batching by `--max-tokens`).
    pub fn size(&self) -> usize {
        match self {
            Example::Seq2Seq { src, tgt } => src.len().max(tgt.len()),
            Example::Causal { ids } => ids.len().saturating_sub(1),
            Example::Masked { ids, .. } | Example::Classify { ids, .. } => ids.len(),
            Example::Image { .. } => 1,
        }
    }
}

/// What a model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Seq2Seq,
    CausalLm,
    MaskedLm,
    Classify,
    ImageClassify,
}

enum Head {
    /// logits = x @ table^T (+ constant bias).
    Tied { table: Pid, bias: Option<Tensor> },
    /// BERT's MLM head: LN(act(dense(x))) @ table^T + bias.
    Mlm {
        dense: Lin,
        act: Activation,
        ln: Ln,
        table: Pid,
        bias: Pid,
    },
    /// A classifier on the first position (ViT's CLS token).
    First { classifier: Lin, labels: usize },
    /// BERT's pooler (tanh(dense(x[:, 0]))) and classifier.
    Pooler {
        dense: Lin,
        classifier: Lin,
        labels: usize,
        dropout: f32,
    },
}

/// A model being trained.
pub struct Net {
    pub task: Task,
    pub params: Params,
    encoder_emb: Option<Emb>,
    encoder: Vec<Layer>,
    encoder_norm: Option<Ln>,
    decoder_emb: Option<Emb>,
    decoder: Vec<Layer>,
    decoder_norm: Option<Ln>,
    head: Head,
    pad: i64,
    decoder_start: i64,
    vocab: usize,
    /// Embedding rows whose lookups get no gradient (HF's `padding_idx`).
    padding_idx: Option<i64>,
    pub dropout: (f32, f32, f32),
    /// ViT's patch embedding (image models only).
    patches: Option<super::vit::PatchEmb>,
}

/// Statistics of one forward/backward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassStats {
    pub loss_sum: f64,
    pub nll_sum: f64,
    pub tokens: usize,
}

/// [`PassStats`] whose sums are still on the device: reading them waits for the work
/// enqueued before, so a pass defers that read until the backward is enqueued too (no host
/// round trip between the forward and the backward), and the trainer until its update's
/// last work is.
#[derive(Default)]
pub struct PendingStats {
    /// Per-row losses and nlls.
    sums: Option<(Tensor, Tensor)>,
    tokens: usize,
}

impl PendingStats {
    /// The sums, read from the device.
    pub fn read(self) -> Result<PassStats> {
        let Some((loss, nll)) = self.sums else {
            return Ok(PassStats::default());
        };
        let total =
            |t: &Tensor| -> Result<f64> { Ok(t.to_f32_vec()?.iter().map(|&x| x as f64).sum()) };
        Ok(PassStats {
            loss_sum: total(&loss)?,
            nll_sum: total(&nll)?,
            tokens: self.tokens,
        })
    }
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn u(v: &Value, k: &str) -> Option<usize> {
    v.get(k).and_then(Value::as_u64).map(|x| x as usize)
}

/// A classifier config's class count, as HF reads it: id2label's size, else num_labels,
/// else 2.
fn num_labels(v: &Value) -> usize {
    v.get("id2label")
        .and_then(Value::as_object)
        .map(|m| m.len())
        .or_else(|| u(v, "num_labels"))
        .unwrap_or(2)
}

fn names_present(ck: &Checkpoint, canonical: &str, aliases: &[&str]) -> Vec<String> {
    let mut out = vec![canonical.to_string()];
    out.extend(
        aliases
            .iter()
            .filter(|a| ck.contains(a) && **a != canonical)
            .map(|a| a.to_string()),
    );
    out
}

/// Reads a model directory's tensors into parameters (see [`Loader::p`]).
pub(super) struct Loader<'a> {
    ck: &'a Checkpoint,
    pub(super) ps: Params,
    /// A prefix the checkpoint's names lack (a bare encoder's, such as BertModel's, loaded
    /// into a model with a head): names are read without it and saved with it.
    strip: Option<&'static str>,
    /// The std of fresh matrices for the head tensors a checkpoint may lack (the config's
    /// `initializer_range`, as HF).
    init_std: f64,
}

impl<'a> Loader<'a> {
    fn new(dir: &'a ModelDir, dtype: DType, device: &Device) -> Self {
        Loader {
            ck: &dir.checkpoint,
            ps: Params::new(dtype, device),
            strip: None,
            init_std: f(&dir.config, "initializer_range").unwrap_or(0.02),
        }
    }

    /// Reads names without `prefix` when the checkpoint is a bare encoder's: it lacks
    /// `prefix` + `probe` and has `probe`.
    fn strip_if_bare(&mut self, prefix: &'static str, probe: &str) {
        if !self.ck.contains(&format!("{prefix}{probe}")) && self.ck.contains(probe) {
            self.strip = Some(prefix);
        }
    }

    /// The checkpoint's name for tensor `name`.
    fn read_name<'n>(&self, name: &'n str) -> &'n str {
        match self.strip {
            Some(pre) => name.strip_prefix(pre).unwrap_or(name),
            None => name,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.ck.contains(self.read_name(name))
    }

    /// Tensor `name` (read as [`Loader::read_name`] maps it) of `shape`.
    pub(super) fn p(&mut self, name: &str, shape: &[usize]) -> Result<Pid> {
        let read = self.read_name(name).to_string();
        self.ps.load_as(self.ck, &read, &[name.to_string()], shape)
    }

    /// Tensor `name`, stored as `stored`, as a tensor of `shape` (the same elements).
    pub(super) fn reshaped(
        &mut self,
        name: &str,
        stored: &[usize],
        shape: &[usize],
    ) -> Result<Pid> {
        let read = self.read_name(name).to_string();
        self.ps.load_reshaped(self.ck, &read, name, stored, shape)
    }

    /// One tensor stored under the first present of `names`, saved under all of them.
    fn tied(&mut self, names: &[String], shape: &[usize]) -> Result<Pid> {
        match names.iter().find(|n| self.has(n)) {
            Some(first) => {
                let read = self.read_name(first).to_string();
                self.ps.load_as(self.ck, &read, names, shape)
            }
            None => self.ps.load_tied(self.ck, names, shape),
        }
    }

    /// [`Loader::p`], or where the checkpoint lacks it (a head new to the model) as HF's
    /// from_pretrained initializes it: matrices N(0, init_std), norm scales 1, other vectors
    /// 0 (`init_values`).
    fn p_or_fresh(&mut self, name: &str, shape: &[usize]) -> Result<Pid> {
        if self.has(name) {
            return self.p(name, shape);
        }
        let values = crate::io::checkpoint::init_values(0, name, shape, self.init_std);
        self.ps.add_fresh(name, shape, &values)
    }

    /// [`Loader::tied`], or a fresh tensor as [`Loader::p_or_fresh`] under the first name.
    fn tied_or_fresh(&mut self, names: &[String], shape: &[usize]) -> Result<Pid> {
        if names.iter().any(|n| self.has(n)) {
            return self.tied(names, shape);
        }
        self.p_or_fresh(&names[0], shape)
    }

    fn lin(&mut self, prefix: &str, n_in: usize, n_out: usize) -> Result<Lin> {
        self.lin_bias(prefix, n_in, n_out, true)
    }

    fn lin_bias(&mut self, prefix: &str, n_in: usize, n_out: usize, bias: bool) -> Result<Lin> {
        Ok(Lin {
            w: self.p(&format!("{prefix}.weight"), &[n_out, n_in])?,
            b: if bias {
                Some(self.p(&format!("{prefix}.bias"), &[n_out])?)
            } else {
                None
            },
        })
    }

    /// A head's linear layer, fresh where the checkpoint lacks it.
    fn lin_or_fresh(&mut self, prefix: &str, n_in: usize, n_out: usize) -> Result<Lin> {
        Ok(Lin {
            w: self.p_or_fresh(&format!("{prefix}.weight"), &[n_out, n_in])?,
            b: Some(self.p_or_fresh(&format!("{prefix}.bias"), &[n_out])?),
        })
    }

    /// A head's layer norm, fresh (scale 1, shift 0) where the checkpoint lacks it.
    fn ln_or_fresh(&mut self, prefix: &str, h: usize, eps: f32) -> Result<Ln> {
        Ok(Ln {
            g: self.p_or_fresh(&format!("{prefix}.weight"), &[h])?,
            b: self.p_or_fresh(&format!("{prefix}.bias"), &[h])?,
            eps,
        })
    }

    fn ln(&mut self, prefix: &str, h: usize, eps: f32) -> Result<Ln> {
        Ok(Ln {
            g: self.p(&format!("{prefix}.weight"), &[h])?,
            b: self.p(&format!("{prefix}.bias"), &[h])?,
            eps,
        })
    }
    /// The feed-forward block: linear layers `fc1` (h -> inner) and `fc2` (inner -> h).
    fn ffn(
        &mut self,
        fc1: &str,
        fc2: &str,
        h: usize,
        inner: usize,
        act: Activation,
    ) -> Result<Ffn> {
        Ok(Ffn {
            fc1: self.lin(fc1, h, inner)?,
            fc2: self.lin(fc2, inner, h)?,
            act,
        })
    }
    fn attn(&mut self, prefix: &str, names: [&str; 4], h: usize, heads: usize) -> Result<Attn> {
        Ok(Attn {
            q: self.lin(&format!("{prefix}.{}", names[0]), h, h)?,
            k: self.lin(&format!("{prefix}.{}", names[1]), h, h)?,
            v: self.lin(&format!("{prefix}.{}", names[2]), h, h)?,
            o: self.lin(&format!("{prefix}.{}", names[3]), h, h)?,
            heads,
            scale: ((h / heads) as f32).powf(-0.5),
        })
    }
}

fn unsupported(what: String) -> Error {
    Error::Input(format!("training {what} is not supported"))
}

impl Net {
    /// Loads a model directory for training in `dtype` on `device`.
    pub fn load(dir: &ModelDir, task: Option<Task>, dtype: DType, device: &Device) -> Result<Self> {
        let mt = dir.model_type()?.to_string();
        match mt.as_str() {
            "marian" | "bart" | "mbart" => {
                let kind = Kind::from_model_type(&mt).unwrap();
                Self::seq2seq(dir, kind, dtype, device)
            }
            "gpt2" => Self::gpt2(dir, dtype, device),
            "vit" => Self::vit(dir, dtype, device),
            "bert" => {
                let task = task.unwrap_or_else(|| {
                    let arch = dir.config.get("architectures").and_then(|a| a.get(0));
                    match arch.and_then(Value::as_str) {
                        Some("BertForSequenceClassification") => Task::Classify,
                        _ => Task::MaskedLm,
                    }
                });
                Self::bert(dir, task, dtype, device)
            }
            other => Err(unsupported(format!("`{other}` models"))),
        }
    }

    /// `config` as it describes this model once trained: for BERT and ViT, `architectures`
    /// names the task's class (a classifier fine-tuned from a masked LM is saved as one),
    /// and a classifier's label count is written where the config names no labels.
    pub fn saved_config(&self, config: &Value) -> Value {
        let mut c = config.clone();
        let arch = match (self.task, c.get("model_type").and_then(Value::as_str)) {
            (Task::MaskedLm, Some("bert")) => "BertForMaskedLM",
            (Task::Classify, Some("bert")) => "BertForSequenceClassification",
            (Task::ImageClassify, Some("vit")) => "ViTForImageClassification",
            _ => return c,
        };
        if let Some(obj) = c.as_object_mut() {
            obj.insert("architectures".into(), Value::from(vec![arch]));
            if let Head::Pooler { labels, .. } | Head::First { labels, .. } = self.head {
                if !obj.contains_key("id2label") {
                    obj.insert("num_labels".into(), Value::from(labels));
                }
            }
        }
        c
    }

    fn seq2seq(dir: &ModelDir, kind: Kind, dtype: DType, device: &Device) -> Result<Self> {
        let c = Seq2SeqConfig::parse(dir, kind)?;
        let v = &dir.config;
        let ck = &dir.checkpoint;
        if c.src_vocab != c.tgt_vocab || !c.tie_word_embeddings {
            return Err(unsupported(
                "encoder-decoders with separate vocabularies or an untied head".into(),
            ));
        }
        let act = Activation::from_hf(&c.activation)?;
        let mut l = Loader::new(dir, dtype, device);
        let d = c.d_model;
        let shared = l.ps.load_tied(
            ck,
            &names_present(
                ck,
                "model.shared.weight",
                &[
                    "model.encoder.embed_tokens.weight",
                    "model.decoder.embed_tokens.weight",
                    "lm_head.weight",
                ],
            ),
            &[c.src_vocab, d],
        )?;
        let scale = if c.scale_embedding {
            (d as f32).sqrt()
        } else {
            1.0
        };
        let pre_ln = matches!(kind, Kind::MBart);
        let eps = 1e-5;
        let emb = |l: &mut Loader, side: &str| -> Result<Emb> {
            let (positions, ln) = match kind {
                Kind::Marian => (
                    Positions::Fixed {
                        table: Tensor::from_f32(
                            &marian_sinusoidal(c.max_positions, d),
                            &[c.max_positions, d],
                            dtype,
                            device,
                        )?,
                        offset: 0,
                    },
                    None,
                ),
                _ => (
                    Positions::Learned {
                        table: l.p(
                            &format!("model.{side}.embed_positions.weight"),
                            &[c.max_positions + 2, d],
                        )?,
                        offset: 2,
                    },
                    Some(l.ln(&format!("model.{side}.layernorm_embedding"), d, eps)?),
                ),
            };
            Ok(Emb {
                tokens: shared,
                vocab: c.src_vocab,
                scale,
                positions,
                types: None,
                ln,
                max_positions: c.max_positions,
            })
        };
        let encoder_emb = emb(&mut l, "encoder")?;
        let decoder_emb = emb(&mut l, "decoder")?;
        let qkvo = ["q_proj", "k_proj", "v_proj", "out_proj"];
        // One layer of `side`; decoder layers add cross attention.
        let layer = |l: &mut Loader, side: &str, i: usize| -> Result<Layer> {
            let (heads, ffn_dim) = if side == "decoder" {
                (c.decoder_heads, c.decoder_ffn_dim)
            } else {
                (c.encoder_heads, c.encoder_ffn_dim)
            };
            let p = format!("model.{side}.layers.{i}");
            Ok(Layer {
                self_attn: l.attn(&format!("{p}.self_attn"), qkvo, d, heads)?,
                ln_self: l.ln(&format!("{p}.self_attn_layer_norm"), d, eps)?,
                cross: if side == "decoder" {
                    Some((
                        l.attn(&format!("{p}.encoder_attn"), qkvo, d, heads)?,
                        l.ln(&format!("{p}.encoder_attn_layer_norm"), d, eps)?,
                    ))
                } else {
                    None
                },
                ffn: l.ffn(&format!("{p}.fc1"), &format!("{p}.fc2"), d, ffn_dim, act)?,
                ln_ffn: l.ln(&format!("{p}.final_layer_norm"), d, eps)?,
                pre_ln,
            })
        };
        let encoder = (0..c.encoder_layers)
            .map(|i| layer(&mut l, "encoder", i))
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..c.decoder_layers)
            .map(|i| layer(&mut l, "decoder", i))
            .collect::<Result<Vec<_>>>()?;
        let (encoder_norm, decoder_norm) = if pre_ln {
            (
                Some(l.ln("model.encoder.layer_norm", d, eps)?),
                Some(l.ln("model.decoder.layer_norm", d, eps)?),
            )
        } else {
            (None, None)
        };
        let bias = if ck.contains("final_logits_bias") {
            let b = ck.read_f32("final_logits_bias", &[1, c.tgt_vocab])?;
            Some(Tensor::from_f32(&b, &[c.tgt_vocab], dtype, device)?)
        } else {
            None
        };
        let eos = u(v, "eos_token_id").unwrap_or(2) as i64;
        // mBART has no decoder_start_token_id: HF's shift starts from the last label, eos.
        let decoder_start = u(v, "decoder_start_token_id")
            .map(|x| x as i64)
            .unwrap_or(eos);
        Ok(Net {
            task: Task::Seq2Seq,
            params: l.ps,
            encoder_emb: Some(encoder_emb),
            encoder,
            encoder_norm,
            decoder_emb: Some(decoder_emb),
            decoder,
            decoder_norm,
            head: Head::Tied {
                table: shared,
                bias,
            },
            pad: c.pad_token_id as i64,
            decoder_start,
            vocab: c.tgt_vocab,
            padding_idx: Some(c.pad_token_id as i64),
            dropout: (
                f(v, "dropout").unwrap_or(0.1) as f32,
                f(v, "attention_dropout").unwrap_or(0.0) as f32,
                f(v, "activation_dropout").unwrap_or(0.0) as f32,
            ),
            patches: None,
        })
    }

    fn gpt2(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let c: crate::models::gpt2::Gpt2Config = crate::models::parse_config_pub(dir)?;
        let v = &dir.config;
        let ck = &dir.checkpoint;
        if c.scale_attn_by_inverse_layer_idx || !c.tie_word_embeddings {
            return Err(unsupported(
                "GPT2 with scale_attn_by_inverse_layer_idx or an untied head".into(),
            ));
        }
        let act = Activation::from_hf(&c.activation_function)?;
        let pre = if ck.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (h, inner, nh) = (c.n_embd, c.n_inner.unwrap_or(4 * c.n_embd), c.n_head);
        let eps = if c.layer_norm_epsilon > 0.0 {
            c.layer_norm_epsilon as f32
        } else {
            1e-5
        };
        let mut l = Loader::new(dir, dtype, device);
        let wte_name = format!("{pre}wte.weight");
        let wte = l.ps.load_tied(
            ck,
            &names_present(ck, &wte_name, &["lm_head.weight"]),
            &[c.vocab_size, h],
        )?;
        let wpe = l.p(&format!("{pre}wpe.weight"), &[c.n_positions, h])?;
        let mut decoder = Vec::new();
        let scale = if c.scale_attn_weights {
            ((h / nh) as f32).powf(-0.5)
        } else {
            1.0
        };
        for i in 0..c.n_layer {
            let p = format!("{pre}h.{i}");
            let w =
                l.ps.load_conv1d(ck, &format!("{p}.attn.c_attn.weight"), h, h, 3)?;
            let b =
                l.ps.load_split_bias(ck, &format!("{p}.attn.c_attn.bias"), h, 3)?;
            let conv = |l: &mut Loader, name: &str, n_in: usize, n_out: usize| -> Result<Lin> {
                Ok(Lin {
                    w: l.ps
                        .load_conv1d(ck, &format!("{p}.{name}.weight"), n_in, n_out, 1)?[0],
                    b: Some(l.p(&format!("{p}.{name}.bias"), &[n_out])?),
                })
            };
            let o = conv(&mut l, "attn.c_proj", h, h)?;
            decoder.push(Layer {
                self_attn: Attn {
                    q: Lin {
                        w: w[0],
                        b: Some(b[0]),
                    },
                    k: Lin {
                        w: w[1],
                        b: Some(b[1]),
                    },
                    v: Lin {
                        w: w[2],
                        b: Some(b[2]),
                    },
                    o,
                    heads: nh,
                    scale,
                },
                ln_self: l.ln(&format!("{p}.ln_1"), h, eps)?,
                cross: None,
                ffn: Ffn {
                    fc1: conv(&mut l, "mlp.c_fc", h, inner)?,
                    fc2: conv(&mut l, "mlp.c_proj", inner, h)?,
                    act,
                },
                ln_ffn: l.ln(&format!("{p}.ln_2"), h, eps)?,
                pre_ln: true,
            });
        }
        let ln_f = l.ln(&format!("{pre}ln_f"), h, eps)?;
        Ok(Net {
            task: Task::CausalLm,
            params: l.ps,
            encoder_emb: None,
            encoder: Vec::new(),
            encoder_norm: None,
            decoder_emb: Some(Emb {
                tokens: wte,
                vocab: c.vocab_size,
                scale: 1.0,
                positions: Positions::Learned {
                    table: wpe,
                    offset: 0,
                },
                types: None,
                ln: None,
                max_positions: c.n_positions,
            }),
            decoder,
            decoder_norm: Some(ln_f),
            head: Head::Tied {
                table: wte,
                bias: None,
            },
            pad: -1,
            decoder_start: 0,
            vocab: c.vocab_size,
            padding_idx: None,
            dropout: (
                f(v, "resid_pdrop").unwrap_or(0.1) as f32,
                f(v, "attn_pdrop").unwrap_or(0.1) as f32,
                0.0,
            ),
            patches: None,
        })
    }

    fn bert(dir: &ModelDir, task: Task, dtype: DType, device: &Device) -> Result<Self> {
        let c: crate::models::bert::BertConfig = crate::models::parse_config_pub(dir)?;
        let v = &dir.config;
        let ck = &dir.checkpoint;
        if c.position_embedding_type.as_deref().unwrap_or("absolute") != "absolute" {
            return Err(unsupported("BERT with relative position embeddings".into()));
        }
        let act = Activation::from_hf(&c.hidden_act)?;
        let (h, nh) = (c.hidden_size, c.num_attention_heads);
        let eps = c.layer_norm_eps as f32;
        let mut l = Loader::new(dir, dtype, device);
        let pre = "bert";
        // A bare BertModel's tensors lack the prefix that its task models' carry.
        l.strip_if_bare("bert.", "embeddings.word_embeddings.weight");
        let tok_name = format!("{pre}.embeddings.word_embeddings.weight");
        let tok_names = if task == Task::MaskedLm {
            names_present(ck, &tok_name, &["cls.predictions.decoder.weight"])
        } else {
            vec![tok_name]
        };
        let tok = l.tied(&tok_names, &[c.vocab_size, h])?;
        let pos = l.p(
            &format!("{pre}.embeddings.position_embeddings.weight"),
            &[c.max_position_embeddings, h],
        )?;
        let types = l.p(
            &format!("{pre}.embeddings.token_type_embeddings.weight"),
            &[c.type_vocab_size, h],
        )?;
        let emb_ln = l.ln(&format!("{pre}.embeddings.LayerNorm"), h, eps)?;
        let mut encoder = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("{pre}.encoder.layer.{i}");
            let mut a = l.attn(
                &format!("{p}.attention"),
                ["self.query", "self.key", "self.value", "output.dense"],
                h,
                nh,
            )?;
            a.scale = ((h / nh) as f32).powf(-0.5);
            encoder.push(Layer {
                self_attn: a,
                ln_self: l.ln(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                cross: None,
                ffn: l.ffn(
                    &format!("{p}.intermediate.dense"),
                    &format!("{p}.output.dense"),
                    h,
                    c.intermediate_size,
                    act,
                )?,
                ln_ffn: l.ln(&format!("{p}.output.LayerNorm"), h, eps)?,
                pre_ln: false,
            });
        }
        let hidden_drop = f(v, "hidden_dropout_prob").unwrap_or(0.1) as f32;
        // The task's head, initialized here where the checkpoint has none (as HF's
        // from_pretrained does, e.g. a classifier on a pretrained encoder).
        let head = match task {
            Task::MaskedLm => Head::Mlm {
                dense: l.lin_or_fresh("cls.predictions.transform.dense", h, h)?,
                act,
                ln: l.ln_or_fresh("cls.predictions.transform.LayerNorm", h, eps)?,
                table: tok,
                bias: l.tied_or_fresh(
                    &names_present(
                        ck,
                        "cls.predictions.bias",
                        &["cls.predictions.decoder.bias"],
                    ),
                    &[c.vocab_size],
                )?,
            },
            Task::Classify => {
                let labels = num_labels(v);
                Head::Pooler {
                    dense: l.lin_or_fresh(&format!("{pre}.pooler.dense"), h, h)?,
                    classifier: l.lin_or_fresh("classifier", h, labels)?,
                    labels,
                    dropout: f(v, "classifier_dropout").unwrap_or(hidden_drop as f64) as f32,
                }
            }
            _ => return Err(unsupported("BERT for this task".into())),
        };
        let pad = u(v, "pad_token_id").unwrap_or(0) as i64;
        Ok(Net {
            task,
            params: l.ps,
            encoder_emb: Some(Emb {
                tokens: tok,
                vocab: c.vocab_size,
                scale: 1.0,
                positions: Positions::Learned {
                    table: pos,
                    offset: 0,
                },
                types: Some((types, c.type_vocab_size)),
                ln: Some(emb_ln),
                max_positions: c.max_position_embeddings,
            }),
            encoder,
            encoder_norm: None,
            decoder_emb: None,
            decoder: Vec::new(),
            decoder_norm: None,
            head,
            pad,
            decoder_start: 0,
            vocab: c.vocab_size,
            padding_idx: Some(pad),
            dropout: (
                hidden_drop,
                f(v, "attention_probs_dropout_prob").unwrap_or(0.1) as f32,
                0.0,
            ),
            patches: None,
        })
    }

    fn vit(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let c = crate::models::vit::VitConfig::parse(dir)?;
        let v = &dir.config;
        let act = Activation::from_hf(&c.act)?;
        let (h, nh, eps) = (c.hidden_size, c.heads, c.eps as f32);
        let mut l = Loader::new(dir, dtype, device);
        // A bare ViTModel's tensors lack the prefix that ViTForImageClassification's carry.
        l.strip_if_bare("vit.", "embeddings.cls_token");
        let patches = super::vit::PatchEmb::load(&mut l, &c)?;
        let mut encoder = Vec::new();
        for i in 0..c.num_layers {
            let p = format!("vit.encoder.layer.{i}");
            let a = format!("{p}.attention.attention");
            encoder.push(Layer {
                self_attn: Attn {
                    q: l.lin_bias(&format!("{a}.query"), h, h, c.qkv_bias)?,
                    k: l.lin_bias(&format!("{a}.key"), h, h, c.qkv_bias)?,
                    v: l.lin_bias(&format!("{a}.value"), h, h, c.qkv_bias)?,
                    o: l.lin(&format!("{p}.attention.output.dense"), h, h)?,
                    heads: nh,
                    scale: ((h / nh) as f32).powf(-0.5),
                },
                ln_self: l.ln(&format!("{p}.layernorm_before"), h, eps)?,
                cross: None,
                ffn: l.ffn(
                    &format!("{p}.intermediate.dense"),
                    &format!("{p}.output.dense"),
                    h,
                    c.intermediate_size,
                    act,
                )?,
                ln_ffn: l.ln(&format!("{p}.layernorm_after"), h, eps)?,
                pre_ln: true,
            });
        }
        let norm = l.ln("vit.layernorm", h, eps)?;
        let labels = num_labels(v);
        // A classifier new to the checkpoint (a pretrained ViTModel) starts fresh.
        let classifier = l.lin_or_fresh("classifier", h, labels)?;
        Ok(Net {
            task: Task::ImageClassify,
            params: l.ps,
            encoder_emb: None,
            encoder,
            encoder_norm: Some(norm),
            decoder_emb: None,
            decoder: Vec::new(),
            decoder_norm: None,
            head: Head::First { classifier, labels },
            pad: 0,
            decoder_start: 0,
            vocab: labels,
            padding_idx: None,
            dropout: (
                f(v, "hidden_dropout_prob").unwrap_or(0.0) as f32,
                f(v, "attention_probs_dropout_prob").unwrap_or(0.0) as f32,
                0.0,
            ),
            patches: Some(patches),
        })
    }

    /// Forward and backward of an image classifier (see [`Net::accumulate_grads`]).
    fn accumulate_image_grads(
        &mut self,
        rows: &[Example],
        eps: f32,
        grad_scale: f32,
        drop: &Dropout,
    ) -> Result<PendingStats> {
        let pe = self
            .patches
            .as_ref()
            .expect("image models have a patch embedding");
        let b = rows.len();
        let mut pixels = Vec::with_capacity(b);
        let mut labels = Vec::with_capacity(b);
        let Head::First {
            classifier,
            labels: n_labels,
        } = &self.head
        else {
            unreachable!("image models end in a classifier")
        };
        for (i, r) in rows.iter().enumerate() {
            let Example::Image { pixels: px, label } = r else {
                return Err(Error::Input(format!("row {}: not an image example", i + 1)));
            };
            if *label < 0 || *label as usize >= *n_labels {
                return Err(Error::Input(format!(
                    "row {}: label {label} outside the model's {n_labels} classes (the config's num_labels or id2label)",
                    i + 1
                )));
            }
            pixels.push(px.as_slice());
            labels.push(*label as i32);
        }
        let (x, saved) = pe.forward(&self.params, drop, &pixels)?;
        let n = x.shape()[0];
        let inp = LayerInputs {
            self_key_lens: None,
            causal: false,
            memory: None,
            memory_lens: None,
        };
        let mut x = x;
        let mut layer_saved = Vec::new();
        for layer in &self.encoder {
            let (y, s) = layer.forward(&self.params, drop, x, &inp)?;
            layer_saved.push(s);
            x = y;
        }
        let norm = self.encoder_norm.as_ref().unwrap();
        let y = norm.forward(&self.params, &x)?;
        let h = y.shape()[2];
        let y = y.reshape(&[n * b, h])?;
        // The class token of every image: the first b rows (position-major).
        let first: Vec<usize> = (0..b).collect();
        let cls = ops::index_select(&y, &first)?;
        let logits = classifier.forward(&self.params, &cls)?;
        let dev = self.params.device.clone();
        let (st, dlogits) = loss(&logits, &labels, eps, grad_scale)?;
        if grad_scale == 0.0 {
            return Ok(st);
        }
        let ps = &mut self.params;
        let dcls = classifier.backward(ps, &cls, &dlogits)?;
        let idx: Vec<i32> = first.iter().map(|&i| i as i32).collect();
        let idx_t = Tensor::from_i32(&idx, &[b], &dev)?;
        let dy = tops::embedding_backward(&idx_t, &dcls, b * n, 1.0)?;
        let dy = as_dtype_of(dy, ps.dtype)?.reshape(&[n, b, h])?;
        let mut dy = norm.backward(ps, &x, &dy)?;
        for (layer, s) in self.encoder.iter().zip(layer_saved).rev() {
            let mut none = None;
            dy = layer.backward(ps, drop, s, dy, None, &mut none)?;
        }
        pe.backward(ps, drop, saved, dy)?;
        Ok(st)
    }

    /// Rows padded to l tokens, position-major ([l, b] i32: token i of row bi at i * b + bi,
    /// the layout of the training activations), the ids the embedding backward uses
    /// (padding_idx rows masked to -1), the lengths, and l.
    fn pad_rows(&self, rows: &[&[i64]], fill: i64) -> Result<Padded> {
        let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = vec![fill as i32; rows.len() * l];
        let mut lens = Vec::with_capacity(rows.len());
        for (b, r) in rows.iter().enumerate() {
            for (i, &t) in r.iter().enumerate() {
                if t < 0 || t as usize >= self.vocab {
                    return Err(Error::Input(format!(
                        "token id {t} is outside the model's vocabulary of {}",
                        self.vocab
                    )));
                }
                ids[i * rows.len() + b] = t as i32;
            }
            lens.push(r.len() as i32);
        }
        let bwd = ids
            .iter()
            .map(|&t| {
                if Some(t as i64) == self.padding_idx {
                    -1
                } else {
                    t
                }
            })
            .collect();
        Ok((ids, bwd, lens, l))
    }

    /// Forward and backward over `rows`: adds `grad_scale * d(sum of losses)` into the
    /// gradients and returns the summed loss, nll and predicted-token count. With
    /// `grad_scale` 0 only the forward pass runs.
    pub fn accumulate_grads(
        &mut self,
        rows: &[Example],
        eps: f32,
        grad_scale: f32,
        drop: &Dropout,
    ) -> Result<PassStats> {
        self.accumulate_grads_pending(rows, eps, grad_scale, drop)?
            .read()
    }

    /// [`Net::accumulate_grads`] with the statistics left on the device until read.
    pub fn accumulate_grads_pending(
        &mut self,
        rows: &[Example],
        eps: f32,
        grad_scale: f32,
        drop: &Dropout,
    ) -> Result<PendingStats> {
        let dev = self.params.device.clone();
        let dtype = self.params.dtype;
        let b = rows.len();
        if b == 0 {
            return Ok(PendingStats::default());
        }
        let _tuning = match &dev {
            Device::Cuda(d) => Some(d.gemm_tuning_scope()),
            Device::Cpu => None,
        };
        if self.task == Task::ImageClassify {
            return self.accumulate_image_grads(rows, eps, grad_scale, drop);
        }
        // Inputs per task.
        let mut src: Vec<&[i64]> = Vec::new();
        let mut main: Vec<Vec<i64>> = Vec::new();
        let mut types: Vec<Vec<i64>> = Vec::new();
        let mut targets_rows: Vec<Vec<i64>> = Vec::new();
        let mut class_labels: Vec<i64> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let bad = || Error::Input(format!("row {}: not a {:?} example", i + 1, self.task));
            match (self.task, r) {
                (Task::Seq2Seq, Example::Seq2Seq { src: s, tgt }) => {
                    if s.is_empty() || tgt.is_empty() {
                        return Err(Error::Input(format!("row {}: empty src or tgt", i + 1)));
                    }
                    src.push(s);
                    let mut d = vec![self.decoder_start];
                    d.extend_from_slice(&tgt[..tgt.len() - 1]);
                    main.push(d);
                    targets_rows.push(tgt.clone());
                }
                (Task::CausalLm, Example::Causal { ids }) => {
                    if ids.len() < 2 {
                        return Err(Error::Input(format!(
                            "row {}: a causal-LM row needs at least two tokens",
                            i + 1
                        )));
                    }
                    main.push(ids[..ids.len() - 1].to_vec());
                    targets_rows.push(ids[1..].to_vec());
                }
                (Task::MaskedLm, Example::Masked { ids, labels }) => {
                    if ids.is_empty() || labels.len() != ids.len() {
                        return Err(Error::Input(format!(
                            "row {}: ids and labels must have the same, non-zero length",
                            i + 1
                        )));
                    }
                    main.push(ids.clone());
                    targets_rows.push(labels.iter().map(|&x| if x < 0 { -1 } else { x }).collect());
                }
                (
                    Task::Classify,
                    Example::Classify {
                        ids,
                        types: t,
                        label,
                    },
                ) => {
                    if ids.is_empty() {
                        return Err(Error::Input(format!("row {}: empty ids", i + 1)));
                    }
                    main.push(ids.clone());
                    types.push(t.clone().unwrap_or_else(|| vec![0; ids.len()]));
                    class_labels.push(*label);
                }
                _ => return Err(bad()),
            }
        }
        // Encoder.
        let mut memory = None;
        let mut src_lens_t = None;
        let mut enc_saved = Vec::new();
        let mut enc_emb_saved = None;
        let mut enc_norm_in = None;
        if self.task == Task::Seq2Seq {
            let (ids, bwd_ids, lens, ls) = self.pad_rows(&src, self.pad)?;
            let lens_t = Tensor::from_i32(&lens, &[b], &dev)?;
            let emb = self.encoder_emb.as_ref().unwrap();
            let ids_t = Tensor::from_i32(&ids, &[b * ls], &dev)?;
            let (mut x, es) = emb.forward(&self.params, drop, ids_t, None, b, ls)?;
            enc_emb_saved = Some((es, Tensor::from_i32(&bwd_ids, &[b * ls], &dev)?));
            let inp = LayerInputs {
                self_key_lens: Some(&lens_t),
                causal: false,
                memory: None,
                memory_lens: None,
            };
            for layer in &self.encoder {
                let (y, s) = layer.forward(&self.params, drop, x, &inp)?;
                enc_saved.push(s);
                x = y;
            }
            if let Some(ln) = &self.encoder_norm {
                let y = ln.forward(&self.params, &x)?;
                enc_norm_in = Some(x);
                x = y;
            }
            memory = Some(x);
            src_lens_t = Some(lens_t);
        }
        // Main stack: the decoder (seq2seq, causal LM) or BERT's encoder.
        let main_refs: Vec<&[i64]> = main.iter().map(|r| r.as_slice()).collect();
        let fill = if self.pad >= 0 { self.pad } else { 0 };
        let (ids, bwd_ids, lens, l) = self.pad_rows(&main_refs, fill)?;
        let lens_t = Tensor::from_i32(&lens, &[b], &dev)?;
        let ids_t = Tensor::from_i32(&ids, &[b * l], &dev)?;
        let type_t = if self.task == Task::Classify {
            let mut t = vec![0i32; b * l];
            for (bi, r) in types.iter().enumerate() {
                for (i, &x) in r.iter().enumerate().take(l) {
                    t[i * b + bi] = x as i32;
                }
            }
            Some(Tensor::from_i32(&t, &[b * l], &dev)?)
        } else if self.task == Task::MaskedLm {
            Some(Tensor::from_i32(&vec![0; b * l], &[b * l], &dev)?)
        } else {
            None
        };
        let is_decoder = matches!(self.task, Task::Seq2Seq | Task::CausalLm);
        let (emb, layers, norm) = if is_decoder {
            (
                self.decoder_emb.as_ref().unwrap(),
                &self.decoder,
                &self.decoder_norm,
            )
        } else {
            (
                self.encoder_emb.as_ref().unwrap(),
                &self.encoder,
                &self.encoder_norm,
            )
        };
        let (mut x, main_emb_saved) = emb.forward(&self.params, drop, ids_t, type_t, b, l)?;
        let inp = LayerInputs {
            self_key_lens: Some(&lens_t),
            causal: is_decoder,
            memory: memory.as_ref(),
            memory_lens: src_lens_t.as_ref(),
        };
        let mut saved = Vec::new();
        for layer in layers.iter() {
            let (y, s) = layer.forward(&self.params, drop, x, &inp)?;
            saved.push(s);
            x = y;
        }
        let mut norm_in = None;
        if let Some(ln) = norm {
            let y = ln.forward(&self.params, &x)?;
            norm_in = Some(x);
            x = y;
        }
        let h = x.shape()[2];
        let x = x.reshape(&[b * l, h])?;
        // Head, loss and the head's backward.
        let mut targets = vec![-1i32; b * l];
        for (bi, t) in targets_rows.iter().enumerate() {
            for (i, &v) in t.iter().enumerate() {
                if v >= 0 && v as usize >= self.vocab {
                    return Err(Error::Input(format!(
                        "row {}: label {v} is outside the vocabulary of {}",
                        bi + 1,
                        self.vocab
                    )));
                }
                targets[i * b + bi] = v as i32;
            }
        }
        let ps = &mut self.params;
        let (stats, dx) = match &self.head {
            Head::Tied { table, bias } => {
                let logits = head::logits(&x, ps.w(*table), bias.as_ref())?;
                let (st, dlogits) = head_loss(&logits, &targets, eps, grad_scale)?;
                std::mem::drop(logits); // the largest activation: free it before the backward
                if grad_scale == 0.0 {
                    return Ok(st);
                }
                // The table is also the embeddings', whose backward adds to its gradient.
                ps.keep_wide(*table)?;
                let (wg, overwrite, _) = ps.weight_grads(*table, None, dlogits.t.dtype())?;
                head::weight_grad_into(wg, None, &x, &dlogits, overwrite)?;
                let dx = head::input_grad(&dlogits, ps.w(*table))?;
                (st, dx.reshape(x.shape())?)
            }
            Head::Mlm {
                dense,
                act,
                ln,
                table,
                bias,
            } => {
                // Only predicted positions go through the head (the others carry no loss).
                let picked: Vec<usize> = (0..b * l).filter(|&i| targets[i] >= 0).collect();
                let xs = ops::index_select(&x, &picked)?;
                let pre = dense.forward(ps, &xs)?;
                let a = tops::activate(&pre, *act)?;
                let t = ln.forward(ps, &a)?;
                let logits = head::logits(&t, ps.w(*table), Some(ps.w(*bias)))?;
                let tsel: Vec<i32> = picked.iter().map(|&i| targets[i]).collect();
                let (st, dlogits) = head_loss(&logits, &tsel, eps, grad_scale)?;
                std::mem::drop(logits); // the largest activation: free it before the backward
                if grad_scale == 0.0 {
                    return Ok(st);
                }
                // The table is also the word embeddings', whose backward adds to it.
                ps.keep_wide(*table)?;
                let (wg, overwrite, bg) =
                    ps.weight_grads(*table, Some(*bias), dlogits.t.dtype())?;
                head::weight_grad_into(wg, bg, &t, &dlogits, overwrite)?;
                let dt = head::input_grad(&dlogits, ps.w(*table))?.reshape(t.shape())?;
                let da = ln.backward(ps, &a, &dt)?;
                let dpre = tops::activation_backward(&pre, &da, *act)?;
                let dxs = dense.backward(ps, &xs, &dpre)?;
                let idx: Vec<i32> = picked.iter().map(|&i| i as i32).collect();
                let idx_t = Tensor::from_i32(&idx, &[idx.len()], &dev)?;
                let dx = tops::embedding_backward(&idx_t, &dxs, b * l, 1.0)?;
                (st, as_dtype_of(dx, dtype)?)
            }
            Head::First { .. } => {
                return Err(Error::Input("an image classifier takes image rows".into()))
            }
            Head::Pooler {
                dense,
                classifier,
                labels,
                dropout,
            } => {
                // Position 0 of every row: the first b rows (position-major).
                let first: Vec<usize> = (0..b).collect();
                let cls = ops::index_select(&x, &first)?;
                let pre = dense.forward(ps, &cls)?;
                let pooled = tops::activate(&pre, Activation::Tanh)?;
                let (pd, off) = drop.apply(pooled, *dropout)?;
                let logits = classifier.forward(ps, &pd)?;
                for (i, &y) in class_labels.iter().enumerate() {
                    if y < 0 || y as usize >= *labels {
                        return Err(Error::Input(format!(
                            "row {}: label {y} outside the model's {labels} classes (the config's num_labels or id2label)",
                            i + 1
                        )));
                    }
                }
                let lab: Vec<i32> = class_labels.iter().map(|&y| y as i32).collect();
                let (st, dlogits) = loss(&logits, &lab, eps, grad_scale)?;
                if grad_scale == 0.0 {
                    return Ok(st);
                }
                let dpd = classifier.backward(ps, &pd, &dlogits)?;
                let dpooled = drop.backward(dpd, *dropout, off)?;
                let dpre = tops::activation_backward(&pre, &dpooled, Activation::Tanh)?;
                let dcls = dense.backward(ps, &cls, &dpre)?;
                let idx: Vec<i32> = first.iter().map(|&i| i as i32).collect();
                let idx_t = Tensor::from_i32(&idx, &[b], &dev)?;
                let dx = tops::embedding_backward(&idx_t, &dcls, b * l, 1.0)?;
                (st, as_dtype_of(dx, dtype)?)
            }
        };
        // Main stack backward.
        let mut dy = dx.reshape(&[l, b, h])?;
        if let (Some(ln), Some(xin)) = (norm, &norm_in) {
            dy = ln.backward(ps, xin, &dy)?;
        }
        let mut dmem: Option<Tensor> = None;
        for (layer, s) in layers.iter().zip(saved).rev() {
            dy = layer.backward(ps, drop, s, dy, memory.as_ref(), &mut dmem)?;
        }
        let bwd_ids_t = Tensor::from_i32(&bwd_ids, &[b * l], &dev)?;
        emb.backward(ps, drop, main_emb_saved.with_ids(bwd_ids_t), dy)?;
        // Encoder backward.
        if let Some(mut dm) = dmem {
            if let (Some(ln), Some(xin)) = (&self.encoder_norm, &enc_norm_in) {
                dm = ln.backward(ps, xin, &dm)?;
            }
            for (layer, s) in self.encoder.iter().zip(enc_saved).rev() {
                let mut none = None;
                dm = layer.backward(ps, drop, s, dm, None, &mut none)?;
            }
            let (es, ids) = enc_emb_saved.unwrap();
            self.encoder_emb
                .as_ref()
                .unwrap()
                .backward(ps, drop, es.with_ids(ids), dm)?;
        }
        Ok(stats)
    }
}

/// Padded ids, backward ids, lengths, padded length.
type Padded = (Vec<i32>, Vec<i32>, Vec<i32>, usize);

/// The label-smoothed loss of `logits` against host `targets` (-1: ignored): per-row loss
/// and nll with the predicted-token count, and the logits' gradient times `grad_scale`.
fn loss(
    logits: &Tensor,
    targets: &[i32],
    eps: f32,
    grad_scale: f32,
) -> Result<(PendingStats, Tensor)> {
    let tt = Tensor::from_i32(targets, &[targets.len()], &logits.device())?;
    let (l, n, d) = tops::cross_entropy(logits, &tt, eps, grad_scale)?;
    Ok((pending(l, n, targets), d))
}

/// [`loss`] of an LM head's padded logits.
fn head_loss(
    logits: &head::HeadLogits,
    targets: &[i32],
    eps: f32,
    grad_scale: f32,
) -> Result<(PendingStats, head::HeadLogits)> {
    let tt = Tensor::from_i32(targets, &[targets.len()], &logits.t.device())?;
    let (l, n, d) = head::cross_entropy(logits, &tt, eps, grad_scale)?;
    Ok((pending(l, n, targets), d))
}

/// The per-row losses and nlls, and the predicted-token count.
fn pending(loss: Tensor, nll: Tensor, targets: &[i32]) -> PendingStats {
    PendingStats {
        sums: Some((loss, nll)),
        tokens: targets.iter().filter(|&&t| t >= 0).count(),
    }
}
