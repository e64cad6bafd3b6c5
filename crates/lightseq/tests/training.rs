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

/// Fine-tuning a task the checkpoint has no head for, as HF's from_pretrained does: a bare
/// BertModel (no `bert.` prefix, no heads) loads as a masked LM with its encoder read from
/// the unprefixed names and a fresh MLM head (matrices N(0, initializer_range), norm scales
/// 1, biases 0). Saved under the task model's names, the same weights load again with
/// nothing fresh and give the same loss and gradients; a masked-LM checkpoint loads as a
/// classifier with a fresh pooler and classifier.
#[test]
fn fine_tuning_initializes_the_heads_a_checkpoint_lacks() {
    let cpu = Device::Cpu;
    let bare = ModelDir::open(&fixtures_dir().join("bert")).unwrap();
    let mlm = Some(lightseq::train::models::Task::MaskedLm);
    let mut a = Net::load(&bare, mlm, DType::F32, &cpu).unwrap();
    let head = [
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.bias",
    ];
    assert_eq!(a.params.fresh, head);
    assert!(a
        .params
        .renamed
        .iter()
        .any(|n| n == "embeddings.word_embeddings.weight"));
    let sd = a.params.state_dict().unwrap();
    let get = |name: &str| &sd.iter().find(|t| t.0 == name).unwrap().2;
    let std = bare.config["initializer_range"].as_f64().unwrap_or(0.02);
    let w = get(head[0]);
    let rms = (w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!(
        (rms / std - 1.0).abs() < 0.15,
        "fresh dense rms {rms} for std {std}"
    );
    assert!(get(head[2]).iter().all(|&x| x == 1.0));
    for b in [head[1], head[3], head[4]] {
        assert!(get(b).iter().all(|&x| x == 0.0), "{b}");
    }
    // The encoder is the checkpoint's, read from its unprefixed names.
    let dim = |k: &str| bare.config[k].as_u64().unwrap() as usize;
    let emb = bare
        .checkpoint
        .read_f32(
            "embeddings.word_embeddings.weight",
            &[dim("vocab_size"), dim("hidden_size")],
        )
        .unwrap();
    assert_eq!(get("bert.embeddings.word_embeddings.weight"), &emb);
    assert!(sd
        .iter()
        .all(|t| t.0.starts_with("bert.") || t.0.starts_with("cls.")));

    // Saved under the task model's names, it loads with nothing fresh or renamed.
    let dir = std::env::temp_dir().join(format!("lightseq-fresh-heads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tensors: Vec<(&str, &[usize], &[f32])> = sd
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    lightseq::io::safetensors::write_f32(&dir.join("model.safetensors"), &tensors).unwrap();
    let mut config = bare.config.clone();
    config["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let saved = ModelDir::open(&dir).unwrap();
    let mut b = Net::load(&saved, None, DType::F32, &cpu).unwrap();
    assert!(b.params.fresh.is_empty() && b.params.renamed.is_empty());
    let rows = vec![Example::Masked {
        ids: vec![2, 15, 40, 7, 63, 3],
        labels: vec![-100, 21, -100, 9, -100, -100],
    }];
    let off = lightseq::train::layers::Dropout::off;
    let (sa, sb) = (
        a.accumulate_grads(&rows, 0.0, 1.0, &off()).unwrap(),
        b.accumulate_grads(&rows, 0.0, 1.0, &off()).unwrap(),
    );
    assert!(sa.loss_sum.is_finite() && sa.tokens == 2);
    assert_eq!(sa.loss_sum, sb.loss_sum);
    let (ga, gb) = (a.params.grad_dict().unwrap(), b.params.grad_dict().unwrap());
    assert_eq!(ga, gb);
    std::fs::remove_dir_all(&dir).ok();

    // A masked LM's checkpoint as a classifier: pooler and classifier start fresh.
    let mlm_dir = ModelDir::open(&fixtures_dir().join("bert_mlm_sharded")).unwrap();
    let classify = Some(lightseq::train::models::Task::Classify);
    let c = Net::load(&mlm_dir, classify, DType::F32, &cpu).unwrap();
    assert_eq!(
        c.params.fresh,
        [
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "classifier.weight",
            "classifier.bias"
        ]
    );
    assert_eq!(
        c.saved_config(&mlm_dir.config)["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
}
