//! Models against Hugging Face: every fixture in tests/fixtures (made by
//! scripts/make_fixtures.py with float64 references, each sequence run alone) on the CPU in
//! f32, and on the GPU in every dtype when one is present.

mod common;

use common::{fixtures_dir, gpu, rel_err};
use lightseq::io::safetensors::SafeTensorsFile;
use lightseq::io::ModelDir;
use lightseq::models::{self, Batch};
use lightseq::{DType, Device};
use std::path::Path;

fn fixtures() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    v.sort();
    assert!(
        v.len() >= 5,
        "fixtures missing: run scripts/make_fixtures.py"
    );
    v
}

fn batch(dir: &Path) -> Batch {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input.json")).unwrap()).unwrap();
    Batch {
        input_ids: serde_json::from_value(v["input_ids"].clone()).unwrap(),
        token_type_ids: v
            .get("token_type_ids")
            .map(|t| serde_json::from_value(t.clone()).unwrap()),
    }
}

fn check(dir: &Path, dtype: DType, device: &Device, tol: f64) {
    let md = ModelDir::open(dir).unwrap();
    let model = models::load(&md, dtype, device).unwrap();
    let b = batch(dir);
    let out = model.forward(&b).unwrap();
    let (shape, want) = SafeTensorsFile::open(&dir.join("reference.safetensors"))
        .unwrap()
        .read_f32(out.name)
        .unwrap();
    assert_eq!(shape, out.shape.to_vec(), "{}", dir.display());
    let err = rel_err(&out.data, &want);
    eprintln!(
        "{:<20} {device:<8} {dtype:<5} rel err {err:.2e}",
        dir.file_name().unwrap().to_string_lossy()
    );
    assert!(
        err <= tol,
        "{} on {device} in {dtype}: rel err {err} > {tol}",
        dir.display()
    );
}

#[test]
fn cpu_f32_matches_hf_float64() {
    for dir in fixtures() {
        check(&dir, DType::F32, &Device::Cpu, 1e-4);
    }
}

#[test]
fn batched_rows_equal_each_sequence_alone() {
    for dir in fixtures() {
        let md = ModelDir::open(&dir).unwrap();
        let model = models::load(&md, DType::F32, &Device::Cpu).unwrap();
        let b = batch(&dir);
        let all = model.forward(&b).unwrap();
        let [_, len, width] = all.shape;
        for i in 0..b.input_ids.len() {
            let one = Batch {
                input_ids: vec![b.input_ids[i].clone()],
                token_type_ids: b.token_type_ids.as_ref().map(|t| vec![t[i].clone()]),
            };
            let o = model.forward(&one).unwrap();
            let n = b.input_ids[i].len();
            let row = &all.data[i * len * width..(i * len + n) * width];
            let err = rel_err(row, &o.data[..n * width]);
            assert!(err < 1e-6, "{} sequence {i}: {err}", dir.display());
        }
    }
}

#[test]
fn empty_batch_gives_empty_output() {
    let dir = fixtures_dir().join("bert");
    let md = ModelDir::open(&dir).unwrap();
    let model = models::load(&md, DType::F32, &Device::Cpu).unwrap();
    let out = model.forward(&Batch::default()).unwrap();
    assert_eq!(out.shape[..2], [0, 0]);
    assert!(out.data.is_empty());
}

#[test]
fn gpu_matches_hf_in_every_dtype() {
    let Some(dev) = gpu("gpu_matches_hf_in_every_dtype") else {
        return;
    };
    for dir in fixtures() {
        for (dt, tol) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 3e-2)] {
            check(&dir, dt, &dev, tol);
        }
    }
}
