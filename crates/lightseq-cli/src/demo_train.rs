//! The training part of `lightseq demo`: a small Transformer (Marian layout, 2+2 layers,
//! d 64) learns from scratch to reverse sequences of symbols, then beam search runs on
//! held-out sequences it never saw and the exact-match accuracy is reported.

use anyhow::Result;
use lightseq::generate::{generate, GenerationOptions, Inputs};
use lightseq::io::ModelDir;
use lightseq::models;
use lightseq::train::models::{Example, Net};
use lightseq::train::optim::{AdamConfig, Kind, Schedule};
use lightseq::train::trainer::{TrainConfig, Trainer};
use lightseq::{DType, Device};
use serde_json::json;
use std::time::Instant;

const EOS: i64 = 0;
const PAD: i64 = 1;
const SYMBOLS: i64 = 14; // ids 2..=15
const MIN_LEN: usize = 3;
const MAX_LEN: usize = 12;

/// SplitMix64: the demo's data comes from a fixed seed, so every run sees the same task.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn sequence(rng: &mut Rng) -> Vec<i64> {
    let n = MIN_LEN + rng.below((MAX_LEN - MIN_LEN + 1) as u64) as usize;
    (0..n)
        .map(|_| 2 + rng.below(SYMBOLS as u64) as i64)
        .collect()
}

fn config() -> serde_json::Value {
    json!({
        "model_type": "marian", "architectures": ["MarianMTModel"],
        "vocab_size": 2 + SYMBOLS, "decoder_vocab_size": 2 + SYMBOLS, "d_model": 64,
        "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_ffn_dim": 256, "decoder_ffn_dim": 256, "activation_function": "relu",
        "scale_embedding": true, "max_position_embeddings": 64,
        "pad_token_id": PAD, "decoder_start_token_id": PAD, "eos_token_id": EOS,
        "forced_eos_token_id": EOS, "share_encoder_decoder_embeddings": true,
        "tie_word_embeddings": true, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "num_beams": 4, "max_length": MAX_LEN + 2
    })
}

/// Trains for `steps` updates on `device`; prints progress, beam-search samples and the
/// held-out exact-match accuracy, which it returns.
pub fn run(device: &Device, steps: u64) -> Result<f64> {
    println!(
        "\nTraining: a Transformer (Marian layout, 2+2 layers, d 64) learns to reverse sequences of {MIN_LEN}-{MAX_LEN} symbols, from scratch, {steps} updates on {device}:"
    );
    let mut rng = Rng(2024);
    let held_out: Vec<Vec<i64>> = (0..200).map(|_| sequence(&mut rng)).collect();
    let seen: std::collections::HashSet<Vec<i64>> = held_out.iter().cloned().collect();
    let mut train = Vec::new();
    while train.len() < 20_000 {
        let s = sequence(&mut rng);
        if !seen.contains(&s) {
            train.push(s);
        }
    }
    let example = |s: &Vec<i64>| Example::Seq2Seq {
        src: s.iter().copied().chain([EOS]).collect(),
        tgt: s.iter().rev().copied().chain([EOS]).collect(),
    };
    let dir = ModelDir::random("demo-transformer", config(), 7);
    let net = Net::load(&dir, None, DType::F32, device)?;
    let mut tr = Trainer::new(
        net,
        TrainConfig {
            lr: 3e-3,
            schedule: Schedule::InverseSqrt { warmup: 50 },
            optimizer: AdamConfig {
                kind: Kind::AdamW,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            clip_norm: Some(1.0),
            label_smoothing: 0.1,
            dropout: (0.0, 0.0, 0.0),
            seed: 1,
        },
    );
    let batch = 80;
    let t0 = Instant::now();
    let mut tokens = 0;
    for step in 1..=steps {
        let start = ((step - 1) as usize * batch) % train.len();
        let rows: Vec<Example> = train[start..(start + batch).min(train.len())]
            .iter()
            .map(example)
            .collect();
        let s = tr.update(&[&rows])?;
        tokens += s.tokens;
        if step % 100 == 0 || step == steps {
            let el = t0.elapsed().as_secs_f64();
            println!(
                "  update {step:>4}/{steps}: loss {:.4} (nll {:.4}), {:.0} target tokens/s, {:.0} s",
                s.loss,
                s.nll_loss,
                tokens as f64 / el,
                el
            );
        }
    }
    // Through an HF model directory, as a user would: save, load for inference, generate.
    let out = std::env::temp_dir().join(format!("lightseq-demo-{}", std::process::id()));
    tr.save(&out, &dir.config, &Vec::new(), json!({}))?;
    let model = models::load_decoder(&ModelDir::open(&out)?, DType::F32, device)?;
    let _ = std::fs::remove_dir_all(&out);
    let sources: Vec<Vec<i64>> = held_out
        .iter()
        .map(|s| s.iter().copied().chain([EOS]).collect())
        .collect();
    let opts = GenerationOptions {
        num_beams: Some(4),
        max_new_tokens: Some(MAX_LEN + 2),
        ..Default::default()
    }
    .or(&GenerationOptions::from_json(&dir.config));
    let hyps = generate(model.as_ref(), Inputs::Ids(&sources), &opts)?;
    let mut exact = 0;
    for (i, (s, h)) in held_out.iter().zip(&hyps).enumerate() {
        let got: Vec<i64> = h[0]
            .tokens
            .iter()
            .skip(1)
            .copied()
            .take_while(|&t| t != EOS && t != PAD)
            .collect();
        let want: Vec<i64> = s.iter().rev().copied().collect();
        exact += usize::from(got == want);
        if i < 5 {
            let show = |v: &[i64]| {
                v.iter()
                    .map(|&t| char::from(b'a' + (t - 2) as u8).to_string())
                    .collect::<String>()
            };
            println!(
                "  {:<14} -> {:<14} {}",
                show(s),
                show(&got),
                if got == want { "ok" } else { "wrong" }
            );
        }
    }
    let acc = exact as f64 / held_out.len() as f64;
    println!(
        "  beam search (4 beams) on {} held-out sequences: {:.1}% exact match",
        held_out.len(),
        acc * 100.0
    );
    Ok(acc)
}
