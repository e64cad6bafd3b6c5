//! Generation against HF `generate`: the references in tests/fixtures/generation (made by
//! scripts/make_generation_fixtures.py, each prompt generated alone by HF in float64) must
//! be reproduced token for token with all prompts of a case in one ragged batch, scores
//! within 1e-3.

mod common;

use common::{fixtures_dir, gpu};
use lightseq::generate::{generate, GenerationOptions, Inputs};
use lightseq::io::ModelDir;
use lightseq::models;
use lightseq::{DType, Device};

fn cases() -> Vec<serde_json::Value> {
    let dir = fixtures_dir().join("generation");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "generation fixtures missing: run scripts/make_generation_fixtures.py"
    );
    files
        .iter()
        .map(|f| serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
        .collect()
}

fn check_model(fixture: &serde_json::Value, device: &Device) -> Vec<Vec<Vec<Vec<i64>>>> {
    let name = fixture["model"].as_str().unwrap();
    let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
    let model = models::load_decoder(&md, DType::F32, device).unwrap();
    // The model directory's generation defaults apply under each case's options, as in HF.
    let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
    let prompts: Vec<Vec<i64>> = serde_json::from_value(fixture["prompts"].clone()).unwrap();
    let mut all = Vec::new();
    for (ci, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let opts = GenerationOptions::from_json(&case["options"]).or(&defaults);
        let out = generate(model.as_ref(), Inputs::Ids(&prompts), &opts).unwrap();
        let want: Vec<Vec<Vec<i64>>> = serde_json::from_value(case["sequences"].clone()).unwrap();
        let want_scores: Vec<Vec<f64>> = serde_json::from_value(case["scores"].clone()).unwrap();
        let got: Vec<Vec<Vec<i64>>> = out
            .iter()
            .map(|h| h.iter().map(|x| x.tokens.clone()).collect())
            .collect();
        assert_eq!(
            got, want,
            "{name} case {ci} {}: sequences differ",
            case["options"]
        );
        for (p, (hs, ws)) in out.iter().zip(&want_scores).enumerate() {
            for (h, w) in hs.iter().zip(ws) {
                assert!(
                    (h.score as f64 - w).abs() <= 1e-3,
                    "{name} case {ci} prompt {p}: score {} vs HF {w}",
                    h.score
                );
            }
        }
        all.push(got);
    }
    eprintln!(
        "{name}: {} cases token-exact on {device}",
        fixture["cases"].as_array().unwrap().len()
    );
    all
}

#[test]
fn cpu_generation_matches_hf_generate() {
    for f in cases() {
        check_model(&f, &Device::Cpu);
    }
}

#[test]
fn gpu_generation_gives_the_cpu_tokens() {
    let Some(dev) = gpu("gpu_generation_gives_the_cpu_tokens") else {
        return;
    };
    for f in cases() {
        // Same references as the CPU: tokens must agree exactly in f32.
        check_model(&f, &dev);
    }
}
