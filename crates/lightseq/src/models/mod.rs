//! Architectures, one file each: a serde config mirroring config.json, HF weight names,
//! and a forward pass written against ops (never against a device).

pub mod bert;
pub mod decode;
mod forward_graph;
pub mod gpt2;
pub mod llama;
pub mod presets;
pub mod seq2seq;
mod step_graph;
pub mod t5;
pub mod vit;
pub mod xglm;

use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::tensor::{DType, Device, Tensor};
use serde::de::DeserializeOwned;

/// A batch of ragged token sequences.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// One id list per sequence.
    pub input_ids: Vec<Vec<i64>>,
    /// Optional segment ids, the same lengths as `input_ids`.
    pub token_type_ids: Option<Vec<Vec<i64>>>,
    /// Decoder inputs of encoder-decoder models, one list per sequence.
    pub decoder_input_ids: Option<Vec<Vec<i64>>>,
    /// Images for vision encoders: shape [batch, channels, height, width] and values.
    pub pixel_values: Option<(Vec<usize>, Vec<f32>)>,
}

impl Batch {
    /// Fails when the batch holds images: text models take token ids.
    pub(crate) fn text_only(&self) -> Result<()> {
        if self.pixel_values.is_some() {
            return Err(Error::Input(
                "this model takes token ids (`input_ids` JSON), not `pixel_values`".into(),
            ));
        }
        Ok(())
    }

    /// Reads the JSON input format: `{"input_ids": [[...], ...]}` with optional
    /// `token_type_ids` and `decoder_input_ids` (ragged lists of integers).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Input("expected a JSON object with `input_ids`".into()))?;
        let ids = obj
            .get("input_ids")
            .ok_or_else(|| Error::Input("no `input_ids`".into()))?;
        let opt = |key: &str| match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(t) => ragged(t, key).map(Some),
        };
        Ok(Batch {
            input_ids: ragged(ids, "input_ids")?,
            token_type_ids: opt("token_type_ids")?,
            decoder_input_ids: opt("decoder_input_ids")?,
            pixel_values: None,
        })
    }
}

fn ragged(v: &serde_json::Value, key: &str) -> Result<Vec<Vec<i64>>> {
    let rows = v
        .as_array()
        .ok_or_else(|| Error::Input(format!("`{key}` must be a list of lists of integers")))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r
                .as_array()
                .ok_or_else(|| Error::Input(format!("`{key}[{i}]` must be a list of integers")))?;
            r.iter()
                .enumerate()
                .map(|(j, x)| {
                    x.as_i64().ok_or_else(|| {
                        Error::Input(format!("`{key}[{i}][{j}]` is {x}, not an integer"))
                    })
                })
                .collect()
        })
        .collect()
}

/// What a forward pass returns: `hidden` [batch, max_len, hidden] for encoders, `logits`
/// [batch, max_len, vocab] for language models; positions past a sequence's end are zero.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `hidden` or `logits`.
    pub name: &'static str,
    /// [batch, max_len, width]
    pub shape: [usize; 3],
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Summary for `lightseq info`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Architecture name.
    pub architecture: String,
    /// (name, value) pairs of the main sizes.
    pub sizes: Vec<(&'static str, usize)>,
}

/// A loaded model.
pub trait Model: Send + Sync {
    /// Runs the batch; sequences are padded and masked internally.
    fn forward(&self, batch: &Batch) -> Result<ModelOutput>;
    /// Architecture and sizes.
    fn info(&self) -> ModelInfo;
    /// Vocabulary size (ids must be below it).
    fn vocab_size(&self) -> usize;
    /// Longest sequence the position table allows.
    fn max_positions(&self) -> usize;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The forward pass with its output left on the device ([batch * max_len, width]; rows
    /// past a sequence's length hold whatever the padded forward computed there), for
    /// benchmarks (`lightseq bench --task forward`); models without one return `None`.
    fn forward_on_device(&self, _batch: &Batch) -> Option<Result<Tensor>> {
        None
    }
}

/// Loads the model in `dir` onto `device` with weights converted to `dtype`.
pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    let mt = dir.model_type()?;
    match mt {
        "bert" => Ok(Box::new(bert::Bert::load(dir, dtype, device)?)),
        "gpt2" => Ok(Box::new(gpt2::Gpt2::load(dir, dtype, device)?)),
        "t5" | "mt5" => Ok(Box::new(t5::T5::load(dir, mt == "mt5", dtype, device)?)),
        "xglm" => Ok(Box::new(xglm::Xglm::load(dir, dtype, device)?)),
        "vit" => Ok(Box::new(vit::Vit::load(dir, dtype, device)?)),
        other => {
            if let Some(k) = seq2seq::Kind::from_model_type(other) {
                Ok(Box::new(seq2seq::Seq2Seq::load(dir, k, dtype, device)?))
            } else if let Some(f) = llama::Flavor::from_model_type(other) {
                Ok(Box::new(llama::Llama::load(dir, f, dtype, device)?))
            } else {
                Err(unsupported(dir, other))
            }
        }
    }
}

fn unsupported(dir: &ModelDir, model_type: &str) -> Error {
    Error::Config {
        path: dir.path.join("config.json"),
        msg: format!(
            "unsupported model_type `{model_type}` (supported: {})",
            SUPPORTED.join(", ")
        ),
    }
}

/// Loads a generative model (decoder-only or encoder-decoder) for incremental decoding.
pub fn load_decoder(
    dir: &ModelDir,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn decode::Decoder>> {
    let mt = dir.model_type()?;
    match mt {
        "gpt2" => Ok(Box::new(gpt2::Gpt2::load(dir, dtype, device)?)),
        "t5" | "mt5" => Ok(Box::new(t5::T5::load(dir, mt == "mt5", dtype, device)?)),
        "xglm" => Ok(Box::new(xglm::Xglm::load(dir, dtype, device)?)),
        "bert" | "vit" => Err(Error::Config {
            path: dir.path.join("config.json"),
            msg: format!("model_type `{mt}` is an encoder: it does not generate"),
        }),
        other => {
            if let Some(k) = seq2seq::Kind::from_model_type(other) {
                Ok(Box::new(seq2seq::Seq2Seq::load(dir, k, dtype, device)?))
            } else if let Some(f) = llama::Flavor::from_model_type(other) {
                Ok(Box::new(llama::Llama::load(dir, f, dtype, device)?))
            } else {
                Err(unsupported(dir, other))
            }
        }
    }
}

/// Architecture and sizes from config.json alone (no weights are read).
pub fn describe(dir: &ModelDir) -> Result<ModelInfo> {
    match dir.model_type()? {
        "bert" => Ok(bert::info(&parse_config(dir)?)),
        "gpt2" => Ok(gpt2::info(&parse_config(dir)?)),
        mt @ ("t5" | "mt5") => Ok(t5::info(&t5::T5Config::parse(dir, mt == "mt5")?)),
        "xglm" => Ok(xglm::info(&parse_config(dir)?)),
        "vit" => Ok(vit::info(&vit::VitConfig::parse(dir)?)),
        other => {
            if let Some(k) = seq2seq::Kind::from_model_type(other) {
                Ok(seq2seq::info(&seq2seq::Seq2SeqConfig::parse(dir, k)?))
            } else if let Some(f) = llama::Flavor::from_model_type(other) {
                Ok(llama::info(&llama::LlamaConfig::parse(dir, f)?))
            } else {
                Err(unsupported(dir, other))
            }
        }
    }
}

/// model_type values `load` accepts.
pub const SUPPORTED: &[&str] = &[
    "bert", "gpt2", "bart", "mbart", "marian", "fsmt", "m2m_100", "t5", "mt5", "xglm", "vit",
    "llama", "mistral", "qwen2",
];

/// Parses config.json into an architecture's config struct.
pub(crate) fn parse_config<T: DeserializeOwned>(dir: &ModelDir) -> Result<T> {
    serde_json::from_value(dir.config.clone()).map_err(|e| Error::Config {
        path: dir.path.join("config.json"),
        msg: e.to_string(),
    })
}

/// [`parse_config`] for other rungs (training).
pub fn parse_config_pub<T: DeserializeOwned>(dir: &ModelDir) -> Result<T> {
    parse_config(dir)
}

/// Fails unless `cond`, naming the config file.
pub(crate) fn config_check(dir: &ModelDir, cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Config {
            path: dir.path.join("config.json"),
            msg: msg(),
        })
    }
}

/// A ragged batch laid out as [batch, max_len] with right padding.
pub(crate) struct Padded {
    pub batch: usize,
    pub len: usize,
    pub lengths: Vec<usize>,
}

impl Padded {
    /// Validates ids against `vocab` and lengths against `max_positions`.
    pub fn new(ids: &[Vec<i64>], vocab: usize, max_positions: usize) -> Result<Self> {
        for (b, seq) in ids.iter().enumerate() {
            if seq.len() > max_positions {
                return Err(Error::Input(format!(
                    "sequence {b} has {} tokens, more than the model's {max_positions} positions",
                    seq.len()
                )));
            }
            if let Some((i, &id)) = seq
                .iter()
                .enumerate()
                .find(|(_, &id)| id < 0 || id as u64 >= vocab as u64)
            {
                return Err(Error::Input(format!(
                    "sequence {b}, token {i}: id {id} is outside the vocabulary [0, {vocab})"
                )));
            }
        }
        Ok(Padded {
            batch: ids.len(),
            len: ids.iter().map(Vec::len).max().unwrap_or(0),
            lengths: ids.iter().map(Vec::len).collect(),
        })
    }

    /// Flattens `rows` into [batch * len], padding with `pad`.
    pub fn flatten(&self, rows: &[Vec<i64>], pad: i32) -> Vec<i32> {
        let mut out = vec![pad; self.batch * self.len];
        for (b, r) in rows.iter().enumerate() {
            for (i, &v) in r.iter().enumerate() {
                out[b * self.len + i] = v as i32;
            }
        }
        out
    }

    /// `rows`, each right-padded with `pad` to the batch's length.
    pub fn pad_rows(&self, rows: &[Vec<i64>], pad: i64) -> Vec<Vec<i64>> {
        rows.iter()
            .map(|r| {
                let mut v = r.clone();
                v.resize(self.len, pad);
                v
            })
            .collect()
    }

    /// Position ids 0..len for every row (one row repeated: a division an element took
    /// ~8 us at 32 x 128 on the build machine, the copies 0.3).
    pub fn positions(&self) -> Vec<i32> {
        let row: Vec<i32> = (0..self.len as i32).collect();
        row.repeat(self.batch)
    }

    /// Copies `x` [batch * len, width] to the host and zeroes padding rows.
    pub fn output(&self, name: &'static str, x: &Tensor) -> Result<ModelOutput> {
        let width = x.shape().last().copied().unwrap_or(0);
        let mut data = x.to_f32_vec()?;
        for (b, &n) in self.lengths.iter().enumerate() {
            let start = (b * self.len + n) * width;
            let end = (b + 1) * self.len * width;
            data[start..end].iter_mut().for_each(|v| *v = 0.0);
        }
        Ok(ModelOutput {
            name,
            shape: [self.batch, self.len, width],
            data,
        })
    }
}
