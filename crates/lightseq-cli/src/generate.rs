//! `lightseq generate`: token ids or text in, generated sequences and scores out (JSON).

use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use clap::Args;
use lightseq::generate::{generate, EarlyStopping, GenerationOptions, Inputs};
use lightseq::io::safetensors::SafeTensorsFile;
use lightseq::io::ModelDir;
use lightseq::models::{self, Batch};
use lightseq::{DType, DeviceSpec, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `lightseq generate`, named as HF `generate` names them.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (config.json, weights, optional generation_config.json and tokenizer.json).
    pub model_dir: PathBuf,
    /// JSON with `input_ids` (ragged lists): prompts, or sources for encoder-decoders.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Input text (repeatable), tokenized with the model's tokenizer.json.
    #[arg(long)]
    pub text: Vec<String>,
    /// A file of input texts, one per line.
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// Encoder output to decode from (encoder-decoders): safetensors with
    /// `encoder_hidden_states` [batch, src_len, d_model] and optional `attention_mask` [batch, src_len].
    #[arg(long)]
    pub encoder_states: Option<PathBuf>,
    /// Output JSON: {"sequences": [[[...]]], "scores": [[...]], "text": [[...]] with a tokenizer}.
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long)]
    pub min_new_tokens: Option<usize>,
    #[arg(long)]
    pub min_length: Option<usize>,
    #[arg(long)]
    pub num_beams: Option<usize>,
    #[arg(long)]
    pub length_penalty: Option<f32>,
    /// true, false or never.
    #[arg(long)]
    pub early_stopping: Option<String>,
    #[arg(long)]
    pub num_return_sequences: Option<usize>,
    /// true or false.
    #[arg(long)]
    pub do_sample: Option<bool>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Diverse beam search: number of groups (Hamming diversity between groups).
    #[arg(long)]
    pub num_beam_groups: Option<usize>,
    #[arg(long)]
    pub diversity_penalty: Option<f32>,
    /// Diverse beam search: penalty per sibling rank within a beam's continuations.
    #[arg(long)]
    pub diverse_lambda: Option<f32>,
    /// EOS token id(s), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub eos_token_id: Option<Vec<i64>>,
    #[arg(long)]
    pub pad_token_id: Option<i64>,
    #[arg(long)]
    pub decoder_start_token_id: Option<i64>,
    #[arg(long)]
    pub forced_bos_token_id: Option<i64>,
    #[arg(long, value_delimiter = ',')]
    pub forced_eos_token_id: Option<Vec<i64>>,
    /// Token ids never generated, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub suppress_tokens: Option<Vec<i64>>,
    /// Token ids not generated at the first step, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub begin_suppress_tokens: Option<Vec<i64>>,
}

impl GenerateArgs {
    fn options(&self) -> Result<GenerationOptions> {
        Ok(GenerationOptions {
            max_new_tokens: self.max_new_tokens,
            max_length: self.max_length,
            min_new_tokens: self.min_new_tokens,
            min_length: self.min_length,
            num_beams: self.num_beams,
            num_beam_groups: self.num_beam_groups,
            diversity_penalty: self.diversity_penalty,
            diverse_lambda: self.diverse_lambda,
            length_penalty: self.length_penalty,
            early_stopping: self
                .early_stopping
                .as_deref()
                .map(str::parse::<EarlyStopping>)
                .transpose()?,
            num_return_sequences: self.num_return_sequences,
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            eos_token_id: self.eos_token_id.clone(),
            pad_token_id: self.pad_token_id,
            bos_token_id: None,
            decoder_start_token_id: self.decoder_start_token_id,
            forced_bos_token_id: self.forced_bos_token_id,
            forced_eos_token_id: self.forced_eos_token_id.clone(),
            suppress_tokens: self.suppress_tokens.clone(),
            begin_suppress_tokens: self.begin_suppress_tokens.clone(),
            bad_words_ids: None,
        })
    }
}

/// Encoder states from a safetensors file: the states and each item's length (from the
/// attention mask's ones, or the full length).
fn read_states(path: &Path) -> Result<(Vec<usize>, Vec<f32>, Vec<usize>)> {
    let f = SafeTensorsFile::open(path)?;
    let name = [
        "encoder_hidden_states",
        "encoder_states",
        "last_hidden_state",
    ]
    .into_iter()
    .find(|n| f.tensors.contains_key(*n))
    .with_context(|| format!("{}: no `encoder_hidden_states` tensor", path.display()))?;
    let (shape, values) = f.read_f32(name)?;
    if shape.len() != 3 {
        bail!(
            "{}: `{name}` has shape {shape:?}, expected [batch, src_len, d_model]",
            path.display()
        );
    }
    let lengths = match f.tensors.get("attention_mask") {
        Some(info) => {
            if info.shape != shape[..2] {
                bail!(
                    "{}: attention_mask {:?} does not match states {shape:?}",
                    path.display(),
                    info.shape
                );
            }
            let raw = f.data(info);
            let es = raw.len() / (shape[0] * shape[1]).max(1);
            (0..shape[0])
                .map(|b| {
                    (0..shape[1])
                        .filter(|&t| {
                            raw[(b * shape[1] + t) * es..(b * shape[1] + t + 1) * es]
                                .iter()
                                .any(|&x| x != 0)
                        })
                        .count()
                })
                .collect()
        }
        None => vec![shape[1]; shape[0]],
    };
    Ok((shape, values, lengths))
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let device = a.device.parse::<DeviceSpec>()?.open()?;
    let dir = ModelDir::open(&a.model_dir)?;
    let tokenizer = Tokenizer::find(&a.model_dir)?;
    let mut texts = a.text.clone();
    if let Some(p) = &a.text_file {
        let t = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
        texts.extend(
            t.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    let given = [
        a.input.is_some(),
        !texts.is_empty(),
        a.encoder_states.is_some(),
    ]
    .iter()
    .filter(|&&x| x)
    .count();
    if given != 1 {
        bail!("give exactly one of --input, --text/--text-file or --encoder-states");
    }
    let opts = a.options()?.or(&GenerationOptions::model_defaults(
        &a.model_dir,
        &dir.config,
    )?);
    let model = models::load_decoder(&dir, dtype, &device)?;
    let t0 = Instant::now();
    let (out, n_inputs) = if let Some(p) = &a.encoder_states {
        let (shape, values, lengths) = read_states(p)?;
        let states = Tensor::from_f32(&values, &shape, DType::F32, &lightseq::Device::Cpu)?;
        (
            generate(
                model.as_ref(),
                Inputs::EncoderStates(&states, &lengths),
                &opts,
            )?,
            lengths.len(),
        )
    } else {
        let ids = if let Some(p) = &a.input {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", p.display()))?;
            Batch::from_json(&v)
                .with_context(|| p.display().to_string())?
                .input_ids
        } else {
            let tok = tokenizer.as_ref().with_context(|| {
                format!("--text needs {}/tokenizer.json", a.model_dir.display())
            })?;
            texts
                .iter()
                .map(|t| tok.encode(t))
                .collect::<Result<Vec<_>>>()?
        };
        (
            generate(model.as_ref(), Inputs::Ids(&ids), &opts)?,
            ids.len(),
        )
    };
    let secs = t0.elapsed().as_secs_f64();
    let sequences: Vec<Vec<Vec<i64>>> = out
        .iter()
        .map(|h| h.iter().map(|x| x.tokens.clone()).collect())
        .collect();
    let scores: Vec<Vec<f32>> = out
        .iter()
        .map(|h| h.iter().map(|x| x.score).collect())
        .collect();
    let mut json = serde_json::json!({ "sequences": sequences, "scores": scores });
    if let Some(tok) = &tokenizer {
        let text: Vec<Vec<String>> = sequences
            .iter()
            .map(|hs| hs.iter().map(|s| tok.decode(s)).collect::<Result<Vec<_>>>())
            .collect::<Result<_>>()?;
        json["text"] = serde_json::json!(text);
    }
    std::fs::write(&a.out, serde_json::to_string(&json)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let generated: usize = out.iter().flatten().map(|h| h.tokens.len()).sum();
    eprintln!(
        "lightseq generate: {n_inputs} inputs on {device} ({dtype}), {generated} output tokens in {:.0} ms",
        secs * 1e3
    );
    Ok(())
}
