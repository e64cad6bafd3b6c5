//! `lightseq train`: fine-tuning (`--init`) or training from scratch (`--preset`,
//! `--config`) of Marian/BART/mBART translation models, GPT2 causal LMs, BERT (masked LM,
//! sequence classification) and ViT image classifiers, on the CPU or CUDA, in f32, f16
//! (dynamic loss scaling) or bf16.

use crate::plot;
use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use clap::Args;
use lightseq::io::ModelDir;
use lightseq::models::presets;
use lightseq::train::models::{Example, Net, Task};
use lightseq::train::optim::{AdamConfig, Kind, Schedule};
use lightseq::train::trainer::{StepStats, TrainConfig, Trainer};
use lightseq::{DType, DeviceSpec};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `lightseq train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Start from this HF model directory (fine-tuning).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train from scratch a preset of real sizes: bert-base, gpt2, transformer-base,
    /// transformer-big, bart-base.
    #[arg(long)]
    pub preset: Option<String>,
    /// Train from scratch the model a config.json describes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// JSONL rows: {"src": [...], "tgt": [...]} (seq2seq), {"ids": [...]} (causal LM),
    /// {"ids": [...], "labels": [...]} (masked LM, -100 = not predicted), {"ids": [...],
    /// "label": k, "token_type_ids": [...]} (classification), {"pixel_values": [[[...]]],
    /// "label": k} (ViT image classification, [channels][height][width]); or text:
    /// {"text": "..."}, {"src": "...", "tgt": "..."} with the model's tokenizer.json.
    #[arg(long)]
    pub train: PathBuf,
    /// Rows to report a validation loss on after every epoch and at the end.
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Where the model (config.json + model.safetensors), optimizer state, log of
    /// validation losses and loss.png are written.
    #[arg(long)]
    pub save_dir: PathBuf,
    /// Padded tokens per batch (default: the whole data set in one batch).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Stop after this many updates.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop after this many passes over the data (default 1 when --max-steps is absent).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Batches whose gradients are summed into one update.
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
    /// Every dropout of the model (hidden, attention, activation); default: the config's.
    #[arg(long)]
    pub dropout: Option<f32>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Shuffle rows every epoch (true or false).
    #[arg(long, default_value = "true")]
    pub shuffle: String,
    /// For BERT: mlm or classify (default: from the config's architectures).
    #[arg(long)]
    pub task: Option<String>,
    /// Classes of a classifier (BERT, ViT), as HF's from_pretrained(num_labels=N): replaces
    /// the config's label count (default: its id2label or num_labels, else 2).
    #[arg(long)]
    pub num_labels: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// One JSON line per update: step, loss, nll_loss, lr, tokens, grad_norm.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Continue from the checkpoint in --save-dir.
    #[arg(long)]
    pub resume: bool,
}

fn ids_of(v: &Value, what: &str) -> Result<Vec<i64>> {
    v.as_array()
        .with_context(|| format!("`{what}` must be a list of token ids"))?
        .iter()
        .map(|x| {
            x.as_i64()
                .with_context(|| format!("`{what}` must hold integers"))
        })
        .collect()
}

/// Appends the numbers of a (nested) JSON array to `out`, in row-major order.
fn flatten_floats(v: &Value, out: &mut Vec<f32>) -> Result<()> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten_floats(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().context("pixel values must be numbers")? as f32);
            Ok(())
        }
        _ => bail!("pixel values must be numbers in (nested) lists"),
    }
}

/// Parses one JSONL row for `task`.
fn parse_row(v: &Value, task: Task, tok: Option<&Tokenizer>) -> Result<Example> {
    let text = |k: &str| -> Result<Option<Vec<i64>>> {
        match v.get(k) {
            Some(Value::String(s)) => {
                let t = tok.context(
                    "text rows need the model's tokenizer.json (give token ids otherwise)",
                )?;
                Ok(Some(t.encode(s)?))
            }
            Some(x) => Ok(Some(ids_of(x, k)?)),
            None => Ok(None),
        }
    };
    Ok(match task {
        Task::Seq2Seq => {
            let src = text("src")?.context("expected {\"src\": ..., \"tgt\": ...}")?;
            let tgt = text("tgt")?.context("expected {\"src\": ..., \"tgt\": ...}")?;
            if src.is_empty() || tgt.is_empty() {
                bail!("`src` and `tgt` must not be empty");
            }
            Example::Seq2Seq { src, tgt }
        }
        Task::CausalLm => Example::Causal {
            ids: match text("ids")? {
                Some(x) => x,
                None => {
                    text("text")?.context("expected {\"ids\": [...]} or {\"text\": \"...\"}")?
                }
            },
        },
        Task::MaskedLm => Example::Masked {
            ids: ids_of(
                v.get("ids")
                    .context("expected {\"ids\": [...], \"labels\": [...]}")?,
                "ids",
            )?,
            labels: ids_of(
                v.get("labels")
                    .context("expected {\"ids\": [...], \"labels\": [...]}")?,
                "labels",
            )?,
        },
        Task::ImageClassify => {
            let mut pixels = Vec::new();
            flatten_floats(
                v.get("pixel_values")
                    .context("expected {\"pixel_values\": [...], \"label\": k}")?,
                &mut pixels,
            )?;
            Example::Image {
                pixels,
                label: v
                    .get("label")
                    .and_then(Value::as_i64)
                    .context("expected an integer \"label\"")?,
            }
        }
        Task::Classify => Example::Classify {
            ids: match text("ids")? {
                Some(x) => x,
                None => text("text")?.context("expected {\"ids\": [...], \"label\": k}")?,
            },
            types: v
                .get("token_type_ids")
                .map(|t| ids_of(t, "token_type_ids"))
                .transpose()?,
            label: v
                .get("label")
                .and_then(Value::as_i64)
                .context("expected an integer \"label\"")?,
        },
    })
}

fn read_rows(path: &Path, task: Task, tok: Option<&Tokenizer>) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut rows = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))?;
        rows.push(
            parse_row(&v, task, tok).with_context(|| format!("{}:{}", path.display(), i + 1))?,
        );
    }
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(rows)
}

/// Batches of at most `max_tokens` padded tokens (at least one row each), in `order`.
fn batches(rows: &[Example], order: &[usize], max_tokens: Option<usize>) -> Vec<Vec<usize>> {
    let Some(max) = max_tokens else {
        return vec![order.to_vec()];
    };
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for &i in order {
        let l = longest.max(rows[i].size());
        if !cur.is_empty() && l * (cur.len() + 1) > max {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(rows[i].size());
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The row order of `epoch` (1-based): seeded Fisher-Yates when shuffling.
fn order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = lightseq::generate::search::Rng::new(seed.wrapping_add(epoch));
        for i in (1..n).rev() {
            let j = (rng.uniform() * (i + 1) as f64) as usize;
            o.swap(i, j.min(i));
        }
    }
    o
}

fn schedule(a: &TrainArgs, total: u64) -> Result<Schedule> {
    Ok(match a.schedule.as_str() {
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
    })
}

fn optimizer(a: &TrainArgs) -> Result<AdamConfig> {
    let betas: Vec<f64> = a
        .adam_betas
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .context("--adam-betas B1,B2")?;
    if betas.len() != 2 || betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        bail!("--adam-betas takes two numbers in [0, 1): B1,B2");
    }
    Ok(AdamConfig {
        kind: match a.optimizer.as_str() {
            "adam" => Kind::Adam,
            "adamw" => Kind::AdamW,
            o => bail!("unknown optimizer `{o}` (adam or adamw)"),
        },
        beta1: betas[0],
        beta2: betas[1],
        eps: a.adam_eps,
        weight_decay: a.weight_decay,
    })
}

/// Sets a classifier config's label count: `num_labels`, and id2label / label2id where they
/// name another count (HF's defaults LABEL_i then, as from_pretrained(num_labels=N)).
fn set_num_labels(config: &mut Value, n: usize) -> Result<()> {
    if n == 0 {
        bail!("--num-labels must be at least 1");
    }
    let obj = config
        .as_object_mut()
        .context("config.json is not an object")?;
    obj.insert("num_labels".into(), json!(n));
    let named = obj
        .get("id2label")
        .and_then(Value::as_object)
        .map(|m| m.len());
    if named.is_some_and(|k| k != n) {
        let id2label: serde_json::Map<String, Value> = (0..n)
            .map(|i| (i.to_string(), json!(format!("LABEL_{i}"))))
            .collect();
        let label2id: serde_json::Map<String, Value> =
            (0..n).map(|i| (format!("LABEL_{i}"), json!(i))).collect();
        obj.insert("id2label".into(), Value::Object(id2label));
        obj.insert("label2id".into(), Value::Object(label2id));
    }
    Ok(())
}

/// The model to start from and where its config and tokenizer come from.
fn open_model(a: &TrainArgs) -> Result<(ModelDir, Option<PathBuf>)> {
    if a.resume && a.save_dir.join("trainer_state.json").is_file() {
        return Ok((ModelDir::open(&a.save_dir)?, Some(a.save_dir.clone())));
    }
    match (&a.init, &a.preset, &a.config) {
        (Some(d), None, None) => Ok((ModelDir::open(d)?, Some(d.clone()))),
        (None, Some(p), None) => {
            let cfg = presets::config(p).with_context(|| {
                format!(
                    "unknown preset `{p}` (one of {})",
                    presets::NAMES.join(", ")
                )
            })?;
            Ok((ModelDir::random(p, cfg, a.seed), None))
        }
        (None, None, Some(c)) => {
            let text = std::fs::read_to_string(c).with_context(|| c.display().to_string())?;
            let cfg: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", c.display()))?;
            Ok((
                ModelDir::random(&c.display().to_string(), cfg, a.seed),
                c.parent().map(Path::to_path_buf),
            ))
        }
        _ => bail!("give exactly one of --init MODEL_DIR, --preset NAME, --config CONFIG.json"),
    }
}

struct Progress {
    tty: bool,
    t0: Instant,
    tokens: usize,
    last_print: f64,
}

impl Progress {
    fn show(&mut self, s: &StepStats, total: u64) {
        self.tokens += s.tokens;
        let el = self.t0.elapsed().as_secs_f64();
        let rate = self.tokens as f64 / el.max(1e-9);
        let eta = el / s.step.max(1) as f64 * total.saturating_sub(s.step) as f64;
        let done = s.step >= total;
        if self.tty {
            let w = 24;
            let fill = ((s.step as f64 / total.max(1) as f64) * w as f64) as usize;
            eprint!(
                "\r[{}{}] {}/{} loss {:.4} | {:.0} tok/s | ETA {:.0}s ",
                "#".repeat(fill.min(w)),
                "-".repeat(w - fill.min(w)),
                s.step,
                total,
                s.loss,
                rate,
                eta
            );
            if done {
                eprintln!();
            }
        } else if s.step == 1 || done || el - self.last_print >= 10.0 {
            eprintln!(
                "step {}/{total}: loss {:.4}, {:.0} tokens/s, ETA {:.0} s",
                s.step, s.loss, rate, eta
            );
            self.last_print = el;
        }
    }
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let device = a.device.parse::<DeviceSpec>()?.open()?;
    let shuffle = match a.shuffle.as_str() {
        "true" => true,
        "false" => false,
        s => bail!("--shuffle takes true or false, not `{s}`"),
    };
    if a.update_freq == 0 {
        bail!("--update-freq must be at least 1");
    }
    if a.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    // As torch.optim and clip_grad_norm_ reject them: no negative rate, epsilon, decay or
    // norm.
    for (flag, v) in [
        ("--lr", a.lr),
        ("--adam-eps", a.adam_eps),
        ("--weight-decay", a.weight_decay),
        ("--clip-norm", a.clip_norm),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{flag} must be a finite number, at least 0 (got {v})");
        }
    }
    if !(0.0..1.0).contains(&a.label_smoothing) {
        bail!("--label-smoothing must be in [0, 1)");
    }
    if let Some(p) = a.dropout {
        if !(0.0..1.0).contains(&p) {
            bail!("--dropout must be in [0, 1)");
        }
    }
    let task = match a.task.as_deref() {
        None => None,
        Some("mlm") => Some(Task::MaskedLm),
        Some("classify") => Some(Task::Classify),
        Some(t) => bail!("unknown --task `{t}` (mlm or classify)"),
    };
    let (mut dir, source) = open_model(a)?;
    if let Some(n) = a.num_labels {
        set_num_labels(&mut dir.config, n)?;
    }
    let tok = match &source {
        Some(d) => Tokenizer::find(d)?,
        None => None,
    };
    let net = Net::load(&dir, task, dtype, &device)?;
    if !net.params.fresh.is_empty() {
        eprintln!(
            "initialized here (not in the checkpoint): {}",
            net.params.fresh.join(", ")
        );
    }
    let task = net.task;
    let config = net.saved_config(&dir.config);
    let dropout = match a.dropout {
        Some(p) => (p, p, p),
        None => net.dropout,
    };
    let rows = read_rows(&a.train, task, tok.as_ref())?;
    let valid = a
        .valid
        .as_ref()
        .map(|p| read_rows(p, task, tok.as_ref()))
        .transpose()?;
    let per_epoch = batches(&rows, &order(rows.len(), false, 0, 0), a.max_tokens)
        .len()
        .div_ceil(a.update_freq) as u64;
    let (max_steps, epochs) = match (a.max_steps, a.epochs) {
        (Some(s), e) => (s, e.unwrap_or(u64::MAX)),
        (None, Some(e)) => (e.saturating_mul(per_epoch), e),
        (None, None) => (per_epoch, 1),
    };
    let cfg = TrainConfig {
        lr: a.lr,
        schedule: schedule(a, max_steps)?,
        optimizer: optimizer(a)?,
        clip_norm: (a.clip_norm > 0.0).then_some(a.clip_norm),
        label_smoothing: a.label_smoothing,
        dropout,
        seed: a.seed,
    };
    // Buffers of the starting checkpoint (e.g. final_logits_bias) are written back as read;
    // tensors read into parameters under other names are not.
    let mut extra = Vec::new();
    {
        let ck = &dir.checkpoint;
        let mut params: std::collections::HashSet<String> =
            net.params.state_dict()?.into_iter().map(|t| t.0).collect();
        params.extend(net.params.renamed.iter().cloned());
        let mut names: Vec<&str> = ck.names().filter(|n| !params.contains(*n)).collect();
        names.sort();
        for n in names {
            if let Some((shape, _)) = ck.info(n) {
                if let Ok(v) = ck.read_f32(n, &shape) {
                    extra.push((n.to_string(), shape, v));
                }
            }
        }
    }
    let mut tr = Trainer::new(net, cfg);
    let (mut epoch, mut skip) = (1u64, 0usize);
    if a.resume {
        if a.save_dir.join("trainer_state.json").is_file() {
            let st = tr.restore(&a.save_dir)?;
            epoch = st.get("epoch").and_then(Value::as_u64).unwrap_or(1);
            skip = st.get("batches_done").and_then(Value::as_u64).unwrap_or(0) as usize;
            eprintln!(
                "resuming from {} at update {}",
                a.save_dir.display(),
                tr.step
            );
        } else {
            eprintln!(
                "--resume: no checkpoint in {} yet, starting fresh",
                a.save_dir.display()
            );
        }
    }
    let n_params: usize = tr.net.params.list.iter().map(|p| p.value.len()).sum();
    eprintln!(
        "training {:?} ({:.1}M parameters) on {device} in {dtype}: {} rows, {per_epoch} updates per epoch",
        task,
        n_params as f64 / 1e6,
        rows.len()
    );
    let mut log = match &a.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(a.resume)
                .write(true)
                .truncate(!a.resume)
                .open(p)
                .with_context(|| p.display().to_string())?,
        ),
        None => None,
    };
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        t0: Instant::now(),
        tokens: 0,
        last_print: 0.0,
    };
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let mut valid_curve: Vec<(f64, f64)> = Vec::new();
    let save = |tr: &Trainer, epoch: u64, done: usize| -> Result<()> {
        tr.save(
            &a.save_dir,
            &config,
            &extra,
            json!({"epoch": epoch, "batches_done": done}),
        )?;
        if let Some(src) = &source {
            let t = src.join("tokenizer.json");
            if t.is_file() && src != &a.save_dir {
                let _ = std::fs::copy(&t, a.save_dir.join("tokenizer.json"));
            }
        }
        Ok(())
    };
    let run_valid = |tr: &mut Trainer, valid_curve: &mut Vec<(f64, f64)>| -> Result<()> {
        let step = tr.step;
        if let Some(v) = &valid {
            let bs = batches(v, &order(v.len(), false, 0, 0), a.max_tokens);
            let refs: Vec<Vec<Example>> = bs
                .iter()
                .map(|b| b.iter().map(|&i| v[i].clone()).collect())
                .collect();
            let slices: Vec<&[Example]> = refs.iter().map(|b| b.as_slice()).collect();
            let (loss, nll, tokens) = tr.evaluate(&slices)?;
            eprintln!(
                "valid after update {step}: loss {loss:.4}, nll {nll:.4} over {tokens} tokens"
            );
            valid_curve.push((step as f64, loss));
            let p = a.save_dir.join("valid.jsonl");
            std::fs::create_dir_all(&a.save_dir)?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)?;
            writeln!(
                f,
                "{}",
                json!({"step": step, "valid_loss": loss, "valid_nll_loss": nll, "tokens": tokens})
            )?;
        }
        Ok(())
    };
    let mut mid_epoch = None;
    'outer: while epoch <= epochs && tr.step < max_steps {
        let bs = batches(
            &rows,
            &order(rows.len(), shuffle, a.seed, epoch),
            a.max_tokens,
        );
        let mut done = skip;
        skip = 0;
        while done < bs.len() {
            if tr.step >= max_steps {
                mid_epoch = Some(done);
                break 'outer;
            }
            let group: Vec<Vec<Example>> = bs[done..(done + a.update_freq).min(bs.len())]
                .iter()
                .map(|b| b.iter().map(|&i| rows[i].clone()).collect())
                .collect();
            done += group.len();
            let slices: Vec<&[Example]> = group.iter().map(|b| b.as_slice()).collect();
            let s = tr.update(&slices)?;
            if !s.applied {
                eprintln!(
                    "update {}: f16 gradient overflow, skipped; loss scale now {}",
                    s.step, tr.loss_scale
                );
                continue;
            }
            if let Some(f) = &mut log {
                writeln!(
                    f,
                    "{}",
                    json!({"step": s.step, "loss": s.loss, "nll_loss": s.nll_loss, "lr": s.lr, "tokens": s.tokens, "grad_norm": s.grad_norm})
                )?;
            }
            curve.push((s.step as f64, s.loss));
            progress.show(&s, max_steps);
        }
        // Epoch checkpoints and validation, unless epochs are tiny (many passes over a
        // few rows), where the end of training is enough.
        let last = epoch == epochs || tr.step >= max_steps;
        if last || a.epochs.is_some() || per_epoch >= 20 {
            run_valid(&mut tr, &mut valid_curve)?;
            save(&tr, epoch + 1, 0)?;
        }
        epoch += 1;
    }
    if let Some(done) = mid_epoch {
        // Stopped inside an epoch: the checkpoint records where, for --resume.
        run_valid(&mut tr, &mut valid_curve)?;
        save(&tr, epoch, done)?;
    }
    if valid_curve.is_empty() {
        run_valid(&mut tr, &mut valid_curve)?;
    }
    std::fs::create_dir_all(&a.save_dir)?;
    let png = a.save_dir.join("loss.png");
    plot::loss_curve(
        &png,
        &[(&curve, [31, 119, 180]), (&valid_curve, [214, 39, 40])],
    )
    .with_context(|| png.display().to_string())?;
    eprintln!(
        "saved {} after {} updates (loss curve: {})",
        a.save_dir.display(),
        tr.step,
        png.display()
    );
    Ok(())
}
