//! Generation options, named and defaulted as HF `generate` does: per-call values first,
//! then the model directory's generation_config.json (or, without one, the generation
//! fields of config.json), then HF's `GenerationConfig` defaults.

use crate::error::{Error, Result};
use serde_json::Value;

/// When beam search stops (HF's `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop a batch item as soon as `num_beams` hypotheses are finished.
    True,
    /// Stop when no running beam can beat the worst finished one (HF's heuristic).
    False,
    /// Stop only when no running beam can beat it in any possible future ("never").
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "true" => Ok(EarlyStopping::True),
            "false" => Ok(EarlyStopping::False),
            "never" => Ok(EarlyStopping::Never),
            _ => Err(Error::Input(format!(
                "early_stopping `{s}` is not true, false or never"
            ))),
        }
    }
}

/// Every option of one generate call. `None` means "not given": the model's generation
/// config, then HF's default, applies.
#[derive(Debug, Clone, Default)]
pub struct GenerationOptions {
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub min_length: Option<usize>,
    pub num_beams: Option<usize>,
    pub num_beam_groups: Option<usize>,
    pub diversity_penalty: Option<f32>,
    pub diverse_lambda: Option<f32>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<EarlyStopping>,
    pub num_return_sequences: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub eos_token_id: Option<Vec<i64>>,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub decoder_start_token_id: Option<i64>,
    pub forced_bos_token_id: Option<i64>,
    pub forced_eos_token_id: Option<Vec<i64>>,
    pub suppress_tokens: Option<Vec<i64>>,
    pub begin_suppress_tokens: Option<Vec<i64>>,
    pub bad_words_ids: Option<Vec<Vec<i64>>>,
}

fn ids(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Number(n) => n.as_i64().map(|x| vec![x]),
        Value::Array(a) => a.iter().map(Value::as_i64).collect(),
        _ => None,
    }
}

impl GenerationOptions {
    /// Options found in a generation_config.json / config.json object (null and absent
    /// keys stay `None`).
    pub fn from_json(v: &Value) -> Self {
        let g = |k: &str| v.get(k).filter(|x| !x.is_null());
        let u = |k: &str| g(k).and_then(Value::as_u64).map(|x| x as usize);
        let f = |k: &str| g(k).and_then(Value::as_f64).map(|x| x as f32);
        let i = |k: &str| g(k).and_then(Value::as_i64);
        GenerationOptions {
            max_new_tokens: u("max_new_tokens"),
            max_length: u("max_length"),
            min_new_tokens: u("min_new_tokens"),
            min_length: u("min_length"),
            num_beams: u("num_beams"),
            num_beam_groups: u("num_beam_groups"),
            diversity_penalty: f("diversity_penalty"),
            diverse_lambda: f("diverse_lambda"),
            length_penalty: f("length_penalty"),
            early_stopping: g("early_stopping").and_then(|x| match x {
                Value::Bool(true) => Some(EarlyStopping::True),
                Value::Bool(false) => Some(EarlyStopping::False),
                Value::String(s) if s == "never" => Some(EarlyStopping::Never),
                _ => None,
            }),
            num_return_sequences: u("num_return_sequences"),
            do_sample: g("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_k: u("top_k"),
            top_p: f("top_p"),
            seed: g("seed").and_then(Value::as_u64),
            repetition_penalty: f("repetition_penalty"),
            no_repeat_ngram_size: u("no_repeat_ngram_size"),
            eos_token_id: g("eos_token_id").and_then(ids),
            pad_token_id: i("pad_token_id"),
            bos_token_id: i("bos_token_id"),
            decoder_start_token_id: i("decoder_start_token_id"),
            forced_bos_token_id: i("forced_bos_token_id"),
            forced_eos_token_id: g("forced_eos_token_id").and_then(ids),
            suppress_tokens: g("suppress_tokens").and_then(ids),
            begin_suppress_tokens: g("begin_suppress_tokens").and_then(ids),
            bad_words_ids: g("bad_words_ids").and_then(|b| b.as_array()?.iter().map(ids).collect()),
        }
    }

    /// `self`'s values, with `base`'s where `self` has none.
    pub fn or(self, base: &GenerationOptions) -> Self {
        macro_rules! pick {
            ($($f:ident),*) => {
                GenerationOptions { $($f: self.$f.or_else(|| base.$f.clone()),)* }
            };
        }
        pick!(
            max_new_tokens,
            max_length,
            min_new_tokens,
            min_length,
            num_beams,
            num_beam_groups,
            diversity_penalty,
            diverse_lambda,
            length_penalty,
            early_stopping,
            num_return_sequences,
            do_sample,
            temperature,
            top_k,
            top_p,
            seed,
            repetition_penalty,
            no_repeat_ngram_size,
            eos_token_id,
            pad_token_id,
            bos_token_id,
            decoder_start_token_id,
            forced_bos_token_id,
            forced_eos_token_id,
            suppress_tokens,
            begin_suppress_tokens,
            bad_words_ids
        )
    }

    /// The model directory's defaults: generation_config.json when present, else the
    /// generation fields of config.json.
    pub fn model_defaults(dir: &std::path::Path, config: &Value) -> Result<Self> {
        let p = dir.join("generation_config.json");
        if p.is_file() {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: p.clone(),
                msg: format!("malformed JSON: {e}"),
            })?;
            return Ok(Self::from_json(&v).without_default_max_length());
        }
        // Without generation_config.json HF derives one from config.json's generation keys.
        Ok(Self::from_json(config).without_default_max_length())
    }

    /// A model's max_length equal to HF's default (20) counts as that default: 20 tokens
    /// past the input, capped at the model's positions. HF compares the configured value
    /// with its default's, so only a max_length given with the call, or a model's other
    /// than 20, is an absolute limit.
    fn without_default_max_length(mut self) -> Self {
        if self.max_length == Some(20) {
            self.max_length = None;
        }
        self
    }
}

/// Options with every default applied, for one call.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub max_new_tokens: Option<usize>,
    pub max_length: usize,
    pub max_length_given: bool,
    pub min_new_tokens: Option<usize>,
    pub min_length: usize,
    pub num_beams: usize,
    pub num_beam_groups: usize,
    pub diversity_penalty: f32,
    /// Sibling-rank penalty; `Some(0.0)` runs the ranked selection with no penalty.
    pub diverse_lambda: Option<f32>,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: usize,
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub no_repeat_ngram_size: usize,
    pub eos: Vec<i64>,
    pub pad: Option<i64>,
    pub decoder_start: Option<i64>,
    pub forced_bos: Option<i64>,
    pub forced_eos: Vec<i64>,
    pub suppress: Vec<i64>,
    pub begin_suppress: Vec<i64>,
    pub bad_words: Vec<Vec<i64>>,
}

impl Resolved {
    /// Applies HF's defaults and checks the combination.
    pub fn new(o: &GenerationOptions, encoder_decoder: bool) -> Result<Self> {
        let bad = |m: String| Err(Error::Input(m));
        let num_beams = o.num_beams.unwrap_or(1);
        let groups = o.num_beam_groups.unwrap_or(1);
        let nret = o.num_return_sequences.unwrap_or(1);
        if num_beams == 0 || groups == 0 || nret == 0 {
            return bad(
                "num_beams, num_beam_groups and num_return_sequences must be at least 1".into(),
            );
        }
        if !num_beams.is_multiple_of(groups) {
            return bad(format!(
                "num_beams {num_beams} is not a multiple of num_beam_groups {groups}"
            ));
        }
        let do_sample = o.do_sample.unwrap_or(false);
        if num_beams == 1 && nret > 1 && !do_sample {
            return bad(
                "num_return_sequences > 1 needs beam search (num_beams >= it) or sampling".into(),
            );
        }
        if num_beams > 1 && nret > num_beams {
            return bad(format!(
                "num_return_sequences {nret} exceeds num_beams {num_beams}"
            ));
        }
        if groups > 1 && do_sample {
            return bad("diverse (group) beam search does not sample".into());
        }
        let temperature = o.temperature.unwrap_or(1.0);
        if do_sample && !(temperature > 0.0 && temperature.is_finite()) {
            return bad(format!(
                "temperature must be positive and finite, got {temperature}"
            ));
        }
        let top_p = o.top_p.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&top_p) {
            return bad(format!("top_p must be in [0, 1], got {top_p}"));
        }
        let rp = o.repetition_penalty.unwrap_or(1.0);
        if !(rp > 0.0 && rp.is_finite()) {
            return bad(format!(
                "repetition_penalty must be positive and finite, got {rp}"
            ));
        }
        // Non-finite penalties would turn every score into NaN or infinity.
        for (name, v) in [
            ("length_penalty", o.length_penalty),
            ("diversity_penalty", o.diversity_penalty),
            ("diverse_lambda", o.diverse_lambda),
        ] {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return bad(format!("{name} must be finite, got {v}"));
            }
        }
        let eos = o.eos_token_id.clone().unwrap_or_default();
        let decoder_start = if encoder_decoder {
            let s = o.decoder_start_token_id.or(o.bos_token_id);
            if s.is_none() {
                return bad(
                    "an encoder-decoder needs decoder_start_token_id (or bos_token_id)".into(),
                );
            }
            s
        } else {
            None
        };
        Ok(Resolved {
            max_new_tokens: o.max_new_tokens,
            max_length: o.max_length.unwrap_or(20),
            max_length_given: o.max_length.is_some(),
            min_new_tokens: o.min_new_tokens,
            min_length: o.min_length.unwrap_or(0),
            num_beams,
            num_beam_groups: groups,
            diversity_penalty: o.diversity_penalty.unwrap_or(0.0),
            diverse_lambda: o.diverse_lambda,
            length_penalty: o.length_penalty.unwrap_or(1.0),
            early_stopping: o.early_stopping.unwrap_or(EarlyStopping::False),
            num_return_sequences: nret,
            do_sample,
            temperature,
            top_k: o.top_k.unwrap_or(50),
            top_p,
            seed: o.seed.unwrap_or(0),
            repetition_penalty: rp,
            no_repeat_ngram_size: o.no_repeat_ngram_size.unwrap_or(0),
            pad: o.pad_token_id.or_else(|| eos.first().copied()),
            eos,
            decoder_start,
            forced_bos: o.forced_bos_token_id,
            forced_eos: o.forced_eos_token_id.clone().unwrap_or_default(),
            suppress: o.suppress_tokens.clone().unwrap_or_default(),
            begin_suppress: o.begin_suppress_tokens.clone().unwrap_or_default(),
            bad_words: o.bad_words_ids.clone().unwrap_or_default(),
        })
    }

    /// (max_length, min_length) in tokens of the sequence HF sees for a prompt of
    /// `input_len` tokens (decoder-only: the prompt; encoder-decoder: the start token).
    pub fn lengths(&self, input_len: usize, max_positions: usize) -> Result<(usize, usize)> {
        let max_length = match self.max_new_tokens {
            Some(n) => n + input_len,
            None if !self.max_length_given => (self.max_length + input_len).min(max_positions),
            None => self.max_length,
        };
        let min_length = match self.min_new_tokens {
            Some(n) => n + input_len,
            None => self.min_length,
        };
        if input_len >= max_length {
            return Err(Error::Input(format!(
                "the input has {input_len} tokens, not fewer than max_length {max_length}: raise max_new_tokens"
            )));
        }
        Ok((max_length, min_length))
    }
}
