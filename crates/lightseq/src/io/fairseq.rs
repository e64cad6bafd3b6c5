//! Converting a fairseq `transformer` checkpoint into a Hugging Face model directory that
//! HF transformers and this library load:
//! - post-norm layers with sinusoidal positions -> FSMT (`fsmt`);
//! - pre-norm layers with sinusoidal positions and final norms -> M2M100 (`m2m_100`);
//! - post-norm layers with learned positions and embedding norms -> BART (`bart`).
//!
//! Other variants have no exact HF equivalent and are rejected with the reason.

use super::pickle::Py;
use super::safetensors;
use super::torch::TorchFile;
use crate::error::{Error, Result};
use crate::nn::positions::fairseq_sinusoidal;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

const PAD: usize = 1;

/// Tensors by name: shape and f32 values.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// What a conversion produced.
#[derive(Debug)]
pub struct Conversion {
    /// The HF model_type written.
    pub model_type: &'static str,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub d_model: usize,
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    pub tensors: usize,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Hyper-parameters from `args` (old checkpoints) or `cfg.model` (newer ones).
struct Args(Option<Py>);

impl Args {
    fn get(&self, k: &str) -> Option<Py> {
        self.0.as_ref()?.get(k).filter(|v| !v.is_none())
    }
    fn usize(&self, k: &str) -> Option<usize> {
        self.get(k).and_then(|v| v.as_i64()).map(|x| x as usize)
    }
    fn bool(&self, k: &str) -> bool {
        self.get(k).and_then(|v| v.as_bool()).unwrap_or(false)
    }
    fn str(&self, k: &str) -> Option<String> {
        self.get(k).and_then(|v| v.as_str().map(str::to_string))
    }
}

/// The fairseq state dict with old names upgraded: fused `in_proj` split into q/k/v,
/// `layer_norms.N` renamed, `embed_out` moved to `output_projection`.
fn upgraded(tf: &TorchFile, path: &Path) -> Result<Tensors> {
    let mut out = BTreeMap::new();
    for name in tf.tensors.keys() {
        let (shape, v) = tf.read_f32(name)?;
        if name.ends_with(".version")
            || name.contains("_float_tensor")
            || name.ends_with("embed_positions.weights")
        {
            continue;
        }
        // fairseq 0.12 duplicates encoder layer weights under fused names for its fast path.
        let last = name.rsplit('.').next().unwrap_or("");
        if name.split('.').count() == 4
            && name.contains(".layers.")
            && matches!(
                last,
                "in_proj_weight"
                    | "in_proj_bias"
                    | "out_proj_weight"
                    | "out_proj_bias"
                    | "fc1_weight"
                    | "fc1_bias"
                    | "fc2_weight"
                    | "fc2_bias"
            )
        {
            continue;
        }
        if let Some(base) = name
            .strip_suffix(".in_proj_weight")
            .or_else(|| name.strip_suffix(".in_proj_bias"))
        {
            let kind = if name.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            let rows = shape[0] / 3;
            let per = v.len() / 3;
            for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let mut s = shape.clone();
                s[0] = rows;
                out.insert(
                    format!("{base}.{part}.{kind}"),
                    (s, v[i * per..(i + 1) * per].to_vec()),
                );
            }
            continue;
        }
        let mut n = name.clone();
        for (from, to) in [("decoder.embed_out", "decoder.output_projection.weight")] {
            if n == from {
                n = to.to_string();
            }
        }
        if let Some(idx) = n.find(".layer_norms.") {
            let side_dec = n.starts_with("decoder.");
            let digit = n[idx + 13..].chars().next().unwrap_or('x');
            let new = match (side_dec, digit) {
                (false, '0') | (true, '0') => "self_attn_layer_norm",
                (false, '1') => "final_layer_norm",
                (true, '1') => "encoder_attn_layer_norm",
                (true, '2') => "final_layer_norm",
                _ => return Err(bad(path, format!("unexpected tensor `{name}`"))),
            };
            n = format!("{}.{}{}", &n[..idx], new, &n[idx + 14..]);
        }
        out.insert(n, (shape, v));
    }
    Ok(out)
}

/// Converts the fairseq checkpoint `ckpt` into an HF model directory `out_dir`.
pub fn convert(ckpt: &Path, out_dir: &Path) -> Result<Conversion> {
    let (tf, root) = TorchFile::open_with_root(ckpt)?;
    let args = Args(
        root.get("args")
            .filter(|a| !a.is_none())
            .or_else(|| root.get("cfg").and_then(|c| c.get("model"))),
    );
    if args.0.is_none() {
        return Err(bad(
            ckpt,
            "no `args` or `cfg.model` entry: not a fairseq checkpoint",
        ));
    }
    if let Some(arch) = args.str("arch").or_else(|| args.str("_name")) {
        if !arch.starts_with("transformer") {
            return Err(bad(
                ckpt,
                format!("arch `{arch}` is not a fairseq `transformer`"),
            ));
        }
    }
    let mut t = upgraded(&tf, ckpt)?;
    let need = |t: &Tensors, k: &str| -> Result<Vec<usize>> {
        t.get(k)
            .map(|x| x.0.clone())
            .ok_or_else(|| bad(ckpt, format!("missing tensor `{k}`")))
    };
    let enc_emb = need(&t, "encoder.embed_tokens.weight")?;
    let dec_emb = need(&t, "decoder.embed_tokens.weight")?;
    let (sv, d) = (enc_emb[0], enc_emb[1]);
    let tv = dec_emb[0];
    if dec_emb[1] != d {
        return Err(bad(
            ckpt,
            "encoder and decoder embedding sizes differ; no HF equivalent",
        ));
    }
    for k in t.keys() {
        if k.contains("project_in_dim")
            || k.contains("project_out_dim")
            || k.contains("adaptive_softmax")
        {
            return Err(bad(
                ckpt,
                format!("`{k}`: projections and adaptive softmax have no HF equivalent"),
            ));
        }
    }
    if args.bool("no_token_positional_embeddings")
        || args.bool("cross_self_attention")
        || args.bool("no_cross_attention")
    {
        return Err(bad(ckpt, "no_token_positional_embeddings / cross_self_attention / no_cross_attention have no HF equivalent"));
    }
    let layers = |side: &str| {
        t.keys()
            .filter_map(|k| {
                k.strip_prefix(&format!("{side}.layers."))
                    .and_then(|r| r.split('.').next()?.parse::<usize>().ok())
            })
            .max()
            .map_or(0, |m| m + 1)
    };
    let (le, ld) = (layers("encoder"), layers("decoder"));
    let fe = need(&t, "encoder.layers.0.fc1.weight")?[0];
    let fd = need(&t, "decoder.layers.0.fc1.weight")?[0];
    let he = args.usize("encoder_attention_heads").unwrap_or(8);
    let hd = args.usize("decoder_attention_heads").unwrap_or(8);
    let pre_enc = t.contains_key("encoder.layer_norm.weight");
    let pre_dec = t.contains_key("decoder.layer_norm.weight");
    if args.bool("encoder_normalize_before") != pre_enc
        || args.bool("decoder_normalize_before") != pre_dec
        || pre_enc != pre_dec
    {
        return Err(bad(
            ckpt,
            "mixed pre-/post-norm (or pre-norm without final norms) has no HF equivalent",
        ));
    }
    let learned = t.contains_key("encoder.embed_positions.weight");
    let ln_emb = t.contains_key("encoder.layernorm_embedding.weight");
    if learned != t.contains_key("decoder.embed_positions.weight")
        || ln_emb != t.contains_key("decoder.layernorm_embedding.weight")
    {
        return Err(bad(
            ckpt,
            "encoder and decoder differ in position embeddings or embedding norms",
        ));
    }
    let act = match args.str("activation_fn").as_deref().unwrap_or("relu") {
        "relu" => "relu",
        "gelu" => "gelu",
        "gelu_fast" | "gelu_accurate" => "gelu_new",
        "swish" => "silu",
        other => {
            return Err(bad(
                ckpt,
                format!("activation_fn `{other}` has no HF equivalent"),
            ))
        }
    };
    let scale = !args.bool("no_scale_embedding");
    let max_src = args.usize("max_source_positions").unwrap_or(1024);
    let max_tgt = args.usize("max_target_positions").unwrap_or(1024);
    let head = t
        .get("decoder.output_projection.weight")
        .or_else(|| t.get("decoder.embed_tokens.weight"))
        .cloned()
        .ok_or_else(|| bad(ckpt, "no output projection"))?;

    let model_type = match (pre_enc, learned, ln_emb) {
        (false, false, false) => "fsmt",
        (true, false, false) => "m2m_100",
        (false, true, true) => "bart",
        _ => return Err(bad(ckpt, "this combination of norm placement, learned positions and embedding norms has no HF equivalent (supported: post-norm sinusoidal -> FSMT, pre-norm sinusoidal -> M2M100, post-norm learned + layernorm_embedding -> BART)")),
    };
    let mut w: Tensors = BTreeMap::new();
    // Per-layer tensors keep their names under `model.`.
    for (k, v) in &t {
        if k.starts_with("encoder.layers.") || k.starts_with("decoder.layers.") {
            w.insert(format!("model.{k}"), v.clone());
        }
    }
    let vocab = sv.max(tv);
    let pad_rows = |(s, v): &(Vec<usize>, Vec<f32>), rows: usize| -> (Vec<usize>, Vec<f32>) {
        let mut v = v.clone();
        v.resize(rows * s[1], 0.0);
        (vec![rows, s[1]], v)
    };
    let config = match model_type {
        "fsmt" => {
            let max_pos = max_src.max(max_tgt);
            let rows = max_pos + PAD + 1;
            let table = (vec![rows, d], fairseq_sinusoidal(rows, d, Some(PAD)));
            w.insert(
                "model.encoder.embed_tokens.weight".into(),
                t["encoder.embed_tokens.weight"].clone(),
            );
            w.insert(
                "model.decoder.embed_tokens.weight".into(),
                t["decoder.embed_tokens.weight"].clone(),
            );
            w.insert("model.decoder.output_projection.weight".into(), head);
            w.insert("model.encoder.embed_positions.weight".into(), table.clone());
            w.insert("model.decoder.embed_positions.weight".into(), table);
            json!({
                "architectures": ["FSMTForConditionalGeneration"], "model_type": "fsmt",
                "langs": [args.str("source_lang").unwrap_or("src".into()), args.str("target_lang").unwrap_or("tgt".into())],
                "src_vocab_size": sv, "tgt_vocab_size": tv, "d_model": d, "max_position_embeddings": max_pos,
                "encoder_layers": le, "encoder_ffn_dim": fe, "encoder_attention_heads": he,
                "decoder_layers": ld, "decoder_ffn_dim": fd, "decoder_attention_heads": hd,
                "activation_function": act, "scale_embedding": scale, "tie_word_embeddings": false,
                "pad_token_id": PAD, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
                "forced_eos_token_id": 2, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0
            })
        }
        _ => {
            let bart = model_type == "bart";
            if bart && max_src != max_tgt {
                return Err(bad(
                    ckpt,
                    "BART needs equal max_source_positions and max_target_positions",
                ));
            }
            let enc = pad_rows(&t["encoder.embed_tokens.weight"], vocab);
            w.insert(
                "model.shared.weight".into(),
                pad_rows(&t["decoder.embed_tokens.weight"], vocab),
            );
            w.insert("model.encoder.embed_tokens.weight".into(), enc);
            w.insert(
                "model.decoder.embed_tokens.weight".into(),
                pad_rows(&t["decoder.embed_tokens.weight"], vocab),
            );
            w.insert("lm_head.weight".into(), pad_rows(&head, vocab));
            if bart {
                for side in ["encoder", "decoder"] {
                    w.insert(
                        format!("model.{side}.embed_positions.weight"),
                        t[&format!("{side}.embed_positions.weight")].clone(),
                    );
                    for p in ["weight", "bias"] {
                        w.insert(
                            format!("model.{side}.layernorm_embedding.{p}"),
                            t[&format!("{side}.layernorm_embedding.{p}")].clone(),
                        );
                    }
                }
                w.insert(
                    "final_logits_bias".into(),
                    (vec![1, vocab], vec![0.0; vocab]),
                );
            } else {
                for side in ["encoder", "decoder"] {
                    for p in ["weight", "bias"] {
                        w.insert(
                            format!("model.{side}.layer_norm.{p}"),
                            t[&format!("{side}.layer_norm.{p}")].clone(),
                        );
                    }
                }
            }
            json!({
                "architectures": [if bart { "BartForConditionalGeneration" } else { "M2M100ForConditionalGeneration" }],
                "model_type": model_type, "vocab_size": vocab, "d_model": d,
                "max_position_embeddings": if bart { max_src } else { max_src.max(max_tgt) },
                "encoder_layers": le, "encoder_ffn_dim": fe, "encoder_attention_heads": he,
                "decoder_layers": ld, "decoder_ffn_dim": fd, "decoder_attention_heads": hd,
                "activation_function": act, "scale_embedding": scale, "tie_word_embeddings": false,
                "pad_token_id": PAD, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
                "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0
            })
        }
    };
    t.clear();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let list: Vec<(&str, &[usize], &[f32])> = w
        .iter()
        .map(|(k, (s, v))| (k.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    safetensors::write_f32(&out_dir.join("model.safetensors"), &list)?;
    let cfg_path = out_dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap())
        .map_err(|e| Error::io(&cfg_path, e))?;
    Ok(Conversion {
        model_type,
        encoder_layers: le,
        decoder_layers: ld,
        d_model: d,
        src_vocab: sv,
        tgt_vocab: tv,
        tensors: w.len(),
    })
}
