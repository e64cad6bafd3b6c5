//! `lightseq train`: fine-tuning from an HF model directory. This version trains GPT2 causal
//! LMs on the CPU in f32 (the reference path); other models, CUDA and mixed precision
//! answer with a clear error until they exist.

use anyhow::{bail, Context, Result};
use clap::Args;
use lightseq::io::{safetensors, ModelDir};
use lightseq::train::gpt2::Gpt2Trainer;
use lightseq::train::optim::{AdamConfig, Kind, Schedule};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lightseq train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Start from this HF model directory.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// A preset to train from scratch (not available yet).
    #[arg(long)]
    pub preset: Option<String>,
    /// A config.json to train from scratch (not available yet).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// JSONL rows: {"ids": [...]} (causal LM: predict ids[1:] from ids[:-1]).
    #[arg(long)]
    pub train: PathBuf,
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Where the trained model (config.json + model.safetensors) is written.
    #[arg(long)]
    pub save_dir: PathBuf,
    /// Padded tokens per batch (default: the whole data set in one batch).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long, default_value_t = 100)]
    pub max_steps: usize,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub update_freq: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// constant, inverse_sqrt, linear or cosine.
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    /// adam or adamw.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    #[arg(long, default_value = "0.9,0.999")]
    pub adam_betas: String,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 0.0)]
    pub clip_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Dropout probability for every dropout of the model (only 0 for now).
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = false)]
    pub shuffle: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// One JSON line per step: step, loss, nll_loss, lr, tokens, grad_norm.
    #[arg(long)]
    pub log: Option<PathBuf>,
    #[arg(long)]
    pub resume: bool,
}

fn read_rows(path: &PathBuf) -> Result<Vec<Vec<i64>>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut rows = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))?;
        let ids = v.get("ids").and_then(|x| x.as_array()).with_context(|| {
            format!(
                "{}:{}: expected {{\"ids\": [...]}} (seq2seq and text rows are not supported yet)",
                path.display(),
                i + 1
            )
        })?;
        let ids: Vec<i64> = ids
            .iter()
            .map(|x| x.as_i64())
            .collect::<Option<_>>()
            .with_context(|| format!("{}:{}: ids must be integers", path.display(), i + 1))?;
        if ids.len() < 2 {
            bail!(
                "{}:{}: a row needs at least two tokens",
                path.display(),
                i + 1
            );
        }
        rows.push(ids);
    }
    if rows.is_empty() {
        bail!("{}: no training rows", path.display());
    }
    Ok(rows)
}

/// Batches in order, each holding at most `max_tokens` padded tokens (at least one row).
fn batches(rows: &[Vec<i64>], max_tokens: Option<usize>) -> Vec<Vec<Vec<i64>>> {
    let Some(max) = max_tokens else {
        return vec![rows.to_vec()];
    };
    let mut out: Vec<Vec<Vec<i64>>> = Vec::new();
    let mut cur: Vec<Vec<i64>> = Vec::new();
    let mut longest = 0;
    for r in rows {
        let l = longest.max(r.len() - 1);
        if !cur.is_empty() && l * (cur.len() + 1) > max {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(r.len() - 1);
        cur.push(r.clone());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub fn run(a: &TrainArgs) -> Result<()> {
    if a.preset.is_some() || a.config.is_some() {
        bail!(
            "training from scratch (--preset/--config) is not available yet; use --init MODEL_DIR"
        );
    }
    let init = a.init.as_ref().context("give --init MODEL_DIR")?;
    if a.device != "cpu" || a.dtype != "f32" {
        bail!("training runs on the CPU in f32 for now (--device cpu --dtype f32)");
    }
    if a.dropout != 0.0 {
        bail!("dropout is not implemented in training yet: use --dropout 0");
    }
    if a.resume || a.valid.is_some() || a.epochs.is_some() || a.update_freq != 1 {
        bail!("--resume, --valid, --epochs and --update-freq are not available yet");
    }
    let dir = ModelDir::open(init)?;
    if dir.model_type()? != "gpt2" {
        bail!(
            "training supports model_type gpt2 for now, not `{}`",
            dir.model_type()?
        );
    }
    let mut tr = Gpt2Trainer::load(&dir)?;
    let mut rows = read_rows(&a.train)?;
    if a.shuffle {
        // Deterministic shuffle from the seed (Fisher-Yates over SplitMix64).
        let mut rng = lightseq::generate::search::Rng::new(a.seed);
        for i in (1..rows.len()).rev() {
            let j = (rng.uniform() * (i + 1) as f64) as usize;
            rows.swap(i, j.min(i));
        }
    }
    let betas: Vec<f64> = a
        .adam_betas
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .context("--adam-betas B1,B2")?;
    if betas.len() != 2 {
        bail!("--adam-betas takes two numbers, B1,B2");
    }
    let opt = AdamConfig {
        kind: match a.optimizer.as_str() {
            "adam" => Kind::Adam,
            "adamw" => Kind::AdamW,
            o => bail!("unknown optimizer `{o}` (adam or adamw)"),
        },
        beta1: betas[0],
        beta2: betas[1],
        eps: a.adam_eps,
        weight_decay: a.weight_decay,
    };
    let total = a.max_steps as u64;
    let schedule = match a.schedule.as_str() {
        "constant" => Schedule::Constant,
        "inverse_sqrt" => Schedule::InverseSqrt {
            warmup: a.warmup_steps,
        },
        "linear" => Schedule::Linear {
            warmup: a.warmup_steps,
            total,
        },
        "cosine" => Schedule::Cosine {
            warmup: a.warmup_steps,
            total,
        },
        s => bail!("unknown schedule `{s}` (constant, inverse_sqrt, linear, cosine)"),
    };
    let data = batches(&rows, a.max_tokens);
    let mut log = match &a.log {
        Some(p) => Some(std::fs::File::create(p).with_context(|| p.display().to_string())?),
        None => None,
    };
    let t0 = Instant::now();
    let mut seen = 0usize;
    for step in 1..=a.max_steps {
        let batch = &data[(step - 1) % data.len()];
        let lr = schedule.lr(a.lr, step as u64);
        let s = tr.step(
            batch,
            a.label_smoothing,
            (a.clip_norm > 0.0).then_some(a.clip_norm),
            &opt,
            lr,
        )?;
        seen += s.tokens;
        if let Some(f) = &mut log {
            let line = serde_json::json!({"step": step, "loss": s.loss, "nll_loss": s.nll_loss, "lr": lr, "tokens": s.tokens, "grad_norm": s.grad_norm});
            writeln!(f, "{line}")?;
        }
        let el = t0.elapsed().as_secs_f64();
        if step == 1 || step % 10 == 0 || step == a.max_steps {
            eprintln!(
                "step {step}/{}: loss {:.4}, {:.0} tokens/s, ETA {:.0} s",
                a.max_steps,
                s.loss,
                seen as f64 / el,
                el / step as f64 * (a.max_steps - step) as f64
            );
        }
    }
    std::fs::create_dir_all(&a.save_dir).with_context(|| a.save_dir.display().to_string())?;
    let sd = tr.state_dict();
    let list: Vec<(&str, &[usize], &[f32])> = sd
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    safetensors::write_f32(&a.save_dir.join("model.safetensors"), &list)?;
    std::fs::write(
        a.save_dir.join("config.json"),
        serde_json::to_string_pretty(&dir.config)?,
    )?;
    eprintln!("saved {}", a.save_dir.display());
    Ok(())
}
