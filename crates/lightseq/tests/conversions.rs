//! torch.save checkpoints read without Python, and fairseq checkpoints converted to HF
//! model directories, checked against references made by scripts/make_fixtures.py.

mod common;

use common::{fixtures_dir, rel_err};
use lightseq::io::fairseq;
use lightseq::io::safetensors::SafeTensorsFile;
use lightseq::io::torch::TorchFile;
use lightseq::io::ModelDir;
use lightseq::models::{self, Batch};
use lightseq::{DType, Device};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lightseq-conv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn torch_views_are_gathered_exactly() {
    let d = fixtures_dir().join("torch_views");
    let f = TorchFile::open(&d.join("views.pt")).unwrap();
    let want = SafeTensorsFile::open(&d.join("expected.safetensors")).unwrap();
    assert_eq!(f.tensors.len(), want.tensors.len());
    for name in want.tensors.keys() {
        let (ws, w) = want.read_f32(name).unwrap();
        let (gs, g) = f.read_f32(name).unwrap();
        assert_eq!(gs, ws, "{name}");
        assert_eq!(g, w, "{name}");
    }
}

#[test]
fn fairseq_checkpoints_convert_to_matching_hf_models() {
    for (case, model_type) in [
        ("post_norm", "fsmt"),
        ("pre_norm", "m2m_100"),
        ("learned_pos", "bart"),
    ] {
        let src = fixtures_dir().join("fairseq").join(case);
        let out = tmp(case);
        let c = fairseq::convert(&src.join("checkpoint.pt"), &out).unwrap();
        assert_eq!(c.model_type, model_type, "{case}");
        let md = ModelDir::open(&out).unwrap();
        assert_eq!(md.model_type().unwrap(), model_type);
        let model = models::load(&md, DType::F32, &Device::Cpu).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("input.json")).unwrap())
                .unwrap();
        let o = model.forward(&Batch::from_json(&v).unwrap()).unwrap();
        let (shape, want) = SafeTensorsFile::open(&src.join("reference.safetensors"))
            .unwrap()
            .read_f32("logits")
            .unwrap();
        let width = shape[2];
        // A shared vocabulary may be padded past the target's; compare the target's columns.
        let got: Vec<f32> = o
            .data
            .chunks(o.shape[2])
            .flat_map(|r| r[..width].to_vec())
            .collect();
        assert_eq!(o.shape[..2], shape[..2]);
        let err = rel_err(&got, &want);
        eprintln!("fairseq {case} -> {model_type}: rel err {err:.2e}");
        assert!(err <= 1e-4, "{case}: {err}");
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn bad_torch_files_are_clear_errors() {
    let d = tmp("bad");
    std::fs::create_dir_all(&d).unwrap();
    let legacy = d.join("legacy.pt");
    std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46]).unwrap();
    let e = TorchFile::open(&legacy).err().unwrap().to_string();
    assert!(e.contains("legacy"), "{e}");
    let views = fixtures_dir().join("torch_views/views.pt");
    let bytes = std::fs::read(&views).unwrap();
    let cut = d.join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = TorchFile::open(&cut).err().unwrap().to_string();
    assert!(e.contains("zip") || e.contains("truncated"), "{e}");
    // A state dict without fairseq args is not a fairseq checkpoint.
    let e = fairseq::convert(&views, &d.join("out"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a fairseq checkpoint"), "{e}");
}

/// torch.save stores tied weights under each of their names as one view of one storage:
/// those compare equal without reading (a NaN in the storage would make a comparison of
/// values say otherwise); other names compare by shape and values.
#[test]
fn aliased_torch_tensors_are_the_same_values() {
    use lightseq::io::checkpoint::{Checkpoint, Source};
    let p = fixtures_dir().join("torch_aliases/aliases.pt");
    let ck = Checkpoint::from_files(p.clone(), vec![Source::Torch(TorchFile::open(&p).unwrap())]);
    let same = |a: &str, b: &str| ck.same_values(a, b).unwrap();
    assert!(same("shared", "embed"));
    assert!(same("copy", "copy2"));
    assert!(!same("shared", "copy"));
    assert!(!same("copy", "other"));
    assert!(!same("shared", "row"));
    assert!(!same("shared", "missing"));
}
