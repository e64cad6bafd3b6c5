//! The CUDA bodies of the training ops (`lightseq::train::ops`) against the CPU bodies, for
//! every dtype the op takes, on random inputs of odd shapes. Skips without a GPU unless
//! LIGHTSEQ_REQUIRE_GPU=1.
#![allow(clippy::too_many_arguments)]

mod common;

use common::{gpu, randn, rel_err};
use lightseq::ops::Activation;
use lightseq::train::ops::{self, AdamHyper};
use lightseq::{DType, Device, Tensor};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

const ACTS: [Activation; 7] = [
    Activation::None,
    Activation::Gelu,
    Activation::GeluTanh,
    Activation::Relu,
    Activation::Silu,
    Activation::QuickGelu,
    Activation::Tanh,
];

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 2e-2,
    }
}

fn t(data: &[f32], shape: &[usize], dt: DType, dev: &Device) -> Tensor {
    Tensor::from_f32(data, shape, dt, dev).unwrap()
}

/// An f32 weight-gradient accumulator of `shape` holding `acc0`, and the `overwrite` flag
/// to write it with: on CUDA as asked (writing over stale values); on the CPU, the
/// reference, zeros accumulated into where `overwrite` is asked.
fn grad_acc(acc0: &[f32], shape: &[usize], overwrite: bool, d: &Device) -> (Tensor, bool) {
    if overwrite && !d.is_cuda() {
        (t(&vec![0f32; acc0.len()], shape, DType::F32, d), false)
    } else {
        (t(acc0, shape, DType::F32, d), overwrite)
    }
}

fn ids(data: &[i32], dev: &Device) -> Tensor {
    Tensor::from_i32(data, &[data.len()], dev).unwrap()
}

fn scaled(seed: u64, n: usize, s: f32) -> Vec<f32> {
    randn(seed, n).into_iter().map(|v| v * s).collect()
}

/// Asserts that the CUDA tensor `g` matches the CPU tensor `c` within `tol` (relative).
fn check(what: &str, dt: DType, g: &Tensor, c: &Tensor, tol: f64) {
    assert_eq!(g.shape(), c.shape(), "{what} {dt}: shapes");
    assert_eq!(g.dtype(), c.dtype(), "{what} {dt}: dtypes");
    let (gv, cv) = (g.to_f32_vec().unwrap(), c.to_f32_vec().unwrap());
    let err = rel_err(&gv, &cv);
    assert!(err <= tol, "{what} {dt}: rel err {err:.3e} > {tol:.1e}");
    eprintln!("{what:<44} {dt:<5} rel err {err:.2e}");
}

/// Column block `c` (of `h` columns) of every row of `data`, whose rows are `width` wide.
fn column_block(data: &[f32], width: usize, c: usize, h: usize) -> Vec<f32> {
    data.chunks(width)
        .flat_map(|row| row[c * h..(c + 1) * h].to_vec())
        .collect()
}

/// Asserts that each named pair is element-for-element equal and not all zero.
fn assert_equal_pairs(what: &str, pairs: &[(&str, Vec<f32>, Vec<f32>)]) {
    for (name, x, y) in pairs {
        assert!(x.iter().any(|&e| e != 0.0), "{what} {name}: all zero");
        assert!(x == y, "{what} {name}: packed and separate differ");
    }
    eprintln!("{what}: equal");
}

/// The column sums of the fused attention backward's partial bias sums (`sums` [rows, 3 h]:
/// dq's, dk's and dv's columns) against the column sums of the gradients it returned, in
/// f64. The sums are of unrounded values, so the error is measured against the gradient's
/// own norm where its column sums nearly cancel (k's: softmax rows sum to zero).
fn check_bias_sums(what: &str, dt: DType, sums: &Tensor, grads: [&Tensor; 3], h: usize) {
    assert_eq!(sums.shape()[1], 3 * h, "{what}: bias sums shape");
    let sv = sums.to_f32_vec().unwrap();
    let rows = sv.len() / (3 * h);
    for (i, g) in grads.iter().enumerate() {
        let gv = g.to_f32_vec().unwrap();
        let want: Vec<f64> = (0..h)
            .map(|c| gv.chunks(h).map(|r| r[c] as f64).sum())
            .collect();
        let got: Vec<f64> = (0..h)
            .map(|c| (0..rows).map(|r| sv[r * 3 * h + i * h + c] as f64).sum())
            .collect();
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let gv64: Vec<f64> = gv.iter().map(|v| *v as f64).collect();
        let scale = norm(&want).max(norm(&gv64));
        let err = norm(&diff) / scale.max(1e-30);
        assert!(
            err <= tol(dt),
            "{what}: bias sums of part {i}: rel err {err:.3e}"
        );
        assert!(
            got.iter().any(|v| *v != 0.0),
            "{what}: bias sums of part {i} all zero"
        );
    }
    eprintln!("{what}: bias sums match");
}

/// Attention dropout alone at `rate`, drawn from (seed, offset).
fn attention_dropout(rate: f32, seed: u64, offset: u64) -> lightseq::train::layers::Dropout {
    lightseq::train::layers::Dropout {
        hidden: 0.0,
        attention: rate,
        activation: 0.0,
        seed,
        offset: std::cell::Cell::new(offset),
    }
}

/// The attention GEMMs over heads read and written in place in [len, batch, heads * d]
/// activations (head views: stride d, rows batch * heads * d apart) against the CPU, and
/// the CPU's strided GEMM against the same product through contiguous copies.
#[test]
fn strided_matmul_over_heads() {
    let (l, lk, b, nh, d) = (7, 5, 3, 2, 8);
    let (row, bh) = (b * nh * d, b * nh);
    let q = randn(801, l * row);
    let k = randn(802, lk * row);
    let run = |dev: &Device, dt: DType| {
        let (qt, kt) = (
            t(&q, &[l, b, nh * d], dt, dev),
            t(&k, &[lk, b, nh * d], dt, dev),
        );
        let view = |x| ops::Mats {
            t: x,
            ld: row,
            stride: d,
        };
        let s = ops::matmul_strided(
            view(&qt),
            false,
            view(&kt),
            true,
            bh,
            l,
            lk,
            d,
            lk,
            l * lk,
            &[b, nh, l, lk],
        )
        .unwrap();
        let sm = ops::Mats {
            t: &s,
            ld: lk,
            stride: l * lk,
        };
        let ctx = ops::matmul_strided(
            sm,
            false,
            view(&kt),
            false,
            bh,
            l,
            d,
            lk,
            row,
            d,
            &[l, b, nh * d],
        )
        .unwrap();
        let dk = ops::matmul_strided(
            sm,
            true,
            view(&qt),
            false,
            bh,
            lk,
            d,
            l,
            row,
            d,
            &[lk, b, nh * d],
        )
        .unwrap();
        (s, ctx, dk)
    };
    // CPU against a naive loop over (batch, head).
    let (s, ctx, dk) = run(&Device::Cpu, DType::F32);
    let (sv, cv, dkv) = (
        s.to_f32_vec().unwrap(),
        ctx.to_f32_vec().unwrap(),
        dk.to_f32_vec().unwrap(),
    );
    let at = |x: &[f32], pos: usize, i: usize, j: usize| x[pos * row + i * d + j];
    let (mut ws, mut wc, mut wk) = (
        vec![0f32; sv.len()],
        vec![0f32; cv.len()],
        vec![0f32; dkv.len()],
    );
    for i in 0..bh {
        for a in 0..l {
            for c in 0..lk {
                ws[(i * l + a) * lk + c] = (0..d).map(|j| at(&q, a, i, j) * at(&k, c, i, j)).sum();
            }
        }
        for a in 0..l {
            for j in 0..d {
                wc[a * row + i * d + j] = (0..lk)
                    .map(|c| ws[(i * l + a) * lk + c] * at(&k, c, i, j))
                    .sum();
            }
        }
        for c in 0..lk {
            for j in 0..d {
                wk[c * row + i * d + j] = (0..l)
                    .map(|a| ws[(i * l + a) * lk + c] * at(&q, a, i, j))
                    .sum();
            }
        }
    }
    assert!(rel_err(&sv, &ws) < 1e-6, "scores");
    assert!(rel_err(&cv, &wc) < 1e-6, "context");
    assert!(rel_err(&dkv, &wk) < 1e-6, "key gradient");
    let Some(gpu) = gpu("strided_matmul_over_heads") else {
        return;
    };
    for dt in DTYPES {
        let (gs, gc, gk) = run(&gpu, dt);
        let (cs, cc, ck) = run(&Device::Cpu, dt);
        check("strided matmul scores", dt, &gs, &cs, tol(dt));
        check("strided matmul context", dt, &gc, &cc, tol(dt));
        check("strided matmul key gradient", dt, &gk, &ck, tol(dt));
    }
}

/// GEMMs large enough to be tuned (2^32 FLOPs each), inside a tuning scope, against the
/// CPU: a linear with a bias epilogue (candidates timed on the output itself) and a
/// weight gradient added into an accumulator that holds values (timed on a scratch
/// buffer, the accumulator only read). Earlier choices, the tuning file's included, are
/// forgotten first, so the shapes are timed here.
#[test]
fn cuda_tuned_gemms_match_cpu() {
    let Some(gpu) = gpu("cuda_tuned_gemms_match_cpu") else {
        return;
    };
    let Device::Cuda(cuda) = &gpu else {
        unreachable!("gpu() returns a CUDA device")
    };
    if std::env::var("LIGHTSEQ_GEMM_TUNE").as_deref() == Ok("0") {
        eprintln!("cuda_tuned_gemms_match_cpu: skipped, LIGHTSEQ_GEMM_TUNE=0");
        return;
    }
    cuda.retune_gemms();
    let cpu = Device::Cpu;
    let (m, n, k) = (2048, 1024, 1024);
    let (x, w, b) = (randn(60, m * k), scaled(61, n * k, 0.05), randn(62, n));
    let (dy, acc0, r) = (randn(63, m * 2 * n), randn(64, n * k), randn(65, m * n));
    for dt in DTYPES {
        let timed = cuda.timed_gemm_shapes();
        let _tuning = cuda.gemm_tuning_scope();
        let run = |d: &Device| {
            let xt = t(&x, &[m, k], dt, d);
            let y = lightseq::ops::linear(
                &xt,
                &t(&w, &[n, k], dt, d),
                Some(&t(&b, &[n], dt, d)),
                Activation::None,
            )
            .unwrap();
            // A residual added by the GEMM (beta = 1, read from another buffer): timed on
            // the output itself, the residual only read.
            let rt = t(&r, &[m, n], dt, d);
            let ya = ops::linear_add(&xt, &t(&w, &[n, k], dt, d), None, &rt).unwrap();
            assert_eq!(
                rt.to_f32_vec().unwrap(),
                t(&r, &[m, n], dt, &cpu).to_f32_vec().unwrap()
            );
            let mut acc = t(&acc0, &[n, k], DType::F32, d);
            let dyt = t(&dy, &[m, 2 * n], dt, d);
            // Only the whole of dy on the CPU; its second column block on the GPU, against
            // the CPU's gradient of that block alone.
            if d.is_cuda() {
                ops::linear_weight_grad_cols_into(&mut acc, None, (&dyt, n, n), &xt, false)
                    .unwrap();
            } else {
                let block = t(&column_block(&dy, 2 * n, 1, n), &[m, n], dt, d);
                ops::linear_weight_grad_cols_into(&mut acc, None, (&block, 0, n), &xt, false)
                    .unwrap();
            }
            (y, ya, acc)
        };
        let ((gy, gya, ga), (cy, cya, ca)) = (run(&gpu), run(&cpu));
        check("tuned linear with bias", dt, &gy, &cy, tol(dt));
        check("tuned linear plus residual", dt, &gya, &cya, tol(dt));
        check("tuned weight gradient added", dt, &ga, &ca, tol(dt));
        // 16-bit GEMMs of this size have several candidates on sm_80 and later GPUs.
        if dt != DType::F32 {
            assert!(
                cuda.timed_gemm_shapes() > timed,
                "{dt}: no GEMM shape was timed inside the tuning scope"
            );
        }
    }
}

/// `x @ w^T (+ b) + r` with the residual read by the GEMM, against the CPU's linear then
/// add; widths that are not a multiple of 16 bytes run as two column parts.
#[test]
fn cuda_linear_add_matches_cpu() {
    let Some(gpu) = gpu("cuda_linear_add_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    for dt in DTYPES {
        // The last seven: rows with k a multiple of 32 (up to 32 go to the few-row kernels
        // in 16 bits: 30 rows take two row tiles, and 32 rows of 768 x 3072 on sm_90 and
        // later; an LM head wider than 16384 goes to cuBLASLt, in two column parts as its
        // width is not a multiple of 8; on sm_90, 128 rows of 512 x 2048 go to the
        // warpgroup-MMA kernel in clusters of 8 and 48 rows of 700 x 768 in clusters of 4,
        // elsewhere to cuBLASLt), then more than 128 rows, which go to cuBLASLt, and on
        // sm_90 with LIGHTSEQ_TILED_GEMM=all (scripts/gpu-check.sh runs this binary so too)
        // to the pipelined warpgroup-MMA kernel: 1030 x 768 x 3072 in blocks of 64 x 128 (a
        // part-filled row tile), 1024 x 3072 x 200 in blocks of 128 x 192 (a part-filled
        // chunk of k) and 300 x 100 x 64 (a part-filled block of columns).
        for (m, n, k, bias) in [
            (37, 53, 71, true),
            (64, 96, 40, false),
            (5, 3, 9, true),
            (16, 768, 3072, true),
            (3, 21, 64, false),
            (30, 512, 2048, true),
            (4, 33001, 512, true),
            (128, 512, 2048, true),
            (48, 700, 768, false),
            (32, 768, 3072, true),
            (1030, 768, 3072, true),
            (1024, 3072, 200, false),
            (300, 100, 64, true),
        ] {
            let (x, w, b, r) = (
                randn(70, m * k),
                randn(71, n * k),
                randn(72, n),
                randn(73, m * n),
            );
            let run = |d: &Device| {
                let bt = t(&b, &[n], dt, d);
                let rt = t(&r, &[m, n], dt, d);
                ops::linear_add(
                    &t(&x, &[m, k], dt, d),
                    &t(&w, &[n, k], dt, d),
                    bias.then_some(&bt),
                    &rt,
                )
                .unwrap()
            };
            let what = format!("linear_add [{m},{k}] @ [{n},{k}]^T bias {bias}");
            check(&what, dt, &run(&gpu), &run(&cpu), tol(dt));
        }
    }
    // A residual of another shape is an error, not a GEMM over the wrong bytes.
    let x = t(&randn(74, 6 * 4), &[6, 4], DType::F32, &gpu);
    let w = t(&randn(75, 5 * 4), &[5, 4], DType::F32, &gpu);
    let r = t(&randn(76, 6 * 4), &[6, 4], DType::F32, &gpu);
    assert!(ops::linear_add(&x, &w, None, &r).is_err());
    // So is a bias of another width.
    let r = t(&randn(77, 6 * 5), &[6, 5], DType::F32, &gpu);
    let b = t(&randn(78, 4), &[4], DType::F32, &gpu);
    assert!(ops::linear_add(&x, &w, Some(&b), &r).is_err());
    assert!(ops::linear_add(&x, &w, None, &r).is_ok());
}

#[test]
fn cuda_matmul_matches_cpu() {
    let Some(gpu) = gpu("cuda_matmul_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    for dt in DTYPES {
        for (batch, m, n, k) in [(1, 37, 53, 71), (3, 19, 33, 45), (2, 128, 96, 257)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (randn(1, batch * m * k), randn(2, batch * k * n));
                let run = |d: &Device| {
                    let a_shape = if ta { [batch, k, m] } else { [batch, m, k] };
                    let b_shape = if tb { [batch, n, k] } else { [batch, k, n] };
                    ops::matmul(
                        &t(&a, &a_shape, dt, d),
                        ta,
                        &t(&b, &b_shape, dt, d),
                        tb,
                        batch,
                        m,
                        n,
                        k,
                        &[batch, m, n],
                    )
                    .unwrap()
                };
                let what = format!("matmul {batch}x[{m},{k}]@[{k},{n}] ta={ta} tb={tb}");
                check(&what, dt, &run(&gpu), &run(&cpu), tol(dt));
            }
        }
        // The linear-layer wrappers, at an odd shape and at one of whole 16-byte rows (where
        // cuBLASLt may take the bias gradient into the GEMM's epilogue).
        for (rows, kin, nout) in [(33, 37, 29), (96, 64, 40)] {
            let (x, w, dy) = (
                randn(3, rows * kin),
                randn(4, nout * kin),
                randn(5, rows * nout),
            );
            let ig = |d: &Device| {
                let (dyt, wt) = (t(&dy, &[rows, nout], dt, d), t(&w, &[nout, kin], dt, d));
                ops::linear_input_grad(&dyt, &wt).unwrap()
            };
            check("linear_input_grad", dt, &ig(&gpu), &ig(&cpu), tol(dt));
            // Accumulated into a tensor that already holds values.
            let x_acc = randn(10, rows * kin);
            let igi = |d: &Device| {
                let mut acc = t(&x_acc, &[rows, kin], dt, d);
                let (dyt, wt) = (t(&dy, &[rows, nout], dt, d), t(&w, &[nout, kin], dt, d));
                ops::linear_input_grad_into(&mut acc, &dyt, &wt).unwrap();
                acc
            };
            check(
                "linear_input_grad_into",
                dt,
                &igi(&gpu),
                &igi(&cpu),
                tol(dt),
            );
            let wg = |d: &Device| {
                let (dyt, xt) = (t(&dy, &[rows, nout], dt, d), t(&x, &[rows, kin], dt, d));
                ops::linear_weight_grad(&dyt, &xt).unwrap()
            };
            check("linear_weight_grad", dt, &wg(&gpu), &wg(&cpu), tol(dt));
            // Accumulated into f32 gradients that already hold values, with and without
            // the bias gradient; and written over stale values (`overwrite`), against the
            // CPU accumulating into zeros.
            let (acc0, bacc0) = (randn(6, nout * kin), randn(11, nout));
            for (with_bias, overwrite) in [(false, false), (true, false), (true, true)] {
                let wgi = |d: &Device| {
                    let (mut acc, write_over) = grad_acc(&acc0, &[nout, kin], overwrite, d);
                    let mut bacc = t(&bacc0, &[nout], DType::F32, d);
                    let (dyt, xt) = (t(&dy, &[rows, nout], dt, d), t(&x, &[rows, kin], dt, d));
                    let b = with_bias.then_some(&mut bacc);
                    ops::linear_weight_grad_into(&mut acc, b, &dyt, &xt, write_over).unwrap();
                    (acc, bacc)
                };
                let ((ga, gb), (ca, cb)) = (wgi(&gpu), wgi(&cpu));
                let what = format!(
                    "linear_weight_grad_into {rows}x{kin}x{nout} bias {with_bias} overwrite {overwrite}"
                );
                check(&what, dt, &ga, &ca, tol(dt));
                check(&format!("{what}: bias"), dt, &gb, &cb, tol(dt));
            }
        }
        // Sum of squares over several tensors with one download.
        let parts = [randn(7, 1000), randn(8, 3), randn(9, 70_000)];
        let ss = |d: &Device| {
            let ts: Vec<Tensor> = parts.iter().map(|p| t(p, &[p.len()], dt, d)).collect();
            ops::sum_squares_all(&ts.iter().collect::<Vec<_>>()).unwrap()
        };
        let (g, c) = (ss(&gpu), ss(&cpu));
        assert!(
            ((g - c) / c).abs() < 1e-9,
            "sum_squares_all {dt}: {g} vs {c}"
        );
        // Degenerate sizes: k = 0 gives zeros, m = 0 an empty result.
        let z = ops::matmul(
            &t(&[], &[2, 3, 0], dt, &gpu),
            false,
            &t(&[], &[2, 0, 4], dt, &gpu),
            false,
            2,
            3,
            4,
            0,
            &[2, 3, 4],
        )
        .unwrap();
        assert_eq!(z.to_f32_vec().unwrap(), vec![0f32; 24], "matmul k = 0 {dt}");
        let e = ops::matmul(
            &t(&[], &[0, 5], dt, &gpu),
            false,
            &t(&randn(6, 15), &[5, 3], dt, &gpu),
            false,
            1,
            0,
            3,
            5,
            &[0, 3],
        )
        .unwrap();
        assert!(e.to_f32_vec().unwrap().is_empty(), "matmul m = 0 {dt}");
    }
}

#[test]
fn cuda_attention_pieces_match_cpu() {
    let Some(gpu) = gpu("cuda_attention_pieces_match_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    for dt in DTYPES {
        // transpose_12 moves values: exact (rows of 7 elements, and of whole 16-byte packs).
        for shape in [[2, 3, 5, 7], [2, 3, 5, 16]] {
            let x = randn(10, shape.iter().product());
            let run = |d: &Device| ops::transpose_12(&t(&x, &shape, dt, d)).unwrap();
            let (g, c) = (run(&gpu), run(&cpu));
            assert_eq!(g.shape(), &[2, 5, 3, shape[3]]);
            assert_eq!(
                g.to_f32_vec().unwrap(),
                c.to_f32_vec().unwrap(),
                "transpose_12 {shape:?} {dt}"
            );
        }

        // masked_softmax: (shape, key lengths, causal); a key length of 0 gives zero rows.
        // Rows of whole 16-byte packs up to 128 packs take the register-cached kernel.
        let cases: [([usize; 4], Option<Vec<i32>>, bool); 8] = [
            ([2, 2, 3, 19], None, false),
            ([2, 3, 5, 1500], Some(vec![1200, 0]), false),
            ([2, 2, 37, 37], None, true),
            ([3, 2, 37, 37], Some(vec![37, 20, 1]), true),
            ([1, 1, 4, 2000], Some(vec![1999]), true),
            ([2, 2, 9, 32], Some(vec![32, 5]), false),
            ([2, 3, 33, 64], Some(vec![0, 61]), true),
            ([1, 2, 16, 512], Some(vec![300]), false),
        ];
        for (sh, kl, causal) in cases {
            let n: usize = sh.iter().product();
            let s = scaled(11, n, 4.0);
            let run = |d: &Device| {
                let klt = kl.as_ref().map(|k| ids(k, d));
                ops::masked_softmax(&t(&s, &sh, dt, d), klt.as_ref(), 0.125, causal).unwrap()
            };
            let (g, c) = (run(&gpu), run(&cpu));
            let what = format!("masked_softmax {sh:?} lens {kl:?} causal {causal}");
            check(&what, dt, &g, &c, tol(dt));
            // Masked entries (zeros on the CPU) are exactly zero on the GPU too.
            let (gv, cv) = (g.to_f32_vec().unwrap(), c.to_f32_vec().unwrap());
            for (i, (a, b)) in gv.iter().zip(&cv).enumerate() {
                if *b == 0.0 {
                    assert_eq!(*a, 0.0, "{what} {dt}: element {i} should be masked");
                }
            }
        }

        // softmax_backward on rows of 37 and 1500, and of whole 16-byte packs.
        for (rows, cols) in [(33, 37), (12, 1500), (40, 32), (9, 128), (5, 512)] {
            let (p, dp) = (randn(12, rows * cols), randn(13, rows * cols));
            let run = |d: &Device| {
                ops::softmax_backward(
                    &t(&p, &[rows, cols], dt, d),
                    &t(&dp, &[rows, cols], dt, d),
                    0.3,
                )
                .unwrap()
            };
            let what = format!("softmax_backward [{rows}, {cols}]");
            check(&what, dt, &run(&gpu), &run(&cpu), tol(dt));
        }
    }
}

#[test]
fn cuda_norm_activation_and_reductions_match_cpu() {
    let Some(gpu) = gpu("cuda_norm_activation_and_reductions_match_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    for dt in DTYPES {
        // layer_norm_backward: dx in the input dtype, dgamma and dbeta f32. (5000, 1024) and
        // (3001, 128) have more rows than one wave of the register-cached kernel takes, so
        // its lanes carry parameter sums over several rows (and, at 128, over 8 teams a
        // warp). Rows of 65 to 128 packs (1024 and 768 in 16 bits, 512 in f32) take teams
        // of two warps, which trade their halves' sums. The eps = 0 cases (a config's
        // layer_norm_eps is taken as given) have warps whose teams are mostly past the last
        // row: only real rows may reach the sums.
        let shapes = [
            (33, 37, 1e-5),
            (7, 1031, 1e-5),
            (300, 64, 1e-5),
            (150, 768, 1e-5),
            (5000, 1024, 1e-5),
            (600, 512, 1e-5),
            (3001, 128, 1e-5),
            (1, 64, 0.0),
            (3, 128, 0.0),
        ];
        for (rows, h, eps) in shapes {
            let x: Vec<f32> = randn(20, rows * h).iter().map(|v| 2.0 * v + 0.5).collect();
            let (g, dy) = (randn(21, h), randn(22, rows * h));
            let run = |d: &Device| {
                ops::layer_norm_backward(
                    &t(&x, &[rows, h], dt, d),
                    &t(&g, &[h], dt, d),
                    &t(&dy, &[rows, h], dt, d),
                    eps,
                )
                .unwrap()
            };
            let ((gdx, gdg, gdb), (cdx, cdg, cdb)) = (run(&gpu), run(&cpu));
            assert_eq!(gdg.dtype(), DType::F32);
            assert_eq!(gdb.dtype(), DType::F32);
            let what = format!("layer_norm_backward [{rows}, {h}] eps {eps}");
            check(&format!("{what} dx"), dt, &gdx, &cdx, tol(dt));
            check(&format!("{what} dgamma"), dt, &gdg, &cdg, tol(dt));
            check(&format!("{what} dbeta"), dt, &gdb, &cdb, tol(dt));

            // The forward's row statistics: kept on CUDA where the register-cached kernel
            // runs (rows of whole 16-byte packs, at most 128 of them), and equal to each
            // row's mean and 1 / sqrt(var + eps) of x as rounded to dt.
            let forward_stats = |d: &Device| {
                let (xt, gt, bt) = (
                    t(&x, &[rows, h], dt, d),
                    t(&g, &[h], dt, d),
                    t(&randn(26, h), &[h], dt, d),
                );
                ops::add_layer_norm_stats(&xt, None, &gt, &bt, eps, true)
                    .unwrap()
                    .stats
            };
            let pack = 16 / dt.size();
            let kept = forward_stats(&gpu);
            assert_eq!(
                kept.is_some(),
                h % pack == 0 && h / pack <= 128,
                "{dt} [{rows}, {h}]: statistics kept"
            );
            if let Some(st) = &kept {
                let xr = t(&x, &[rows, h], dt, &cpu).to_f32_vec().unwrap();
                let naive: Vec<f32> = xr
                    .chunks(h)
                    .flat_map(|row| {
                        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
                        let var =
                            row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
                        [mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32]
                    })
                    .collect();
                let err = rel_err(&st.to_f32_vec().unwrap(), &naive);
                assert!(
                    err < 1e-5,
                    "{dt} [{rows}, {h}]: statistics rel err {err:.2e}"
                );
            }

            // The accumulating form, twice into nonzero accumulators (the sums are added to
            // what the accumulators hold, not written over it); the second call also adds
            // dx's column sums into a third, and on CUDA reads the forward's statistics.
            let into = |d: &Device| {
                let mut dg = t(&scaled(23, h, 1.0), &[h], DType::F32, d);
                let mut db = t(&scaled(24, h, 1.0), &[h], DType::F32, d);
                let mut ds = t(&scaled(25, h, 1.0), &[h], DType::F32, d);
                let stats = kept.as_ref().filter(|_| d.is_cuda());
                let mut dxs = Vec::new();
                for call in 0..2 {
                    dxs.push(
                        ops::layer_norm_backward_into(
                            &t(&x, &[rows, h], dt, d),
                            &t(&g, &[h], dt, d),
                            &t(&dy, &[rows, h], dt, d),
                            eps,
                            &mut dg,
                            &mut db,
                            (call == 1).then_some(&mut ds),
                            stats.filter(|_| call == 1),
                        )
                        .unwrap(),
                    );
                }
                (dxs.pop().unwrap(), dg, db, ds)
            };
            let ((gdx, gdg, gdb, gds), (cdx, cdg, cdb, cds)) = (into(&gpu), into(&cpu));
            check(&format!("{what} into dx"), dt, &gdx, &cdx, tol(dt));
            check(&format!("{what} into dgamma"), dt, &gdg, &cdg, tol(dt));
            check(&format!("{what} into dbeta"), dt, &gdb, &cdb, tol(dt));
            check(
                &format!("{what} into dx column sums"),
                dt,
                &gds,
                &cds,
                tol(dt),
            );
        }

        // activate and activation_backward for every activation.
        let (rows, h) = (33, 37);
        let pre = scaled(30, rows * h, 3.0);
        let dy = randn(31, rows * h);
        for act in ACTS {
            let f = |d: &Device| ops::activate(&t(&pre, &[rows, h], dt, d), act).unwrap();
            check(
                &format!("activate {act:?}"),
                dt,
                &f(&gpu),
                &f(&cpu),
                tol(dt),
            );
            let b = |d: &Device| {
                ops::activation_backward(
                    &t(&pre, &[rows, h], dt, d),
                    &t(&dy, &[rows, h], dt, d),
                    act,
                )
                .unwrap()
            };
            let what = format!("activation_backward {act:?}");
            check(&what, dt, &b(&gpu), &b(&cpu), tol(dt));
        }

        // column_sum: f32 out whatever the input.
        // 768 and 3072 take the 16-byte path (cols a multiple of 8), the others the scalar one.
        for (rows, cols) in [
            (33, 37),
            (1000, 1031),
            (1, 5),
            (2000, 768),
            (300, 3072),
            (7, 8),
        ] {
            let x = randn(40, rows * cols);
            let run = |d: &Device| ops::column_sum(&t(&x, &[rows, cols], dt, d)).unwrap();
            let (g, c) = (run(&gpu), run(&cpu));
            assert_eq!(g.dtype(), DType::F32);
            check(&format!("column_sum [{rows}, {cols}]"), dt, &g, &c, tol(dt));
        }

        // column_sum_parts_into: the column sums of each block of a packed gradient added
        // into accumulators that hold values (3 x 1024 and 2 x 768 take the one-launch
        // 16-byte path, 3 x 37 the scalar one).
        for (rows, parts, n) in [(15_008, 3, 1024), (301, 2, 768), (45, 3, 37), (9, 1, 16)] {
            let x = randn(42, rows * parts * n);
            let acc0: Vec<Vec<f32>> = (0..parts).map(|i| randn(43 + i as u64, n)).collect();
            let run = |d: &Device| {
                let mut accs: Vec<Tensor> =
                    acc0.iter().map(|a| t(a, &[n], DType::F32, d)).collect();
                let mut refs: Vec<&mut Tensor> = accs.iter_mut().collect();
                let xt = t(&x, &[rows, parts * n], dt, d);
                ops::column_sum_parts_into(&mut refs, &xt).unwrap();
                accs
            };
            let (g, c) = (run(&gpu), run(&cpu));
            for (i, (gi, ci)) in g.iter().zip(&c).enumerate() {
                let what = format!("column_sum_parts_into [{rows}, {parts} x {n}] part {i}");
                check(&what, dt, gi, ci, tol(dt));
            }
        }

        // sum_squares: both sides add the same values' squares in f64.
        for n in [1, 37, 100_003] {
            let x = randn(41, n);
            let run = |d: &Device| ops::sum_squares(&t(&x, &[n], dt, d)).unwrap();
            let (g, c) = (run(&gpu), run(&cpu));
            let err = (g - c).abs() / c.abs();
            assert!(err <= 1e-9, "sum_squares {n} {dt}: {g} vs {c}");
            eprintln!(
                "{:<44} {dt:<5} rel err {err:.2e}",
                format!("sum_squares {n}")
            );
        }

        // add_scaled_into: f32 accumulator, x of this dtype.
        let n = 1037;
        let (acc0, x) = (randn(42, n), randn(43, n));
        let run = |d: &Device| {
            let mut acc = t(&acc0, &[n], DType::F32, d);
            ops::add_scaled_into(&mut acc, &t(&x, &[n], dt, d), 0.3).unwrap();
            acc
        };
        let (g, c) = (run(&gpu), run(&cpu));
        check("add_scaled_into", dt, &g, &c, 1e-6);
    }

    // add_range_into: a block of an f32 buffer copied or added, against the slice
    // arithmetic done here.
    let (n, offset, len) = (1037, 301, 517);
    let (acc0, src) = (randn(44, len), randn(45, n));
    for overwrite in [true, false] {
        let mut acc = t(&acc0, &[len], DType::F32, &gpu);
        ops::add_range_into(
            &mut acc,
            &t(&src, &[n], DType::F32, &gpu),
            offset,
            overwrite,
        )
        .unwrap();
        let want: Vec<f32> = (0..len)
            .map(|i| src[offset + i] + if overwrite { 0.0 } else { acc0[i] })
            .collect();
        assert_eq!(
            acc.to_f32_vec().unwrap(),
            want,
            "add_range_into, overwrite {overwrite}"
        );
    }
    let mut acc = t(&acc0, &[len], DType::F32, &gpu);
    let short = t(
        &src[..offset + len - 1],
        &[offset + len - 1],
        DType::F32,
        &gpu,
    );
    assert!(ops::add_range_into(&mut acc, &short, offset, true).is_err());
}

#[test]
fn cuda_embedding_backward_matches_cpu() {
    let Some(gpu) = gpu("cuda_embedding_backward_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let vocab = 20;
    // Repeats, ignored (-1) and out-of-range ids.
    let id: Vec<i32> = (0..50)
        .map(|i| match i % 11 {
            3 => -1,
            7 => vocab as i32 + 5,
            _ => (i * 7 % vocab) as i32,
        })
        .collect();
    // 37 columns take an element a thread; 64 whole 16-byte packs of dy (every dtype).
    for h in [37, 64] {
        let dy = randn(50, id.len() * h);
        for dt in DTYPES {
            let run = |d: &Device| {
                ops::embedding_backward(&ids(&id, d), &t(&dy, &[id.len(), h], dt, d), vocab, 2.0)
                    .unwrap()
            };
            let (g, c) = (run(&gpu), run(&cpu));
            assert_eq!(g.dtype(), DType::F32);
            assert_eq!(g.shape(), &[vocab, h]);
            check(&format!("embedding_backward h {h}"), dt, &g, &c, tol(dt));
            // The accumulating form, into a nonzero table.
            let acc0 = randn(51, vocab * h);
            let into = |d: &Device| {
                let mut acc = t(&acc0, &[vocab, h], DType::F32, d);
                let dyt = t(&dy, &[id.len(), h], dt, d);
                ops::embedding_backward_into(&mut acc, &ids(&id, d), &dyt, 2.0).unwrap();
                acc
            };
            check(
                &format!("embedding_backward_into h {h}"),
                dt,
                &into(&gpu),
                &into(&cpu),
                tol(dt),
            );
        }
    }
}

#[test]
fn cuda_cross_entropy_matches_cpu() {
    let Some(gpu) = gpu("cuda_cross_entropy_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    // 5000 and 32000 are whole 16-byte packs (the staged kernel), 60000 too for
    // 16-bit types only (f32 rows are too long for it); 37 and 1 are not. With more rows
    // than the staged kernel's blocks, each block takes several rows in turn.
    let rows = [
        (33, 5000),
        (5, 37),
        (3, 1),
        (12, 32000),
        (6, 60000),
        (1200, 5000),
        (700, 32000),
    ];
    for (n, vocab) in rows {
        let logits = scaled(60, n * vocab, 3.0);
        let targets: Vec<i32> = (0..n)
            .map(|i| {
                if i % 5 == 2 {
                    -1
                } else {
                    ((i * 7919 + 13) % vocab) as i32
                }
            })
            .collect();
        for dt in DTYPES {
            for (eps, grad_scale) in [(0.1, 0.5), (0.0, 1.0)] {
                let run = |d: &Device| {
                    ops::cross_entropy(
                        &t(&logits, &[n, vocab], dt, d),
                        &ids(&targets, d),
                        eps,
                        grad_scale,
                    )
                    .unwrap()
                };
                let ((gl, gn, gd), (cl, cn, cd)) = (run(&gpu), run(&cpu));
                let what = format!("cross_entropy [{n}, {vocab}] eps {eps}");
                // Loss and nll are f32 from the same (rounded) logits.
                check(&format!("{what} loss"), dt, &gl, &cl, 1e-5);
                check(&format!("{what} nll"), dt, &gn, &cn, 1e-5);
                check(&format!("{what} dlogits"), dt, &gd, &cd, tol(dt));
                // Ignored rows are zero everywhere.
                let (lv, gv) = (gl.to_f32_vec().unwrap(), gd.to_f32_vec().unwrap());
                for (i, &tg) in targets.iter().enumerate() {
                    if tg < 0 {
                        assert_eq!(lv[i], 0.0, "{what} {dt}: loss of ignored row {i}");
                        let row = &gv[i * vocab..(i + 1) * vocab];
                        assert!(row.iter().all(|&v| v == 0.0), "{what} {dt}: row {i}");
                    }
                }
            }
        }
    }
}

/// The LM head over row-padded logits (CUDA pads rows to 8 elements) against the CPU's
/// unpadded one: logits, loss, the logits' gradient, and the gradients added into nonzero
/// accumulators, for vocabularies that are and are not multiples of 8.
#[test]
fn cuda_lm_head_over_padded_logits_matches_cpu() {
    use lightseq::train::head;
    let Some(gpu) = gpu("cuda_lm_head_over_padded_logits_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    // The first `vocab` columns of each row of a [rows, ld] tensor.
    let unpad = |t: &Tensor, vocab: usize| -> Vec<f32> {
        let ld = *t.shape().last().unwrap();
        let v = t.to_f32_vec().unwrap();
        v.chunks(ld).flat_map(|r| r[..vocab].to_vec()).collect()
    };
    for (rows, k, vocab) in [(19, 24, 37), (33, 64, 1003), (8, 16, 64)] {
        let x = scaled(70, rows * k, 1.0);
        let w = scaled(71, vocab * k, 0.5);
        let b = scaled(72, vocab, 0.5);
        let wg0 = scaled(73, vocab * k, 1.0);
        let bg0 = scaled(74, vocab, 1.0);
        let targets: Vec<i32> = (0..rows)
            .map(|i| {
                if i % 4 == 1 {
                    -1
                } else {
                    ((i * 7919 + 3) % vocab) as i32
                }
            })
            .collect();
        // The GPU writes the weight gradient over stale values for two of the shapes; the
        // CPU accumulates into zeros there.
        let overwrite = rows % 2 == 1;
        for dt in DTYPES {
            let run = |d: &Device| {
                let (xt, wt) = (t(&x, &[rows, k], dt, d), t(&w, &[vocab, k], dt, d));
                let logits = head::logits(&xt, &wt, Some(&t(&b, &[vocab], dt, d))).unwrap();
                let (loss, nll, dl) =
                    head::cross_entropy(&logits, &ids(&targets, d), 0.1, 0.5).unwrap();
                let (mut wg, write_over) = grad_acc(&wg0, &[vocab, k], overwrite, d);
                let mut bg = t(&bg0, &[vocab], DType::F32, d);
                head::weight_grad_into(&mut wg, Some(&mut bg), &xt, &dl, write_over).unwrap();
                let dx = head::input_grad(&dl, &wt).unwrap();
                (
                    unpad(&logits.t, vocab),
                    loss,
                    nll,
                    unpad(&dl.t, vocab),
                    wg,
                    bg,
                    dx,
                )
            };
            let (g, c) = (run(&gpu), run(&cpu));
            let what = format!("head [{rows}, {k}] vocab {vocab}");
            let err = rel_err(&g.0, &c.0);
            assert!(err <= tol(dt), "{what} {dt}: logits rel err {err:.3e}");
            check(&format!("{what} loss"), dt, &g.1, &c.1, tol(dt));
            check(&format!("{what} nll"), dt, &g.2, &c.2, tol(dt));
            let err = rel_err(&g.3, &c.3);
            assert!(err <= tol(dt), "{what} {dt}: dlogits rel err {err:.3e}");
            check(&format!("{what} weight grad"), dt, &g.4, &c.4, tol(dt));
            check(&format!("{what} bias grad"), dt, &g.5, &c.5, tol(dt));
            check(&format!("{what} dx"), dt, &g.6, &c.6, tol(dt));
        }
    }
}

/// The fused short-sequence attention (CUDA f16/bf16: forward and backward in one kernel
/// each) against the CPU's unfused attention from the same rounded inputs: key lengths,
/// causal masks, cross attention with other lengths, and attention dropout (the same Philox
/// masks).
#[test]
fn cuda_short_attention_matches_cpu() {
    use lightseq::train::layers::{attend, attend_backward};
    let Some(gpu) = gpu("cuda_short_attention_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    // (lq, lk, batch, heads, head_dim, key lengths, causal)
    type Case = (usize, usize, usize, usize, usize, Option<Vec<i32>>, bool);
    let lens_of = |b: usize, lk: usize| Some((0..b).map(|i| (lk - i % lk) as i32).collect());
    let cases: [Case; 10] = [
        (32, 32, 3, 4, 64, Some(vec![32, 20, 7]), false),
        // Cross attention at head_dim 64: a warp with keys and no queries (9 x 29), and
        // more queries than keys.
        (9, 29, 5, 4, 64, Some(vec![29, 0, 15, 3, 1]), false),
        (28, 20, 40, 4, 64, lens_of(40, 20), true),
        // Thousands of (sequence, head) pairs, every key length from 1 to lk.
        (24, 24, 250, 16, 32, lens_of(250, 24), false),
        (20, 28, 150, 24, 16, lens_of(150, 28), true),
        (13, 13, 2, 2, 32, None, true),
        (9, 29, 2, 3, 16, Some(vec![29, 0]), false),
        (48, 40, 1, 2, 32, Some(vec![35]), true),
        // Past the default 48 KiB of shared memory (the kernels opt in).
        (64, 64, 2, 2, 64, Some(vec![64, 41]), true),
        // The kernels for head_dim up to 128.
        (32, 32, 2, 2, 128, Some(vec![32, 17]), false),
    ];
    for (lq, lk, b, nh, d, lens, causal) in cases {
        let h = nh * d;
        let (q, k, v) = (
            scaled(90, lq * b * h, 1.0),
            scaled(91, lk * b * h, 1.0),
            scaled(92, lk * b * h, 1.0),
        );
        let dctx = scaled(93, lq * b * h, 1.0);
        for dt in [DType::F16, DType::BF16] {
            for rate in [0.0f32, 0.1] {
                let run = |dev: &Device| {
                    let drop = attention_dropout(rate, 7, 3);
                    let qt = t(&q, &[lq, b, h], dt, dev);
                    let kt = t(&k, &[lk, b, h], dt, dev);
                    if matches!(dev, Device::Cuda(_)) {
                        assert!(
                            ops::short_attention_fits(&qt, &kt, nh),
                            "fused path not taken"
                        );
                    }
                    let kl = lens.as_ref().map(|l| ids(l, dev));
                    let (ctx, saved) = attend(
                        &drop,
                        qt,
                        kt,
                        t(&v, &[lk, b, h], dt, dev),
                        nh,
                        1.0 / (d as f32).sqrt(),
                        kl.as_ref(),
                        causal,
                    )
                    .unwrap();
                    let (dq, dk, dv) =
                        attend_backward(&drop, saved, t(&dctx, &[lq, b, h], dt, dev))
                            .unwrap()
                            .separate()
                            .expect("separate inputs give separate gradients");
                    (ctx, dq, dk, dv)
                };
                let (g, c) = (run(&gpu), run(&cpu));
                let what = format!("short attention [{lq}, {lk}] b {b} heads {nh} d {d} causal {causal} dropout {rate}");
                let tol = if dt == DType::F16 { 5e-3 } else { 3e-2 };
                check(&format!("{what} ctx"), dt, &g.0, &c.0, tol);
                check(&format!("{what} dq"), dt, &g.1, &c.1, tol);
                check(&format!("{what} dk"), dt, &g.2, &c.2, tol);
                check(&format!("{what} dv"), dt, &g.3, &c.3, tol);
            }
        }
    }
}

/// Self-attention over one projection's output holding q, k and v as column blocks (read in
/// place by the fused kernels), and cross attention over one holding k and v, against the
/// same q, k and v as tensors of their own: the same kernels on the same values, so the
/// results are equal element for element.
#[test]
fn cuda_packed_attention_matches_separate() {
    use lightseq::train::layers::{
        attend, attend_backward, attend_backward_sums, attend_packed, attend_packed_kv,
    };
    use lightseq::train::ops::QkvGrads;
    let Some(gpu) = gpu("cuda_packed_attention_matches_separate") else {
        return;
    };
    // (len, batch, heads, head_dim, key lengths, causal)
    type Case = (usize, usize, usize, usize, Option<Vec<i32>>, bool);
    let cases: [Case; 3] = [
        (32, 3, 4, 64, Some(vec![32, 20, 7]), false),
        (13, 2, 2, 32, None, true),
        (64, 2, 2, 128, Some(vec![64, 41]), true),
    ];
    for (l, b, nh, d, lens, causal) in cases {
        let h = nh * d;
        let qkv = scaled(95, l * b * 3 * h, 1.0);
        // Column block `c` of every (position, sequence) row.
        let block = |c: usize| column_block(&qkv, 3 * h, c, h);
        let (q, k, v) = (block(0), block(1), block(2));
        let dctx = scaled(96, l * b * h, 1.0);
        for dt in [DType::F16, DType::BF16] {
            for rate in [0.0f32, 0.1] {
                let drop = || attention_dropout(rate, 11, 5);
                let kl = lens.as_ref().map(|x| ids(x, &gpu));
                let scale = 1.0 / (d as f32).sqrt();
                let (d1, d2) = (drop(), drop());
                let packed = t(&qkv, &[l, b, 3 * h], dt, &gpu);
                let (c1, s1) = attend_packed(&d1, packed, nh, scale, kl.as_ref(), causal).unwrap();
                let (c2, s2) = attend(
                    &d2,
                    t(&q, &[l, b, h], dt, &gpu),
                    t(&k, &[l, b, h], dt, &gpu),
                    t(&v, &[l, b, h], dt, &gpu),
                    nh,
                    scale,
                    kl.as_ref(),
                    causal,
                )
                .unwrap();
                let (g1, sums) =
                    attend_backward_sums(&d1, s1, t(&dctx, &[l, b, h], dt, &gpu), true).unwrap();
                let g2 = attend_backward(&d2, s2, t(&dctx, &[l, b, h], dt, &gpu)).unwrap();
                let what = format!("packed attention [{l}] b {b} heads {nh} d {d} causal {causal} dropout {rate} {dt}");
                let QkvGrads::Packed(dqkv) = g1 else {
                    panic!("{what}: packed inputs should give one packed gradient");
                };
                assert_eq!(dqkv.shape(), [l, b, 3 * h], "{what}: dqkv shape");
                let (dq, dk, dv) = g2.separate().expect("separate gradients");
                let sums = sums.expect("the fused backward's bias sums");
                check_bias_sums(&what, dt, &sums, [&dq, &dk, &dv], h);
                // dq, dk and dv as column blocks of dqkv.
                let dqkv = dqkv.to_f32_vec().unwrap();
                let col = |c: usize| column_block(&dqkv, 3 * h, c, h);
                let sep = |x: &Tensor| x.to_f32_vec().unwrap();
                let pairs = [
                    ("ctx", sep(&c1), sep(&c2)),
                    ("dq", col(0), sep(&dq)),
                    ("dk", col(1), sep(&dk)),
                    ("dv", col(2), sep(&dv)),
                ];
                assert_equal_pairs(&what, &pairs);
            }
        }
    }
    // Cross attention: q alone, k and v the column blocks of one [lk, b, 2h] tensor.
    // (lq, lk, batch, heads, head_dim, key lengths)
    type Cross = (usize, usize, usize, usize, usize, Option<Vec<i32>>);
    let cross: [Cross; 2] = [
        (17, 32, 3, 4, 64, Some(vec![32, 9, 20])),
        (40, 24, 2, 2, 32, None),
    ];
    for (lq, lk, b, nh, d, lens) in cross {
        let h = nh * d;
        let q = scaled(97, lq * b * h, 1.0);
        let kv = scaled(98, lk * b * 2 * h, 1.0);
        let (k, v) = (
            column_block(&kv, 2 * h, 0, h),
            column_block(&kv, 2 * h, 1, h),
        );
        let dctx = scaled(99, lq * b * h, 1.0);
        for dt in [DType::F16, DType::BF16] {
            for rate in [0.0f32, 0.1] {
                let drop = || attention_dropout(rate, 13, 2);
                let kl = lens.as_ref().map(|x| ids(x, &gpu));
                let scale = 1.0 / (d as f32).sqrt();
                let (d1, d2) = (drop(), drop());
                let qt = || t(&q, &[lq, b, h], dt, &gpu);
                let kvt = t(&kv, &[lk, b, 2 * h], dt, &gpu);
                let (c1, s1) = attend_packed_kv(&d1, qt(), kvt, nh, scale, kl.as_ref()).unwrap();
                let (c2, s2) = attend(
                    &d2,
                    qt(),
                    t(&k, &[lk, b, h], dt, &gpu),
                    t(&v, &[lk, b, h], dt, &gpu),
                    nh,
                    scale,
                    kl.as_ref(),
                    false,
                )
                .unwrap();
                let (g1, sums) =
                    attend_backward_sums(&d1, s1, t(&dctx, &[lq, b, h], dt, &gpu), true).unwrap();
                let g2 = attend_backward(&d2, s2, t(&dctx, &[lq, b, h], dt, &gpu)).unwrap();
                let what = format!(
                    "packed kv attention [{lq}, {lk}] b {b} heads {nh} d {d} dropout {rate} {dt}"
                );
                let QkvGrads::PackedKv(dq1, dkv) = g1 else {
                    panic!("{what}: packed k and v should give a packed gradient");
                };
                assert_eq!(dkv.shape(), [lk, b, 2 * h], "{what}: dkv shape");
                let (dq2, dk, dv) = g2.separate().expect("separate gradients");
                let sums = sums.expect("the fused backward's bias sums");
                check_bias_sums(&what, dt, &sums, [&dq2, &dk, &dv], h);
                let dkv = dkv.to_f32_vec().unwrap();
                let col = |c: usize| column_block(&dkv, 2 * h, c, h);
                let sep = |x: &Tensor| x.to_f32_vec().unwrap();
                let pairs = [
                    ("ctx", sep(&c1), sep(&c2)),
                    ("dq", sep(&dq1), sep(&dq2)),
                    ("dk", col(0), sep(&dk)),
                    ("dv", col(1), sep(&dv)),
                ];
                assert_equal_pairs(&what, &pairs);
            }
        }
    }
}

#[test]
fn cuda_adam_step_matches_cpu() {
    let Some(gpu) = gpu("cuda_adam_step_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let n = 10_007;
    let (p0, g0) = (randn(70, n), randn(71, n));
    let m0: Vec<f32> = randn(72, n).iter().map(|v| 0.1 * v).collect();
    let v0: Vec<f32> = randn(73, n).iter().map(|v| 0.01 * v * v).collect();
    for decoupled in [true, false] {
        for step in [1, 10] {
            let hp = AdamHyper {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                decoupled,
                step,
                grad_scale: 0.5,
            };
            let run = |d: &Device, copy_dtype: Option<DType>| {
                let f = DType::F32;
                let (mut p, g) = (t(&p0, &[n], f, d), t(&g0, &[n], f, d));
                let (mut m, mut v) = (t(&m0, &[n], f, d), t(&v0, &[n], f, d));
                let mut copy = copy_dtype.map(|dt| t(&p0, &[n], dt, d));
                // Two steps, so the updated moments feed the second.
                for s in [step, step + 1] {
                    let h = AdamHyper { step: s, ..hp };
                    ops::adam_step(&mut p, &g, &mut m, &mut v, copy.as_mut(), &h).unwrap();
                }
                (p, m, v, copy)
            };
            // The copy written by the step is the new master value rounded to its dtype.
            for dt in [DType::F16, DType::BF16] {
                let (p, _, _, copy) = run(&gpu, Some(dt));
                let want = lightseq::ops::to_dtype(&p, dt)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                assert_eq!(
                    copy.unwrap().to_f32_vec().unwrap(),
                    want,
                    "adam_step {dt} copy"
                );
            }
            let ((gp, gm, gv, _), (cp, cm, cv, _)) = (run(&gpu, None), run(&cpu, None));
            let (g, c) = ([gp, gm, gv], [cp, cm, cv]);
            for (name, (a, b)) in ["param", "m", "v"].iter().zip(g.iter().zip(&c)) {
                let what = format!("adam_step decoupled {decoupled} step {step} {name}");
                check(&what, DType::F32, a, b, 1e-6);
                let (av, bv) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
                let differing = av.iter().zip(&bv).filter(|(x, y)| x != y).count();
                eprintln!("{what}: {differing} of {n} elements differ in their bits");
            }
        }
    }
}

/// A few-row linear right after the Adam step that rewrote its 16-bit weight copy reads the
/// new weight: the few-row kernels read a weight before waiting for the kernel before them
/// only while no kernel has written it since its upload.
#[test]
fn cuda_linear_after_adam_reads_the_new_weight() {
    let Some(gpu) = gpu("cuda_linear_after_adam_reads_the_new_weight") else {
        return;
    };
    // 4 rows: the few-row kernels; 64: the warpgroup-MMA kernel on sm_90.
    for m in [4, 64] {
        linear_after_adam(&gpu, m);
    }
}

fn linear_after_adam(gpu: &Device, m: usize) {
    let (n, k) = (512, 512);
    let hp = AdamHyper {
        lr: 0.5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        decoupled: true,
        step: 1,
        grad_scale: 1.0,
    };
    let f = DType::F32;
    for dt in [DType::F16, DType::BF16] {
        let mut p = t(&randn(80, n * k), &[n, k], f, gpu);
        let mut copy = t(&randn(80, n * k), &[n, k], dt, gpu);
        let (mut mm, mut vv) = (
            t(&vec![0.0; n * k], &[n, k], f, gpu),
            t(&vec![0.0; n * k], &[n, k], f, gpu),
        );
        let x = t(&randn(81, m * k), &[m, k], dt, gpu);
        let b = t(&randn(82, n), &[n], dt, gpu);
        for step in 1..=3u64 {
            let g = t(&randn(83 + step, n * k), &[n, k], f, gpu);
            let h = AdamHyper { step, ..hp };
            ops::adam_step(&mut p, &g, &mut mm, &mut vv, Some(&mut copy), &h).unwrap();
            let y = lightseq::ops::linear(&x, &copy, Some(&b), Activation::None).unwrap();
            let cpu = Device::Cpu;
            let want = lightseq::ops::linear(
                &t(&x.to_f32_vec().unwrap(), &[m, k], dt, &cpu),
                &t(&copy.to_f32_vec().unwrap(), &[n, k], dt, &cpu),
                Some(&t(&b.to_f32_vec().unwrap(), &[n], dt, &cpu)),
                Activation::None,
            )
            .unwrap();
            check(
                &format!("linear after adam step {step}"),
                dt,
                &y,
                &want,
                tol(dt),
            );
        }
    }
}

/// The hyperparameters of the multi-tensor Adam tests (`step` is each slot's).
fn multi_adam_hyper() -> AdamHyper {
    AdamHyper {
        lr: 2e-3,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.01,
        decoupled: true,
        step: 0,
        grad_scale: 0.25,
    }
}

/// f32 parameter, first and second moments of `n` elements from seeds `s`, `s + 2`, `s + 3`.
fn adam_state(s: u64, n: usize, d: &Device) -> [Tensor; 3] {
    let m: Vec<f32> = randn(s + 2, n).iter().map(|v| 0.1 * v).collect();
    let v: Vec<f32> = randn(s + 3, n).iter().map(|v| 0.01 * v * v).collect();
    let f = DType::F32;
    [
        t(&randn(s, n), &[n], f, d),
        t(&m, &[n], f, d),
        t(&v, &[n], f, d),
    ]
}

/// One `adam_step_all` over `state` ([param, m, v] each) with `grads` and `copies`, at the
/// bias-correction steps of `sizes` ((n, step) each).
fn step_all(
    state: &mut [[Tensor; 3]],
    grads: &[Tensor],
    copies: &mut [Option<Tensor>],
    sizes: &[(usize, u64)],
    hp: &AdamHyper,
) {
    let mut slots: Vec<ops::AdamSlot> = state
        .iter_mut()
        .zip(grads)
        .zip(copies.iter_mut())
        .zip(sizes)
        .map(|((([p, m, v], g), c), &(_, step))| ops::AdamSlot {
            param: p,
            grad: g,
            m,
            v,
            copy: c.as_mut(),
            step,
        })
        .collect();
    ops::adam_step_all(&mut slots, hp).unwrap();
}

#[test]
fn cuda_adam_step_all_matches_cpu() {
    let Some(gpu) = gpu("cuda_adam_step_all_matches_cpu") else {
        return;
    };
    // Tensors smaller and larger than one chunk of the multi-tensor launch (2^16), at
    // different bias-correction steps.
    let sizes = [(7usize, 1u64), (70_001, 3), (131_072, 1), (200_003, 12)];
    let hp = multi_adam_hyper();
    for copy_dt in [None, Some(DType::F16)] {
        let run = |d: &Device| {
            let mut ts: Vec<[Tensor; 3]> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(n, _))| adam_state(90 + 4 * i as u64, n, d))
                .collect();
            let gs: Vec<Tensor> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(n, _))| t(&randn(91 + 4 * i as u64, n), &[n], DType::F32, d))
                .collect();
            let mut copies: Vec<Option<Tensor>> = sizes
                .iter()
                .map(|&(n, _)| copy_dt.map(|dt| t(&vec![0.0; n], &[n], dt, d)))
                .collect();
            step_all(&mut ts, &gs, &mut copies, &sizes, &hp);
            (ts, gs, copies)
        };
        let ((gt, gg, gc), (ct, cg, _)) = (run(&gpu), run(&Device::Cpu));
        for (i, (g, c)) in gt.iter().zip(&ct).enumerate() {
            let pairs = [
                (&g[0], &c[0]),
                (&gg[i], &cg[i]),
                (&g[1], &c[1]),
                (&g[2], &c[2]),
            ];
            for (name, (a, b)) in ["param", "grad", "m", "v"].iter().zip(pairs) {
                check(
                    &format!("adam_step_all tensor {i} {name}"),
                    DType::F32,
                    a,
                    b,
                    1e-6,
                );
            }
            if let Some(copy) = &gc[i] {
                let want = lightseq::ops::to_dtype(&g[0], copy.dtype()).unwrap();
                assert_eq!(
                    copy.to_f32_vec().unwrap(),
                    want.to_f32_vec().unwrap(),
                    "adam_step_all tensor {i} copy"
                );
            }
        }
    }
}

/// Weight gradients kept in the compute dtype (as their GEMMs wrote them): the multi-tensor
/// Adam step and the sum of squares read them in place, mixed in one launch with f32
/// gradients, and give what the CPU gives for the same values in f32.
#[test]
fn cuda_adam_and_norm_read_16_bit_gradients() {
    let Some(gpu) = gpu("cuda_adam_and_norm_read_16_bit_gradients") else {
        return;
    };
    let cpu = Device::Cpu;
    // Sizes around one chunk (2^16) and not multiples of 4; gradients alternate between the
    // copy's dtype and f32.
    let sizes = [
        (7usize, 1u64),
        (70_001, 3),
        (131_072, 1),
        (200_003, 12),
        (65_539, 2),
    ];
    let hp = multi_adam_hyper();
    for dt in [DType::F16, DType::BF16] {
        let grad_dt = |i: usize| if i.is_multiple_of(2) { dt } else { DType::F32 };
        // The gradients' values as their dtype holds them.
        let grads: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(n, _))| {
                let g = randn(200 + i as u64, n);
                t(&g, &[n], grad_dt(i), &cpu).to_f32_vec().unwrap()
            })
            .collect();
        let run = |d: &Device, narrow: bool| {
            let mut ts: Vec<[Tensor; 3]> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(n, _))| adam_state(300 + 4 * i as u64, n, d))
                .collect();
            let gs: Vec<Tensor> = grads
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let gd = if narrow { grad_dt(i) } else { DType::F32 };
                    t(g, &[g.len()], gd, d)
                })
                .collect();
            let mut copies: Vec<Option<Tensor>> = sizes
                .iter()
                .map(|&(n, _)| d.is_cuda().then(|| t(&vec![0.0; n], &[n], dt, d)))
                .collect();
            let norm = ops::sum_squares_all(&gs.iter().collect::<Vec<_>>()).unwrap();
            step_all(&mut ts, &gs, &mut copies, &sizes, &hp);
            (ts, copies, norm)
        };
        let ((gt, gc, gnorm), (ct, _, cnorm)) = (run(&gpu, true), run(&cpu, false));
        let err = (gnorm - cnorm).abs() / cnorm;
        assert!(err < 1e-12, "{dt}: sum of squares {gnorm} vs {cnorm}");
        for (i, (g, c)) in gt.iter().zip(&ct).enumerate() {
            let what = format!("{dt} gradients, tensor {i} ({})", grad_dt(i));
            for (name, (a, b)) in ["param", "m", "v"].iter().zip(g.iter().zip(c)) {
                check(&format!("{what} {name}"), DType::F32, a, b, 1e-6);
            }
            let copy = gc[i].as_ref().unwrap();
            let want = lightseq::ops::to_dtype(&g[0], dt).unwrap();
            assert_eq!(
                copy.to_f32_vec().unwrap(),
                want.to_f32_vec().unwrap(),
                "{what} copy"
            );
        }
    }
}

#[test]
fn cuda_dropout_masks_equal_cpu() {
    let Some(gpu) = gpu("cuda_dropout_masks_equal_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let n = 10_007; // not a multiple of 4
    let x = randn(80, n);
    for (seed, offset) in [(1234u64, 5u64), (0x1234_5678_9abc_def0, 1u64 << 40)] {
        for dt in DTYPES {
            let run = |d: &Device| {
                ops::dropout(&t(&x, &[n], dt, d), 0.1, seed, offset)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap()
            };
            let (g, c) = (run(&gpu), run(&cpu));
            let zeros = |v: &[f32]| v.iter().filter(|&&e| e == 0.0).count();
            let (zg, zc) = (zeros(&g), zeros(&c));
            assert_eq!(zg, zc, "dropout {dt} seed {seed}: zero counts");
            assert!(
                (zc as f64 / n as f64 - 0.1).abs() < 0.02,
                "dropout {dt}: rate {zc}/{n}"
            );
            for i in 0..n {
                assert_eq!(
                    g[i] == 0.0,
                    c[i] == 0.0,
                    "dropout {dt} seed {seed}: mask at {i}"
                );
            }
            if dt == DType::F32 {
                assert_eq!(g, c, "dropout f32 seed {seed}: values");
            } else {
                let err = rel_err(&g, &c);
                assert!(err <= tol(dt), "dropout {dt}: rel err {err}");
            }
            eprintln!("dropout {dt:<5} seed {seed:#x}: {zg} of {n} dropped, masks equal");
        }
    }
}

#[test]
fn cuda_dtype_casts_match_cpu() {
    let Some(gpu) = gpu("cuda_dtype_casts_match_cpu") else {
        return;
    };
    let x = scaled(21, 4099, 3.0);
    for from in DTYPES {
        for to in DTYPES {
            let run = |d: &Device| lightseq::ops::to_dtype(&t(&x, &[4099], from, d), to).unwrap();
            let (g, c) = (run(&gpu), run(&Device::Cpu));
            assert_eq!(g.dtype(), to);
            // Rounding to the narrower type is exact on both sides: the values are equal.
            assert_eq!(
                g.to_f32_vec().unwrap(),
                c.to_f32_vec().unwrap(),
                "cast {from} -> {to}"
            );
        }
    }
}

#[test]
fn cuda_add_layer_norm_matches_cpu() {
    let Some(gpu) = gpu("cuda_add_layer_norm_matches_cpu") else {
        return;
    };
    // h = 37 runs a warp per row and 1031 a block per row; 256 and 768 (f16, bf16) the
    // register-cached kernel.
    for dt in DTYPES {
        for (rows, h) in [(33, 37), (19, 768), (7, 1031), (21, 256)] {
            let (x, y) = (randn(31, rows * h), randn(32, rows * h));
            let g: Vec<f32> = randn(33, h).iter().map(|v| 1.0 + 0.1 * v).collect();
            let b = scaled(34, h, 0.1);
            for with_y in [false, true] {
                let run = |d: &Device| {
                    let yt = t(&y, &[rows, h], dt, d);
                    ops::add_layer_norm(
                        &t(&x, &[rows, h], dt, d),
                        with_y.then_some(&yt),
                        &t(&g, &[h], dt, d),
                        &t(&b, &[h], dt, d),
                        1e-5,
                    )
                    .unwrap()
                };
                let ((gs, go), (cs, co)) = (run(&gpu), run(&Device::Cpu));
                let what = format!("add_layer_norm {rows}x{h} with y {with_y}");
                check(&what, dt, &go, &co, tol(dt));
                assert_eq!(gs.is_some(), with_y);
                if let (Some(gs), Some(cs)) = (gs, cs) {
                    check(&format!("{what} (sum)"), dt, &gs, &cs, tol(dt));
                }
            }
        }
    }
}

/// An activation's backward with the following bias gradient summed in the same pass (one
/// CUDA launch where the columns fill 16-byte packs, else the two ops) against the CPU's
/// separate ops, added to a bias accumulator that already holds values; shapes with one
/// row chunk, many, and columns that do not fill packs.
#[test]
fn cuda_activation_backward_bias_matches_cpu() {
    let Some(gpu) = gpu("cuda_activation_backward_bias_matches_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    for (rows, cols) in [(37, 64), (1500, 96), (19, 40), (23, 36), (5, 1030)] {
        let (pre, dy) = (scaled(60, rows * cols, 1.5), scaled(61, rows * cols, 1.0));
        let acc0 = scaled(62, cols, 0.5);
        for dt in DTYPES {
            for act in ACTS {
                let run = |d: &Device| {
                    let mut acc = t(&acc0, &[cols], DType::F32, d);
                    let dx = ops::activation_backward_bias_into(
                        &t(&pre, &[rows, cols], dt, d),
                        &t(&dy, &[rows, cols], dt, d),
                        act,
                        &mut acc,
                    )
                    .unwrap();
                    (dx, acc)
                };
                let ((gdx, gacc), (cdx, cacc)) = (run(&gpu), run(&cpu));
                let what = format!("activation_backward_bias {act:?} {rows}x{cols}");
                check(&format!("{what} dx"), dt, &gdx, &cdx, tol(dt));
                // Column sums of the rounded dx, so within dx's tolerance.
                check(&format!("{what} bias"), DType::F32, &gacc, &cacc, tol(dt));
            }
        }
    }
}
