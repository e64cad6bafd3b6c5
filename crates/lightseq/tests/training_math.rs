//! Backward passes, the label-smoothed loss, Adam/AdamW, clipping and schedules against
//! torch autograd and torch.optim (tests/fixtures/grad, from scripts/make_grad_fixtures.py).

mod common;

use common::{fixtures_dir, rel_err};
use lightseq::io::safetensors::SafeTensorsFile;
use lightseq::ops::Activation;
use lightseq::train::{grad, loss, optim};

fn load(name: &str) -> SafeTensorsFile {
    SafeTensorsFile::open(
        &fixtures_dir()
            .join("grad")
            .join(format!("{name}.safetensors")),
    )
    .unwrap()
}

fn t(f: &SafeTensorsFile, name: &str) -> Vec<f32> {
    f.read_f32(name).unwrap().1
}

fn close(got: &[f32], want: &[f32], what: &str) {
    let e = rel_err(got, want);
    assert!(e < 1e-5, "{what}: rel err {e}");
}

#[test]
fn linear_backward_matches_autograd() {
    for (name, act) in [
        ("gelu", Activation::Gelu),
        ("gelu_new", Activation::GeluTanh),
        ("relu", Activation::Relu),
        ("silu", Activation::Silu),
    ] {
        let f = load(&format!("linear_{name}"));
        let (m, n, k) = (7, 11, 13);
        let mut dw = vec![0f32; n * k];
        let mut db = vec![0f32; n];
        let dx = grad::linear_backward(
            &t(&f, "x"),
            &t(&f, "w"),
            Some(&t(&f, "pre")),
            act,
            &t(&f, "dy"),
            m,
            n,
            k,
            &mut dw,
            Some(&mut db),
        );
        close(&dx, &t(&f, "dx"), &format!("{name} dx"));
        close(&dw, &t(&f, "dw"), &format!("{name} dw"));
        close(&db, &t(&f, "db"), &format!("{name} db"));
    }
}

#[test]
fn layer_norm_backward_matches_autograd() {
    let f = load("layer_norm");
    let (rows, h) = (5, 17);
    let (mut dg, mut dbt) = (vec![0f32; h], vec![0f32; h]);
    let dx = grad::layer_norm_backward(
        &t(&f, "x"),
        &t(&f, "gamma"),
        1e-5,
        &t(&f, "dy"),
        rows,
        h,
        &mut dg,
        &mut dbt,
    );
    close(&dx, &t(&f, "dx"), "dx");
    close(&dg, &t(&f, "dgamma"), "dgamma");
    close(&dbt, &t(&f, "dbeta"), "dbeta");
}

#[test]
fn attention_backward_matches_autograd() {
    for (name, causal) in [("full", false), ("causal", true)] {
        let f = load(&format!("attention_{name}"));
        let (dq, dk, dv) = grad::attention_backward(
            &t(&f, "q"),
            &t(&f, "k"),
            &t(&f, "v"),
            &t(&f, "dout"),
            2,
            6,
            3,
            4,
            &[6, 4],
            causal,
            0.37,
        );
        close(&dq, &t(&f, "dq"), &format!("{name} dq"));
        close(&dk, &t(&f, "dk"), &format!("{name} dk"));
        close(&dv, &t(&f, "dv"), &format!("{name} dv"));
    }
}

#[test]
fn label_smoothed_cross_entropy_matches_autograd() {
    for eps in ["0.0", "0.1"] {
        let f = load(&format!("cross_entropy_{eps}"));
        let targets: Vec<i64> = t(&f, "targets").iter().map(|&x| x as i64).collect();
        let out = loss::label_smoothed_cross_entropy(
            &t(&f, "logits"),
            &targets,
            23,
            eps.parse().unwrap(),
            Some(1),
        );
        assert!(
            (out.loss - t(&f, "loss")[0] as f64).abs() < 1e-5,
            "eps {eps}: loss {} vs {}",
            out.loss,
            t(&f, "loss")[0]
        );
        assert!((out.nll_loss - t(&f, "nll")[0] as f64).abs() < 1e-5);
        assert_eq!(out.tokens, 8);
        close(
            &out.dlogits,
            &t(&f, "dlogits"),
            &format!("eps {eps} dlogits"),
        );
    }
}

#[test]
fn adam_and_adamw_match_torch_optim() {
    for (name, kind) in [("adam", optim::Kind::Adam), ("adamw", optim::Kind::AdamW)] {
        let f = load(&format!("optim_{name}"));
        let cfg = optim::AdamConfig {
            kind,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        let mut p = t(&f, "p0");
        let mut st = optim::AdamState::default();
        for i in 0..3 {
            optim::adam_step(&cfg, 3e-3, &mut p, &t(&f, &format!("g{i}")), &mut st);
            let want = t(&f, &format!("p{}", i + 1));
            let e = rel_err(&p, &want);
            assert!(e < 1e-6, "{name} step {}: {e}", i + 1);
        }
    }
}

#[test]
fn clipping_and_schedules_match_torch() {
    let f = load("clip");
    let (mut a, mut c) = (t(&f, "a"), t(&f, "c"));
    let norm = optim::clip_grad_norm(&mut [&mut a[..], &mut c[..]], 2.0);
    assert!((norm - t(&f, "norm")[0] as f64).abs() < 1e-5);
    close(&a, &t(&f, "a_clipped"), "a");
    close(&c, &t(&f, "c_clipped"), "c");
    let s = load("schedules");
    for (name, sch) in [
        (
            "linear",
            optim::Schedule::Linear {
                warmup: 4,
                total: 16,
            },
        ),
        (
            "cosine",
            optim::Schedule::Cosine {
                warmup: 4,
                total: 16,
            },
        ),
    ] {
        let want = t(&s, name);
        for (i, w) in want.iter().enumerate() {
            let got = sch.lr(0.5, i as u64 + 1);
            assert!(
                (got - *w as f64).abs() < 1e-6,
                "{name} update {}: {got} vs {w}",
                i + 1
            );
        }
    }
}
