//! The training ops against torch autograd and torch.optim (tests/fixtures/grad, from
//! scripts/make_grad_fixtures.py), on the CPU (their CUDA bodies are checked against these in
//! tests/train_ops.rs): linear and activation backward, layer-norm backward, attention
//! backward, the label-smoothed cross entropy, Adam/AdamW, clipping and schedules.

mod common;

use common::{fixtures_dir, rel_err};
use lightseq::io::safetensors::SafeTensorsFile;
use lightseq::ops::{self, Activation};
use lightseq::train::layers::{attend, attend_backward, Dropout};
use lightseq::train::ops::{self as tops, AdamHyper};
use lightseq::train::optim;
use lightseq::{DType, Device, Tensor};

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

fn tensor(f: &SafeTensorsFile, name: &str, shape: &[usize]) -> Tensor {
    Tensor::from_f32(&t(f, name), shape, DType::F32, &Device::Cpu).unwrap()
}

fn close(got: &Tensor, want: &[f32], what: &str) {
    let e = rel_err(&got.to_f32_vec().unwrap(), want);
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
        let (x, w, dy) = (
            tensor(&f, "x", &[m, k]),
            tensor(&f, "w", &[n, k]),
            tensor(&f, "dy", &[m, n]),
        );
        // The forward as the layers run it (bias in the GEMM, activation after), then the
        // backward pieces.
        let pre = ops::linear(&x, &w, Some(&tensor(&f, "b", &[n])), Activation::None).unwrap();
        close(&pre, &t(&f, "pre"), &format!("{name} pre-activation"));
        let dz = tops::activation_backward(&pre, &dy, act).unwrap();
        close(
            &tops::linear_input_grad(&dz, &w).unwrap(),
            &t(&f, "dx"),
            &format!("{name} dx"),
        );
        close(
            &tops::linear_weight_grad(&dz, &x).unwrap(),
            &t(&f, "dw"),
            &format!("{name} dw"),
        );
        close(
            &tops::column_sum(&dz).unwrap(),
            &t(&f, "db"),
            &format!("{name} db"),
        );
    }
}

#[test]
fn layer_norm_backward_matches_autograd() {
    let f = load("layer_norm");
    let (rows, h) = (5, 17);
    let (dx, dg, db) = tops::layer_norm_backward(
        &tensor(&f, "x", &[rows, h]),
        &tensor(&f, "gamma", &[h]),
        &tensor(&f, "dy", &[rows, h]),
        1e-5,
    )
    .unwrap();
    close(&dx, &t(&f, "dx"), "dx");
    close(&dg, &t(&f, "dgamma"), "dgamma");
    close(&db, &t(&f, "dbeta"), "dbeta");
}

/// [a, b, w] -> [b, a, w].
fn swap01(v: &[f32], a: usize, b: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * w..][..w].copy_from_slice(&v[(i * b + j) * w..][..w]);
        }
    }
    out
}

#[test]
fn attention_backward_matches_autograd() {
    // The fixtures are [batch, len, heads * d]; training activations are position-major
    // [len, batch, heads * d].
    let (b, l, heads, d) = (2, 6, 3, 4);
    let w = heads * d;
    let lens = Tensor::from_i32(&[6, 4], &[2], &Device::Cpu).unwrap();
    let input = |f: &SafeTensorsFile, name: &str| {
        Tensor::from_f32(
            &swap01(&t(f, name), b, l, w),
            &[l, b, w],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let check = |got: &Tensor, want: &[f32], what: &str| {
        let e = rel_err(&swap01(&got.to_f32_vec().unwrap(), l, b, w), want);
        assert!(e < 1e-5, "{what}: rel err {e}");
    };
    for (name, causal) in [("full", false), ("causal", true)] {
        let f = load(&format!("attention_{name}"));
        let (_, saved) = attend(
            &Dropout::off(),
            input(&f, "q"),
            input(&f, "k"),
            input(&f, "v"),
            heads,
            0.37,
            Some(&lens),
            causal,
        )
        .unwrap();
        let (dq, dk, dv) = attend_backward(&Dropout::off(), saved, input(&f, "dout"))
            .unwrap()
            .separate()
            .expect("separate inputs give separate gradients");
        check(&dq, &t(&f, "dq"), &format!("{name} dq"));
        check(&dk, &t(&f, "dk"), &format!("{name} dk"));
        check(&dv, &t(&f, "dv"), &format!("{name} dv"));
    }
}

#[test]
fn label_smoothed_cross_entropy_matches_autograd() {
    for eps in ["0.0", "0.1"] {
        let f = load(&format!("cross_entropy_{eps}"));
        // Pad (id 1) targets are ignored: -1 for the op.
        let targets: Vec<i32> = t(&f, "targets")
            .iter()
            .map(|&x| if x as i32 == 1 { -1 } else { x as i32 })
            .collect();
        let n = targets.len();
        let tokens = targets.iter().filter(|&&x| x >= 0).count();
        assert_eq!(tokens, 8);
        let tt = Tensor::from_i32(&targets, &[n], &Device::Cpu).unwrap();
        let (loss, nll, dlogits) = tops::cross_entropy(
            &tensor(&f, "logits", &[n, 23]),
            &tt,
            eps.parse().unwrap(),
            1.0 / tokens as f32,
        )
        .unwrap();
        let mean = |x: &Tensor| {
            x.to_f32_vec()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / tokens as f64
        };
        let (l, nl) = (mean(&loss), mean(&nll));
        assert!(
            (l - t(&f, "loss")[0] as f64).abs() < 1e-5,
            "eps {eps}: loss {l} vs {}",
            t(&f, "loss")[0]
        );
        assert!((nl - t(&f, "nll")[0] as f64).abs() < 1e-5);
        close(&dlogits, &t(&f, "dlogits"), &format!("eps {eps} dlogits"));
    }
}

#[test]
fn adam_and_adamw_match_torch_optim() {
    for (name, decoupled) in [("adam", false), ("adamw", true)] {
        let f = load(&format!("optim_{name}"));
        let n = t(&f, "p0").len();
        let mut p = tensor(&f, "p0", &[n]);
        let zeros = vec![0f32; n];
        let mut m = Tensor::from_f32(&zeros, &[n], DType::F32, &Device::Cpu).unwrap();
        let mut v = Tensor::from_f32(&zeros, &[n], DType::F32, &Device::Cpu).unwrap();
        for i in 0..3 {
            let h = AdamHyper {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-8,
                weight_decay: 0.05,
                decoupled,
                step: i + 1,
                grad_scale: 1.0,
            };
            tops::adam_step(
                &mut p,
                &tensor(&f, &format!("g{i}"), &[n]),
                &mut m,
                &mut v,
                None,
                &h,
            )
            .unwrap();
            let want = t(&f, &format!("p{}", i + 1));
            let e = rel_err(&p.to_f32_vec().unwrap(), &want);
            assert!(e < 1e-6, "{name} step {}: {e}", i + 1);
        }
    }
}

#[test]
fn clipping_and_schedules_match_torch() {
    let f = load("clip");
    let (a, c) = (t(&f, "a"), t(&f, "c"));
    let ta = Tensor::from_f32(&a, &[a.len()], DType::F32, &Device::Cpu).unwrap();
    let tc = Tensor::from_f32(&c, &[c.len()], DType::F32, &Device::Cpu).unwrap();
    let norm = tops::sum_squares_all(&[&ta, &tc]).unwrap().sqrt();
    assert!((norm - t(&f, "norm")[0] as f64).abs() < 1e-5);
    let coef = optim::clip_coefficient(norm, 2.0) as f32;
    let scaled = |x: &[f32]| -> Vec<f32> { x.iter().map(|v| v * coef).collect() };
    let e = rel_err(&scaled(&a), &t(&f, "a_clipped"));
    assert!(e < 1e-6, "a: {e}");
    let e = rel_err(&scaled(&c), &t(&f, "c_clipped"));
    assert!(e < 1e-6, "c: {e}");
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
