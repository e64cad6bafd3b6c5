//! Training against PyTorch: 15 full-batch AdamW steps of the GPT2 fixture, loss of every
//! step within 1e-4 relative of HF transformers + torch.optim (tests/fixtures/train, from
//! scripts/make_train_fixtures.py), with label smoothing and clipping on and off.

mod common;

use common::fixtures_dir;
use lightseq::io::ModelDir;
use lightseq::train::gpt2::Gpt2Trainer;
use lightseq::train::optim::{AdamConfig, Kind};

#[test]
fn gpt2_loss_curve_matches_pytorch() {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("train/gpt2.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<Vec<i64>> = serde_json::from_value(refs["rows"].clone()).unwrap();
    let opt = AdamConfig {
        kind: Kind::AdamW,
        beta1: refs["betas"][0].as_f64().unwrap(),
        beta2: refs["betas"][1].as_f64().unwrap(),
        eps: refs["eps"].as_f64().unwrap(),
        weight_decay: refs["weight_decay"].as_f64().unwrap(),
    };
    let lr = refs["lr"].as_f64().unwrap();
    for case in refs["cases"].as_array().unwrap() {
        let dir = ModelDir::open(&fixtures_dir().join("gpt2")).unwrap();
        let mut tr = Gpt2Trainer::load(&dir).unwrap();
        let ls = case["label_smoothing"].as_f64().unwrap();
        let clip = case["clip_norm"].as_f64();
        for (i, want) in case["steps"].as_array().unwrap().iter().enumerate() {
            let s = tr.step(&rows, ls, clip, &opt, lr).unwrap();
            let (wl, wn) = (
                want["loss"].as_f64().unwrap(),
                want["grad_norm"].as_f64().unwrap(),
            );
            let el = ((s.loss - wl) / wl).abs();
            let en = ((s.grad_norm - wn) / wn).abs();
            eprintln!("ls {ls} clip {clip:?} step {}: loss {:.6} (torch {wl:.6}, rel {el:.1e}), grad norm {:.5} (torch {wn:.5})", i + 1, s.loss, s.grad_norm);
            assert!(el <= 1e-4, "step {}: loss {} vs torch {wl}", i + 1, s.loss);
            assert!(
                en <= 1e-3,
                "step {}: grad norm {} vs torch {wn}",
                i + 1,
                s.grad_norm
            );
        }
    }
}
