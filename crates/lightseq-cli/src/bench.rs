//! `lightseq bench`: times a forward pass or a generation on a model directory or a preset
//! of real shapes with seeded random weights; prints a table and optionally JSON.

use anyhow::{bail, Context, Result};
use clap::Args;
use lightseq::generate::{generate, GenerationOptions, Inputs};
use lightseq::io::ModelDir;
use lightseq::models::{self, presets, Batch};
use lightseq::train::models::{Example, Net, Task};
use lightseq::train::optim::{AdamConfig, Kind, Schedule};
use lightseq::train::trainer::{TrainConfig, Trainer};
use lightseq::{DType, Device, DeviceSpec};
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lightseq bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model directory (or use --preset).
    pub model_dir: Option<PathBuf>,
    /// bert-base, gpt2, transformer-base, transformer-big or bart-base (seeded random weights).
    #[arg(long)]
    pub preset: Option<String>,
    /// forward, generate or train (one update per iteration: forward, backward, AdamW;
    /// seq2seq rows with source and target of --seq tokens, causal-LM rows, or BERT
    /// masked-LM rows with 15% of positions predicted).
    #[arg(long, default_value = "forward")]
    pub task: String,
    /// Batch sizes, comma-separated (every combination with --seq is timed).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub batch: Vec<usize>,
    /// Input lengths (prompt or source tokens), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub seq: Vec<usize>,
    /// Generate as many tokens as the input has (overrides --max-new-tokens).
    #[arg(long)]
    pub new_tokens_like_seq: bool,
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Generated tokens per sequence (min = max, so every system does the same work).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    #[arg(long)]
    pub do_sample: Option<bool>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub temperature: Option<f32>,
    /// End-of-sequence ids, comma-separated, in place of the model's (a preset may have
    /// none). With min = max new tokens they are masked at every step, as a
    /// `min_new_tokens` masks them.
    #[arg(long, value_delimiter = ',')]
    pub eos_token_id: Option<Vec<i64>>,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse()?;
    let device = a.device.parse::<DeviceSpec>()?.open()?;
    let (name, dir) = match (&a.model_dir, &a.preset) {
        (Some(d), None) => (d.display().to_string(), ModelDir::open(d)?),
        (None, Some(p)) => {
            let cfg = presets::config(p).with_context(|| {
                format!(
                    "unknown preset `{p}` (known: {})",
                    presets::NAMES.join(", ")
                )
            })?;
            (p.clone(), ModelDir::random(p, cfg, 0))
        }
        _ => bail!("give a model directory or --preset"),
    };
    if a.iters == 0 || a.batch.contains(&0) || a.seq.contains(&0) {
        bail!("--iters, --batch and --seq must be positive");
    }
    let t_load = Instant::now();
    let runner = match a.task.as_str() {
        "forward" => Runner::Forward(models::load(&dir, dtype, &device)?),
        "generate" => Runner::Generate(models::load_decoder(&dir, dtype, &device)?),
        "train" => Runner::Train(Box::new(std::cell::RefCell::new(trainer(
            &dir, dtype, &device,
        )?))),
        other => bail!("unknown task `{other}` (forward, generate or train)"),
    };
    let loaded_mb = match &device {
        Device::Cuda(d) => d.memory_in_use()? as f64 / (1 << 20) as f64,
        Device::Cpu => 0.0,
    };
    eprintln!(
        "loaded {name} in {:.1} s ({loaded_mb:.0} MiB on the device)",
        t_load.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    for &batch in &a.batch {
        for &seq in &a.seq {
            results.push(point(
                a, &name, &dir, &device, dtype, &runner, batch, seq, loaded_mb,
            )?);
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string(&results)?)
            .with_context(|| p.display().to_string())?;
    }
    Ok(())
}

enum Runner {
    Forward(Box<dyn models::Model>),
    Generate(Box<dyn models::decode::Decoder>),
    Train(Box<std::cell::RefCell<Trainer>>),
}

fn trainer(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Trainer> {
    let net = Net::load(dir, Some(Task::MaskedLm), dtype, device)?;
    Ok(Trainer::new(
        net,
        TrainConfig {
            lr: 1e-4,
            schedule: Schedule::Constant,
            optimizer: AdamConfig {
                kind: Kind::AdamW,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-8,
                weight_decay: 0.01,
            },
            clip_norm: Some(1.0),
            label_smoothing: 0.1,
            dropout: (0.0, 0.0, 0.0),
            seed: 1,
        },
    ))
}

/// Times one (batch, seq) point and prints its row.
#[allow(clippy::too_many_arguments)]
fn point(
    a: &BenchArgs,
    name: &str,
    dir: &ModelDir,
    device: &Device,
    dtype: DType,
    runner: &Runner,
    batch: usize,
    seq: usize,
    loaded_mb: f64,
) -> Result<serde_json::Value> {
    let vocab = dir
        .config
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(1000) as i64;
    let ids: Vec<Vec<i64>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|i| ((b * 7919 + i * 104729 + 13) as i64 % (vocab - 10)) + 5)
                .collect()
        })
        .collect();
    let peak = |reset: bool| -> Result<u64> {
        match device {
            Device::Cuda(d) => Ok(d.peak_memory(reset)?),
            Device::Cpu => Ok(0),
        }
    };
    let new_tokens = if a.new_tokens_like_seq {
        seq
    } else {
        a.max_new_tokens
    };
    let (once, tokens): (Box<dyn Fn() -> Result<()>>, usize) = match runner {
        Runner::Forward(model) => {
            let b = Batch {
                input_ids: ids.clone(),
                decoder_input_ids: Some(ids.clone()),
                ..Default::default()
            };
            (
                Box::new(move || {
                    match model.forward_on_device(&b) {
                        Some(r) => drop(r?),
                        None => drop(model.forward(&b)?),
                    }
                    device.synchronize()?;
                    Ok(())
                }),
                batch * seq,
            )
        }
        Runner::Train(tr) => {
            let task = tr.borrow().net.task;
            let rows: Vec<Example> = ids
                .iter()
                .enumerate()
                .map(|(b, r)| match task {
                    Task::Seq2Seq => Example::Seq2Seq {
                        src: r.clone(),
                        tgt: r.iter().rev().copied().collect(),
                    },
                    Task::CausalLm => Example::Causal {
                        ids: r.iter().copied().chain([r[0]]).collect(),
                    },
                    _ => Example::Masked {
                        ids: r.clone(),
                        labels: r
                            .iter()
                            .enumerate()
                            .map(|(i, &t)| if (b + i) % 7 == 0 { t } else { -100 })
                            .collect(),
                    },
                })
                .collect();
            (
                Box::new(move || {
                    let s = tr.borrow_mut().update(&[&rows])?;
                    if !s.applied {
                        eprintln!(
                            "f16 overflow at update {}, loss scale {}",
                            s.step, s.loss_scale
                        );
                    }
                    device.synchronize()?;
                    Ok(())
                }),
                batch * seq,
            )
        }
        Runner::Generate(model) => {
            let defaults = GenerationOptions::from_json(&dir.config);
            let opts = GenerationOptions {
                max_new_tokens: Some(new_tokens),
                min_new_tokens: Some(new_tokens),
                num_beams: Some(a.num_beams),
                do_sample: a.do_sample,
                top_k: a.top_k,
                top_p: a.top_p,
                temperature: a.temperature,
                eos_token_id: a.eos_token_id.clone(),
                seed: Some(0),
                ..Default::default()
            }
            .or(&defaults);
            (
                Box::new(move || {
                    generate(model.as_ref(), Inputs::Ids(&ids), &opts)?;
                    device.synchronize()?;
                    Ok(())
                }),
                batch * new_tokens,
            )
        }
    };
    for _ in 0..a.warmup {
        once()?;
    }
    peak(true)?;
    let mut times = Vec::new();
    for _ in 0..a.iters {
        let s = Instant::now();
        once()?;
        times.push(s.elapsed().as_secs_f64());
    }
    let med = median(times.clone());
    let peak_mb = peak(false)? as f64 / (1 << 20) as f64;
    println!(
        "{name:<18} {:<8} batch {batch:>3} seq {seq:>4} new {new_tokens:>4} beams {} {:<4} on {device}: median {:.2} ms, {:.0} tokens/s, peak {:.0} MiB",
        a.task, a.num_beams, dtype, med * 1e3, tokens as f64 / med, peak_mb
    );
    Ok(serde_json::json!({
        "model": name, "task": a.task, "batch": batch, "seq": seq, "new_tokens": new_tokens,
        "dtype": dtype.name(), "num_beams": a.num_beams, "device": device.to_string(),
        "median_ms": med * 1e3, "times_ms": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
        "tokens_per_s": tokens as f64 / med, "peak_mem_mb": peak_mb,
        "loaded_mem_mb": loaded_mb,
    }))
}
