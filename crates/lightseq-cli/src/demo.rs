//! `lightseq demo`: parity with the Hugging Face outputs stored beside the embedded fixture
//! models, tokens/s of a BERT-base-sized encoder on the device found, then a small
//! Transformer trained from scratch (`demo_train`).

use anyhow::{bail, Result};
use lightseq::io::safetensors::{Bytes, SafeTensorsFile};
use lightseq::io::ModelDir;
use lightseq::models::{self, presets, Batch};
use lightseq::{DType, DeviceSpec};
use std::path::PathBuf;
use std::time::Instant;

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/",
                $name,
                "/config.json"
            )),
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/",
                $name,
                "/model.safetensors"
            ))
            .as_slice(),
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/",
                $name,
                "/input.json"
            )),
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/",
                $name,
                "/reference.safetensors"
            ))
            .as_slice(),
        )
    };
}

type Fixture = (
    &'static str,
    &'static str,
    &'static [u8],
    &'static str,
    &'static [u8],
);

const FIXTURES: [Fixture; 6] = [
    fixture!("bert"),
    fixture!("bert_cls_types"),
    fixture!("gpt2"),
    fixture!("gpt2_base_model"),
    fixture!("bart"),
    fixture!("t5"),
];

/// HF `generate` references for the embedded generative fixtures.
const GENERATION: [(&str, &str); 3] = [
    (
        "gpt2",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/generation/gpt2.json"
        )),
    ),
    (
        "bart",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/generation/bart.json"
        )),
    ),
    (
        "t5",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/generation/t5.json"
        )),
    ),
];

fn generation_parity(device: &lightseq::Device) -> Result<usize> {
    use lightseq::generate::{generate, GenerationOptions, Inputs};
    println!("\nGeneration against HF generate (all prompts in one ragged batch, f32):");
    let mut failed = 0;
    for (name, refs) in GENERATION {
        let (_, config, weights, _, _) = FIXTURES.iter().find(|f| f.0 == name).copied().unwrap();
        let dir = ModelDir::from_static(name, config, weights)?;
        let model = models::load_decoder(&dir, DType::F32, device)?;
        let defaults = GenerationOptions::from_json(&dir.config);
        let refs: serde_json::Value = serde_json::from_str(refs)?;
        let prompts: Vec<Vec<i64>> = serde_json::from_value(refs["prompts"].clone())?;
        let mut exact = 0;
        let cases = refs["cases"].as_array().unwrap();
        for case in cases {
            let opts = GenerationOptions::from_json(&case["options"]).or(&defaults);
            let out = generate(model.as_ref(), Inputs::Ids(&prompts), &opts)?;
            let got: Vec<Vec<Vec<i64>>> = out
                .iter()
                .map(|h| h.iter().map(|x| x.tokens.clone()).collect())
                .collect();
            let want: Vec<Vec<Vec<i64>>> = serde_json::from_value(case["sequences"].clone())?;
            exact += usize::from(got == want);
        }
        failed += cases.len() - exact;
        println!(
            "  {name:<6} {exact}/{} option sets token-exact (greedy, repetition penalty, no-repeat n-grams, beam search with length penalties and early stopping)",
            cases.len()
        );
    }
    Ok(failed)
}

fn rel_err(out: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn run(device: &str, train_steps: u64) -> Result<()> {
    let device = device.parse::<DeviceSpec>()?.open()?;
    println!("lightseq demo on {device}\n");
    println!("Parity with Hugging Face transformers (float64 reference, ragged batches):");
    println!(
        "  {:<18} {:<6} {:>8} {:>12} {:>10}",
        "model", "dtype", "tokens", "rel. error", "limit"
    );
    let mut failed = 0;
    let dtypes: &[(DType, f64)] = if device.is_cuda() {
        &[(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 3e-2)]
    } else {
        &[(DType::F32, 1e-4)]
    };
    for (name, config, weights, input, reference) in FIXTURES {
        let dir = ModelDir::from_static(name, config, weights)?;
        let batch = Batch::from_json(&serde_json::from_str(input)?)?;
        let refs = SafeTensorsFile::parse(PathBuf::from(name), Bytes::Static(reference))?;
        for &(dtype, limit) in dtypes {
            let model = models::load(&dir, dtype, &device)?;
            let out = model.forward(&batch)?;
            let (_, want) = refs.read_f32(out.name)?;
            let err = rel_err(&out.data, &want);
            let ok = err <= limit;
            failed += usize::from(!ok);
            let tokens: usize = batch.input_ids.iter().map(Vec::len).sum();
            println!(
                "  {name:<18} {:<6} {tokens:>8} {err:>12.2e} {limit:>10.0e}  {}",
                dtype.name(),
                if ok { "ok" } else { "MISMATCH" }
            );
        }
    }

    failed += generation_parity(&device)?;

    let (batch, seq, iters) = if device.is_cuda() {
        (32, 128, 20)
    } else {
        (4, 128, 1)
    };
    let dtype = if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    };
    println!(
        "\nThroughput: BERT-base shapes (seeded random weights), batch {batch} x {seq}, {dtype}:"
    );
    let dir = ModelDir::random("bert-base", presets::config("bert-base").unwrap(), 0);
    let model = models::load(&dir, dtype, &device)?;
    let ids: Vec<Vec<i64>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|i| ((b * 7919 + i * 104729) % 30000) as i64 + 100)
                .collect()
        })
        .collect();
    let batch_in = Batch {
        input_ids: ids,
        ..Default::default()
    };
    model.forward(&batch_in)?; // warm-up: kernel load, allocator
    let t = Instant::now();
    for _ in 0..iters {
        model.forward(&batch_in)?;
    }
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    println!(
        "  {:.1} ms per forward, {:.0} tokens/s on {device}",
        secs * 1e3,
        (batch * seq) as f64 / secs
    );
    if failed > 0 {
        bail!("{failed} parity check(s) failed");
    }
    println!("\nAll parity checks passed.");
    if train_steps > 0 {
        let acc = crate::demo_train::run(&device, train_steps)?;
        if acc < 0.95 {
            bail!(
                "the trained model reached {:.1}% exact match, below 95%",
                acc * 100.0
            );
        }
    }
    Ok(())
}
