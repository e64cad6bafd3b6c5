//! Training against PyTorch: 15 full-batch AdamW updates of the GPT2, Marian and BART
//! fixtures log, at every step, the loss HF transformers + torch.optim give (float64) within
//! 1e-4 relative, with label smoothing and clipping on and off (tests/fixtures/train, from
//! scripts/make_train_fixtures.py). On the CPU always; on the GPU in f32 when one is there.

mod common;

use common::{fixtures_dir, gpu, ids};
use lightseq::io::ModelDir;
use lightseq::train::models::{Example, Net};
use lightseq::train::optim::{AdamConfig, Kind, Schedule};
use lightseq::train::trainer::{TrainConfig, Trainer};
use lightseq::{DType, Device};
use serde_json::Value;

fn curve(name: &str, device: &Device) {
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join(format!("train/{name}.json"))).unwrap(),
    )
    .unwrap();
    let rows: Vec<Example> = refs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r.get("src") {
            Some(src) => Example::Seq2Seq {
                src: ids(src),
                tgt: ids(&r["tgt"]),
            },
            None => Example::Causal { ids: ids(r) },
        })
        .collect();
    let optimizer = AdamConfig {
        kind: Kind::AdamW,
        beta1: refs["betas"][0].as_f64().unwrap(),
        beta2: refs["betas"][1].as_f64().unwrap(),
        eps: refs["eps"].as_f64().unwrap(),
        weight_decay: refs["weight_decay"].as_f64().unwrap(),
    };
    for case in refs["cases"].as_array().unwrap() {
        let dir = ModelDir::open(&fixtures_dir().join(name)).unwrap();
        let net = Net::load(&dir, None, DType::F32, device).unwrap();
        let ls = case["label_smoothing"].as_f64().unwrap();
        let clip = case["clip_norm"].as_f64();
        let mut tr = Trainer::new(
            net,
            TrainConfig {
                lr: refs["lr"].as_f64().unwrap(),
                schedule: Schedule::Constant,
                optimizer,
                clip_norm: clip,
                label_smoothing: ls,
                dropout: (0.0, 0.0, 0.0),
                seed: 1,
            },
        );
        for (i, want) in case["steps"].as_array().unwrap().iter().enumerate() {
            let s = tr.update(&[&rows]).unwrap();
            let (wl, wn) = (
                want["loss"].as_f64().unwrap(),
                want["grad_norm"].as_f64().unwrap(),
            );
            let el = ((s.loss - wl) / wl).abs();
            let en = ((s.grad_norm - wn) / wn).abs();
            eprintln!(
                "{name} ls {ls} clip {clip:?} step {}: loss {:.7} (torch {wl:.7}, rel {el:.1e}), grad norm {:.6} (torch {wn:.6})",
                i + 1,
                s.loss,
                s.grad_norm
            );
            assert!(
                el <= 1e-4,
                "{name} step {}: loss {} vs torch {wl}",
                i + 1,
                s.loss
            );
            assert!(
                en <= 1e-3,
                "{name} step {}: grad norm {} vs torch {wn}",
                i + 1,
                s.grad_norm
            );
        }
    }
}

#[test]
fn loss_curves_match_pytorch_on_cpu() {
    for name in ["gpt2", "marian", "bart"] {
        curve(name, &Device::Cpu);
    }
}

#[test]
fn loss_curves_match_pytorch_on_gpu() {
    let Some(dev) = gpu("loss_curves_match_pytorch_on_gpu") else {
        return;
    };
    for name in ["gpt2", "marian", "bart"] {
        curve(name, &dev);
    }
}
