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
    let json = dir.join("input.json");
    if json.is_file() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        return Batch::from_json(&v).unwrap();
    }
    let (shape, values) = SafeTensorsFile::open(&dir.join("input.safetensors"))
        .unwrap()
        .read_f32("pixel_values")
        .unwrap();
    Batch {
        pixel_values: Some((shape, values)),
        ..Default::default()
    }
}

/// Sequence i of a batch as a batch of one.
fn row(b: &Batch, i: usize) -> Batch {
    let pick = |v: &Option<Vec<Vec<i64>>>| v.as_ref().map(|t| vec![t[i].clone()]);
    Batch {
        input_ids: if b.input_ids.is_empty() {
            vec![]
        } else {
            vec![b.input_ids[i].clone()]
        },
        token_type_ids: pick(&b.token_type_ids),
        decoder_input_ids: pick(&b.decoder_input_ids),
        pixel_values: b.pixel_values.as_ref().map(|(s, v)| {
            let per = v.len() / s[0];
            (
                vec![1, s[1], s[2], s[3]],
                v[i * per..(i + 1) * per].to_vec(),
            )
        }),
    }
}

/// Number of sequences and each one's output length.
fn lengths(b: &Batch, out_len: usize) -> Vec<usize> {
    if let Some(d) = &b.decoder_input_ids {
        d.iter().map(Vec::len).collect()
    } else if let Some((s, _)) = &b.pixel_values {
        vec![out_len; s[0]]
    } else {
        b.input_ids.iter().map(Vec::len).collect()
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
        for (i, &n) in lengths(&b, len).iter().enumerate() {
            let one = row(&b, i);
            let o = model.forward(&one).unwrap();
            let row = &all.data[i * len * width..(i * len + n) * width];
            let err = rel_err(row, &o.data[..n * width]);
            assert!(err < 1e-6, "{} sequence {i}: {err}", dir.display());
        }
    }
}

/// `forward_on_device` (what `lightseq bench --task forward` times) holds `forward`'s rows
/// within each sequence's length: on the CPU the same values, on a GPU in f16 within f16's
/// tolerance of the CPU's f32.
#[test]
fn forward_on_device_matches_forward() {
    let dev = gpu("forward_on_device_matches_forward (its GPU part)");
    let mut checked = 0;
    for dir in fixtures() {
        let md = ModelDir::open(&dir).unwrap();
        let model = models::load(&md, DType::F32, &Device::Cpu).unwrap();
        let b = batch(&dir);
        let Some(on) = model.forward_on_device(&b) else {
            continue;
        };
        let want = model.forward(&b).unwrap();
        let [n, len, width] = want.shape;
        let mut runs = vec![(on.unwrap(), 0.0)];
        if let Some(dev) = &dev {
            let m = models::load(&md, DType::F16, dev).unwrap();
            runs.push((m.forward_on_device(&b).unwrap().unwrap(), 1e-2));
        }
        for (t, tol) in runs {
            assert_eq!(t.shape(), [n * len, width], "{}", dir.display());
            let got = t.to_f32_vec().unwrap();
            for (i, &l) in lengths(&b, len).iter().enumerate() {
                let rows = i * len * width..(i * len + l) * width;
                let err = rel_err(&got[rows.clone()], &want.data[rows]);
                assert!(err <= tol, "{} sequence {i}: {err} > {tol}", dir.display());
            }
        }
        checked += 1;
    }
    eprintln!("forward_on_device_matches_forward: {checked} fixtures");
    assert!(
        checked >= 10,
        "only {checked} fixtures have a forward on the device"
    );
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

#[test]
fn cpu_half_precision_weights_stay_within_tolerance() {
    // On the CPU, f16/bf16 round the weights and compute in f32.
    for dir in fixtures() {
        check(&dir, DType::F16, &Device::Cpu, 1e-2);
        check(&dir, DType::BF16, &Device::Cpu, 3e-2);
    }
}

/// BERT forwards of one padded shape run eagerly, then from a captured CUDA graph (with
/// LIGHTSEQ_CUDA_GRAPHS=require, as in gpu-check, a failed capture is an error): every
/// call, replays included, must compute from its own inputs and lengths.
#[test]
fn gpu_repeated_forwards_read_their_own_inputs() {
    let Some(dev) = gpu("gpu_repeated_forwards_read_their_own_inputs") else {
        return;
    };
    for name in ["bert", "bert_cls_types"] {
        let dir = fixtures_dir().join(name);
        let md = ModelDir::open(&dir).unwrap();
        let first = batch(&dir);
        // The same lengths, other tokens and token types.
        let mut second = first.clone();
        for r in &mut second.input_ids {
            r.rotate_left(1);
        }
        for r in second.token_type_ids.iter_mut().flatten() {
            r.reverse();
        }
        // The same padded shape with other lengths: the first row two tokens shorter (the
        // longest row is another one).
        let mut third = first.clone();
        let n = third.input_ids[0].len() - 2;
        third.input_ids[0].truncate(n);
        for r in third.token_type_ids.iter_mut() {
            r[0].truncate(n);
        }
        let cpu = models::load(&md, DType::F32, &Device::Cpu).unwrap();
        let batches = [&first, &second, &third];
        let want = batches.map(|b| cpu.forward(b).unwrap());
        assert_eq!(want[0].shape, want[2].shape, "{name}: padded shapes differ");
        assert!(
            rel_err(&want[0].data, &want[1].data) > 1e-2,
            "{name}: inputs too alike"
        );
        let model = models::load(&md, DType::F16, &dev).unwrap();
        for call in 0..9 {
            let got = model.forward(batches[call % 3]).unwrap();
            let err = rel_err(&got.data, &want[call % 3].data);
            eprintln!("{name:<20} call {call} f16 rel err {err:.2e}");
            assert!(err <= 1e-2, "{name} call {call}: rel err {err}");
        }
    }
}
