//! Ops: the CPU bodies against naive references, and CUDA against the CPU for every dtype
//! on random inputs of odd shapes.
#![allow(
    clippy::too_many_arguments,
    clippy::needless_range_loop,
    clippy::type_complexity
)]

mod common;

use common::{gpu, randn, rel_err};
use lightseq::ops::{self, Activation};
use lightseq::{DType, Device, Tensor};

const ACTS: [Activation; 6] = [
    Activation::None,
    Activation::Gelu,
    Activation::GeluTanh,
    Activation::Relu,
    Activation::Silu,
    Activation::QuickGelu,
];

fn t(data: &[f32], shape: &[usize], dt: DType, dev: &Device) -> Tensor {
    Tensor::from_f32(data, shape, dt, dev).unwrap()
}

fn naive_linear(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    act: Activation,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                .sum();
            y[i * n + j] = act.apply((s + b[j] as f64) as f32);
        }
    }
    y
}

fn naive_layer_norm(x: &[f32], r: &[f32], g: &[f32], b: &[f32], h: usize, eps: f64) -> Vec<f32> {
    let mut out = Vec::new();
    for (xr, rr) in x.chunks(h).zip(r.chunks(h)) {
        let v: Vec<f64> = xr
            .iter()
            .zip(rr)
            .map(|(a, b)| *a as f64 + *b as f64)
            .collect();
        let mean = v.iter().sum::<f64>() / h as f64;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / h as f64;
        for j in 0..h {
            out.push(((v[j] - mean) / (var + eps).sqrt() * g[j] as f64 + b[j] as f64) as f32);
        }
    }
    out
}

/// Softmax(q k^T * scale + mask) v with an explicit score matrix, in f64.
fn naive_attention(
    qkv: &[f32],
    b: usize,
    l: usize,
    heads: usize,
    d: usize,
    lens: &[usize],
    causal: bool,
    scale: f32,
) -> Vec<f32> {
    let hid = heads * d;
    let at = |bb: usize, t: usize, part: usize, h: usize, e: usize| {
        qkv[(bb * l + t) * 3 * hid + part * hid + h * d + e] as f64
    };
    let mut out = vec![0f32; b * l * hid];
    for bb in 0..b {
        for h in 0..heads {
            for i in 0..l {
                let visible: Vec<usize> = (0..l)
                    .filter(|&j| j < lens[bb] && (!causal || j <= i))
                    .collect();
                if visible.is_empty() {
                    continue;
                }
                let s: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|e| at(bb, i, 0, h, e) * at(bb, j, 1, h, e))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for e in 0..d {
                    let o: f64 = visible
                        .iter()
                        .zip(&s)
                        .map(|(&j, x)| (x - mx).exp() / z * at(bb, j, 2, h, e))
                        .sum();
                    out[(bb * l + i) * hid + h * d + e] = o as f32;
                }
            }
        }
    }
    out
}

#[test]
fn cpu_linear_matches_naive_for_every_activation() {
    let (m, n, k) = (7, 13, 19);
    let (x, w, b) = (randn(1, m * k), randn(2, n * k), randn(3, n));
    let dev = Device::Cpu;
    for act in ACTS {
        let y = ops::linear(
            &t(&x, &[m, k], DType::F32, &dev),
            &t(&w, &[n, k], DType::F32, &dev),
            Some(&t(&b, &[n], DType::F32, &dev)),
            act,
        )
        .unwrap();
        assert_eq!(y.shape(), &[m, n]);
        let err = rel_err(
            &y.to_f32_vec().unwrap(),
            &naive_linear(&x, &w, &b, m, n, k, act),
        );
        assert!(err < 1e-5, "{act:?}: {err}");
    }
}

#[test]
fn activations_match_their_definitions() {
    // Values from the closed forms, computed independently in f64.
    let x = [-2.5f64, -0.7, 0.0, 0.3, 1.9];
    for &v in &x {
        let erf_gelu = 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
        let tanh_gelu = 0.5
            * v
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
        let cases = [
            (Activation::Gelu, erf_gelu),
            (Activation::GeluTanh, tanh_gelu),
            (Activation::Relu, v.max(0.0)),
            (Activation::Silu, v / (1.0 + (-v).exp())),
            (Activation::QuickGelu, v / (1.0 + (-1.702 * v).exp())),
        ];
        for (act, want) in cases {
            let got = act.apply(v as f32) as f64;
            assert!(
                (got - want).abs() < 1e-6,
                "{act:?}({v}) = {got}, want {want}"
            );
        }
    }
}

#[test]
fn cpu_layer_norm_matches_naive() {
    let (rows, h) = (5, 37);
    let (x, r, g, b) = (
        randn(4, rows * h),
        randn(5, rows * h),
        randn(6, h),
        randn(7, h),
    );
    let dev = Device::Cpu;
    let y = ops::layer_norm(
        &t(&x, &[rows, h], DType::F32, &dev),
        Some(&t(&r, &[rows, h], DType::F32, &dev)),
        &t(&g, &[h], DType::F32, &dev),
        &t(&b, &[h], DType::F32, &dev),
        1e-5,
    )
    .unwrap();
    let err = rel_err(
        &y.to_f32_vec().unwrap(),
        &naive_layer_norm(&x, &r, &g, &b, h, 1e-5),
    );
    assert!(err < 1e-6, "{err}");
}

/// Random x [m, k], w [n, k], bias [n], residual [m, n], gamma and beta [n] of a
/// `linear_add_layer_norm` case, from seeds `seed` to `seed + 5`.
fn linear_norm_case(seed: u64, m: usize, n: usize, k: usize) -> [Vec<f32>; 6] {
    let sizes = [m * k, n * k, n, m * n, n, n];
    std::array::from_fn(|i| randn(seed + i as u64, sizes[i]))
}

#[test]
fn cpu_linear_add_layer_norm_matches_naive_and_checks_shapes() {
    let (m, n, k) = (6, 19, 23);
    let [x, w, b, r, g, bb] = linear_norm_case(40, m, n, k);
    let dev = Device::Cpu;
    let f = |v: &[f32], shape: &[usize]| t(v, shape, DType::F32, &dev);
    let (xt, wt, bt, rt, gt, btt) = (
        f(&x, &[2, 3, k]),
        f(&w, &[n, k]),
        f(&b, &[n]),
        f(&r, &[2, 3, n]),
        f(&g, &[n]),
        f(&bb, &[n]),
    );
    let y = ops::linear_add_layer_norm(&xt, (&wt, Some(&bt)), &rt, (&gt, &btt), 1e-5).unwrap();
    assert_eq!(y.shape(), [2, 3, n]);
    let lin = naive_linear(&x, &w, &b, m, n, k, Activation::None);
    let want = naive_layer_norm(&lin, &r, &g, &bb, n, 1e-5);
    let err = rel_err(&y.to_f32_vec().unwrap(), &want);
    assert!(err < 1e-5, "{err}");
    // Mismatched shapes are errors, not panics.
    let wrong_r = f(&r[..5 * n], &[5, n]);
    assert!(
        ops::linear_add_layer_norm(&xt, (&wt, Some(&bt)), &wrong_r, (&gt, &btt), 1e-5).is_err()
    );
    assert!(
        ops::linear_add_layer_norm(&xt, (&wt, Some(&bt)), &rt, (&btt, &f(&g, &[1, n])), 1e-5)
            .is_err()
    );
    assert!(ops::linear_add_layer_norm(&rt, (&wt, None), &rt, (&gt, &btt), 1e-5).is_err());
    // No input features: an error, not a tensor whose shape its data does not fill.
    let (x0, w0) = (f(&[], &[m, 0]), f(&[], &[n, 0]));
    assert!(ops::linear(&x0, &w0, Some(&bt), Activation::None).is_err());
    assert!(
        ops::linear_add_layer_norm(&x0, (&w0, None), &f(&r, &[m, n]), (&gt, &btt), 1e-5).is_err()
    );
}

#[test]
fn cpu_attention_matches_naive() {
    let (b, l, heads, d) = (3, 11, 3, 7);
    let qkv = randn(8, b * l * 3 * heads * d);
    let lens = [11, 4, 0];
    for causal in [false, true] {
        let y = ops::self_attention(
            &t(&qkv, &[b, l, 3 * heads * d], DType::F32, &Device::Cpu),
            heads,
            &lens,
            causal,
            0.37,
        )
        .unwrap();
        let want = naive_attention(&qkv, b, l, heads, d, &lens, causal, 0.37);
        let got = y.to_f32_vec().unwrap();
        // Compare real rows only: rows past a sequence's length are unspecified.
        let hid = heads * d;
        let mut g = Vec::new();
        let mut w = Vec::new();
        for bb in 0..b {
            for i in 0..lens[bb] {
                let r = (bb * l + i) * hid..(bb * l + i + 1) * hid;
                g.extend_from_slice(&got[r.clone()]);
                w.extend_from_slice(&want[r]);
            }
        }
        let err = rel_err(&g, &w);
        assert!(err < 1e-5, "causal={causal}: {err}");
    }
}

#[test]
fn cpu_embed_sums_rows_and_rejects_bad_ids() {
    let dev = Device::Cpu;
    let (v1, v2, h) = (9, 4, 6);
    let (t1, t2) = (randn(9, v1 * h), randn(10, v2 * h));
    let ids1 = [3, 0, 8];
    let ids2 = [1, 3, 2];
    let e = ops::embed(&[
        (
            &t(&t1, &[v1, h], DType::F32, &dev),
            &Tensor::from_i32(&ids1, &[3], &dev).unwrap(),
        ),
        (
            &t(&t2, &[v2, h], DType::F32, &dev),
            &Tensor::from_i32(&ids2, &[3], &dev).unwrap(),
        ),
    ])
    .unwrap();
    let got = e.to_f32_vec().unwrap();
    for i in 0..3 {
        for j in 0..h {
            let want = t1[ids1[i] as usize * h + j] + t2[ids2[i] as usize * h + j];
            assert_eq!(got[i * h + j], want);
        }
    }
    let bad = Tensor::from_i32(&[9], &[1], &dev).unwrap();
    assert!(ops::embed(&[(&t(&t1, &[v1, h], DType::F32, &dev), &bad)]).is_err());
}

fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 1e-2,
        _ => 3e-2,
    }
}

#[test]
fn cuda_ops_match_cpu_for_every_dtype() {
    let Some(gpu) = gpu("cuda_ops_match_cpu_for_every_dtype") else {
        return;
    };
    let cpu = Device::Cpu;
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let tol = tolerance(dt);
        let check = |name: &str, a: &Tensor, b: &Tensor| {
            assert_eq!(a.shape(), b.shape(), "{name} {dt}");
            let err = rel_err(&a.to_f32_vec().unwrap(), &b.to_f32_vec().unwrap());
            assert!(err <= tol, "{name} {dt}: rel err {err} > {tol}");
            eprintln!("{name:<14} {dt:<5} rel err {err:.2e}");
        };
        // Linear with and without bias, every activation: odd sizes (the activation pass
        // element by element), rows of whole 16-byte packs (pack by pack), and a head as
        // wide as GPT2's vocabulary. In 16 bits, up to 32 rows with k a multiple of 32 go
        // to the few-row kernels: one row and sixteen (one row tile), columns past the last
        // tile, fewer columns than a tile, k over one chunk or many warps' rounds, blocks of
        // 16 and 32 columns; 17-32 rows take two row tiles (27 x 700 x 512, 32 x 512 x 2048,
        // 29 x 8200 x 64 with blocks of 32 columns, 17 x 96 x 4096, and on sm_90 and later
        // 30 x 2304 x 768). On sm_90, 33-128 rows (and fewer where k is not a multiple of
        // 32) go to the warpgroup-MMA kernel where its blocks fit: 33 x 768 x 768,
        // 64 x 3072 x 768, 128 x 2048 x 512, 45 x 1536 x 512 in clusters of 4 blocks,
        // 96 x 256 x 2048 in clusters of 8;
        // 24 x 64 x 40 and 120 x 1000 x 96 with a part-filled chunk of k; 128 x 520 x 256
        // with a part-filled block of columns; 100 x 768 x 3072 goes to cuBLASLt. More rows
        // go to cuBLASLt (on sm_90 those with an activation cuBLASLt's epilogues lack to the
        // pipelined warpgroup-MMA kernel where its blocks fit one wave), and on sm_90 under
        // LIGHTSEQ_TILED_GEMM=all
        // (scripts/gpu-check.sh runs this test so too) all to that kernel, each of its blocks
        // (warpgroups x columns) once: 129 x 64 x 64 (1 x 128, fewer columns than a block),
        // 1030 x 768 x 768 (1 x 128, a part-filled row tile), 257 x 520 x 4104 (1 x 128, a
        // long k ending in a part-filled chunk), 1024 x 3072 x 200 (2 x 192), 2830 x 320 x 40
        // (1 x 192), 1024 x 2048 x 72 (1 x 256), 2830 x 576 x 64 (2 x 128) and
        // 4096 x 1024 x 64 (2 x 256).
        for (m, n, k) in [
            (37, 53, 71),
            (24, 64, 40),
            (4, 50257, 24),
            (1, 40, 32),
            (16, 1000, 96),
            (9, 7, 3072),
            (3, 2304, 768),
            (5, 8200, 64),
            (27, 700, 512),
            (32, 512, 2048),
            (29, 8200, 64),
            (45, 1536, 512),
            (128, 520, 256),
            (33, 768, 768),
            (64, 3072, 768),
            (100, 768, 3072),
            (128, 2048, 512),
            (17, 96, 4096),
            (30, 2304, 768),
            (120, 1000, 96),
            (129, 64, 64),
            (96, 256, 2048),
            (1030, 768, 768),
            (257, 520, 4104),
            (1024, 3072, 200),
            (2830, 320, 40),
            (1024, 2048, 72),
            (2830, 576, 64),
            (4096, 1024, 64),
        ] {
            let (x, w, b) = (randn(11, m * k), randn(12, n * k), randn(13, n));
            for (i, act) in ACTS.into_iter().enumerate() {
                let bias = i % 2 == 0;
                let run = |d: &Device| {
                    ops::linear(
                        &t(&x, &[m, k], dt, d),
                        &t(&w, &[n, k], dt, d),
                        bias.then(|| t(&b, &[n], dt, d)).as_ref(),
                        act,
                    )
                    .unwrap()
                };
                check(&format!("linear {act:?} {n}"), &run(&gpu), &run(&cpu));
            }
        }
        // Layer norm with a residual: widths below and above one block, rows of whole
        // 16-byte packs for the packed kernel (a pack a thread: 768; 4104, 513 packs in 16
        // bits; 8192, its limit of 1024 packs in 16 bits and over it in f32), from 1024 rows
        // for the warp-a-row kernel where a row has at most 128 packs (1030 x 768: 96 packs
        // in 16 bits, 192 in f32 back on the packed kernel; 1029 x 200: 25 and 50, lanes
        // part-filled, the last block of 4 rows too; 1024 x 1024: 128 packs in 16 bits),
        // and rows of other widths enough for the training kernel (from 1024 rows).
        for (rows, h) in [
            (9, 45),
            (9, 1543),
            (7, 768),
            (3, 64),
            (4, 4104),
            (2, 8192),
            (1030, 768),
            (1029, 200),
            (1024, 1024),
            (1030, 774),
        ] {
            let (x, r, g, bb) = (
                randn(14, rows * h),
                randn(15, rows * h),
                randn(16, h),
                randn(17, h),
            );
            let run = |d: &Device, res: bool| {
                ops::layer_norm(
                    &t(&x, &[rows, h], dt, d),
                    res.then(|| t(&r, &[rows, h], dt, d)).as_ref(),
                    &t(&g, &[h], dt, d),
                    &t(&bb, &[h], dt, d),
                    1e-6,
                )
                .unwrap()
            };
            for res in [false, true] {
                check("layer_norm", &run(&gpu, res), &run(&cpu, res));
            }
        }
        // A post-norm block's GEMM, residual and layer norm (ops::linear_add_layer_norm).
        // On sm_90 in 16 bits under LIGHTSEQ_FUSED_LN=1 (scripts/gpu-check.sh runs this test
        // so too), more than 128 rows take the GEMM with the layer norm in its epilogue,
        // every block width of it once: clusters of 8 x 96 columns (a part-filled
        // row band; k of many chunks), 8 x 64 (a part-filled chunk of k), 8 x 128, 6 x 64,
        // 1 x 96; without a bias once. 1000 columns (no cluster spans them) and 100 rows run
        // the GEMM and the layer norm apart.
        for (m, n, k, bias) in [
            (1030, 768, 3072, true),
            (200, 512, 520, true),
            (300, 1024, 64, false),
            (257, 384, 768, true),
            (129, 96, 128, true),
            (260, 1000, 64, true),
            (100, 768, 768, true),
        ] {
            let [x, w, b, r, g, bb] = linear_norm_case(30, m, n, k);
            let run = |d: &Device| {
                let bt = bias.then(|| t(&b, &[n], dt, d));
                ops::linear_add_layer_norm(
                    &t(&x, &[m, k], dt, d),
                    (&t(&w, &[n, k], dt, d), bt.as_ref()),
                    &t(&r, &[m, n], dt, d),
                    (&t(&g, &[n], dt, d), &t(&bb, &[n], dt, d)),
                    1e-5,
                )
                .unwrap()
            };
            check(
                &format!("linear_add_ln {m}x{n}x{k}"),
                &run(&gpu),
                &run(&cpu),
            );
        }
        // Add.
        let (a, c) = (randn(18, 1001), randn(19, 1001));
        check(
            "add",
            &ops::add(&t(&a, &[1001], dt, &gpu), &t(&c, &[1001], dt, &gpu)).unwrap(),
            &ops::add(&t(&a, &[1001], dt, &cpu), &t(&c, &[1001], dt, &cpu)).unwrap(),
        );
        // Embedding sum of three tables.
        let h = 29;
        let tabs = [randn(20, 17 * h), randn(21, 5 * h), randn(22, 3 * h)];
        let ids: [Vec<i32>; 3] = [
            vec![16, 0, 5, 9, 2],
            vec![4, 1, 0, 3, 2],
            vec![2, 2, 0, 1, 0],
        ];
        let run = |d: &Device| {
            let tt: Vec<Tensor> = tabs
                .iter()
                .zip([17, 5, 3])
                .map(|(v, r)| t(v, &[r, h], dt, d))
                .collect();
            let ii: Vec<Tensor> = ids
                .iter()
                .map(|v| Tensor::from_i32(v, &[5], d).unwrap())
                .collect();
            ops::embed(&[(&tt[0], &ii[0]), (&tt[1], &ii[1]), (&tt[2], &ii[2])]).unwrap()
        };
        check("embed", &run(&gpu), &run(&cpu));
        // Attention: ragged lengths (including an empty one), causal and not, several
        // head sizes, a length past one 32-key tile.
        // The last case has 2^20 scores and runs as GEMMs on CUDA; the others in the fused
        // kernel.
        for (b, l, heads, d) in [
            (3, 45, 3, 64),
            (2, 7, 2, 24),
            (1, 130, 1, 128),
            (2, 33, 4, 80),
            (4, 256, 4, 32),
        ] {
            let qkv = randn(23 + l as u64, b * l * 3 * heads * d);
            let mut lens: Vec<usize> = (0..b).map(|i| l - (i * 5) % l).collect();
            if b > 2 {
                lens[2] = 0;
            }
            for causal in [false, true] {
                let run = |dev: &Device| {
                    ops::self_attention(
                        &t(&qkv, &[b, l, 3 * heads * d], dt, dev),
                        heads,
                        &lens,
                        causal,
                        1.0 / (d as f32).sqrt(),
                    )
                    .unwrap()
                };
                let (g, c) = (
                    run(&gpu).to_f32_vec().unwrap(),
                    run(&cpu).to_f32_vec().unwrap(),
                );
                let hid = heads * d;
                let (mut gg, mut cc) = (Vec::new(), Vec::new());
                for bb in 0..b {
                    let r = bb * l * hid..(bb * l + lens[bb]) * hid;
                    gg.extend_from_slice(&g[r.clone()]);
                    cc.extend_from_slice(&c[r]);
                }
                let err = rel_err(&gg, &cc);
                assert!(
                    err <= tol,
                    "attention {b}x{l}x{heads}x{d} causal={causal} {dt}: {err}"
                );
                eprintln!(
                    "attention      {dt:<5} {b}x{l}x{heads}x{d} causal={causal} rel err {err:.2e}"
                );
            }
        }
    }
}

/// Naive general attention in f64: explicit score rows over visible keys.
#[allow(clippy::type_complexity)]
fn naive_general_attention(
    q: (&[f32], usize, usize, usize), // data, len, width, col
    k: (&[f32], usize, usize, usize),
    v: (&[f32], usize, usize, usize),
    batch: usize,
    o: &ops::AttentionOptions,
    table: Option<&[f32]>,
) -> Vec<f32> {
    let d = o.head_dim;
    let mut out = vec![0f32; batch * q.1 * o.heads * d];
    for b in 0..batch {
        for i in 0..q.1 {
            let pos = o.q_offset + i;
            for h in 0..o.heads {
                let kh = h / (o.heads / o.kv_heads);
                let vis: Vec<usize> = (0..k.1)
                    .filter(|&j| {
                        j >= o.key_ranges[b].0
                            && j < o.key_ranges[b].1
                            && (!o.causal || j <= pos)
                            && o.window.is_none_or(|w| j + w > pos)
                    })
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let mut x: f64 = (0..d)
                            .map(|e| {
                                q.0[(b * q.1 + i) * q.2 + q.3 + h * d + e] as f64
                                    * k.0[(b * k.1 + j) * k.2 + k.3 + kh * d + e] as f64
                            })
                            .sum::<f64>()
                            * o.scale as f64;
                        if let (Some(t), Some(bias)) = (table, &o.bias) {
                            x += t[bias.buckets[j + q.1 - 1 - i] as usize * o.heads + h] as f64;
                        }
                        x
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for e in 0..d {
                    let val: f64 = vis
                        .iter()
                        .zip(&s)
                        .map(|(&j, x)| {
                            (x - mx).exp() / z * v.0[(b * v.1 + j) * v.2 + v.3 + kh * d + e] as f64
                        })
                        .sum();
                    out[((b * q.1 + i) * o.heads + h) * d + e] = val as f32;
                }
            }
        }
    }
    out
}

/// Cases covering grouped heads, cross attention (len_k != len_q), query offsets (cached
/// keys), sliding windows, key ranges that start past 0 (left padding) and relative bias.
fn general_cases() -> Vec<(
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
    usize,
    Option<usize>,
    bool,
)> {
    // (batch, len_q, len_k, heads, kv_heads, head_dim, causal, q_offset, window, bias)
    vec![
        (2, 9, 9, 4, 2, 16, true, 0, None, false),
        (3, 5, 17, 2, 2, 8, false, 0, None, true),
        (2, 3, 40, 6, 1, 32, true, 37, None, false),
        (2, 12, 12, 2, 2, 12, true, 0, Some(4), true),
        (1, 1, 70, 8, 4, 64, true, 69, Some(33), false),
        // Decode steps over more keys than one tile of the single-query kernel, with the
        // largest head and one that is not a power of two.
        (3, 1, 300, 4, 4, 128, true, 299, None, true),
        (2, 1, 150, 3, 1, 80, false, 0, None, false),
        // A decode step of many rows (beam search at batch 16) with grouped heads, a window,
        // left padding and relative bias.
        (64, 1, 40, 4, 2, 64, true, 39, Some(30), true),
        // Decode steps with heads of 32 (two packs of a row a thread in f16) over two tiles.
        (8, 1, 150, 2, 2, 32, false, 0, None, false),
        // Cross attention with 2^20 scores: the GEMM path on CUDA in f32, the flash kernel
        // in f16 and bf16.
        (4, 256, 256, 4, 4, 16, false, 0, None, false),
        // Flash-kernel cases (f16/bf16): windows across key tiles, queries over several
        // blocks with an offset, a head narrower than its kernel's bound.
        (2, 70, 70, 4, 2, 64, true, 0, Some(20), false),
        (2, 100, 150, 2, 2, 128, true, 50, None, false),
        (3, 2, 65, 2, 1, 48, false, 0, None, false),
        (1, 200, 131, 3, 3, 96, false, 0, None, false),
        // Decode steps whose beams share keys with enough work for the grouped tensor-core
        // kernel (heads x key rows x keys >= 8192 in f16/bf16), heads of 64, 32 and 128,
        // with a window, relative bias and grouped heads.
        (32, 1, 300, 4, 4, 64, true, 299, Some(200), false),
        (16, 1, 520, 4, 4, 32, false, 0, None, true),
        (8, 1, 600, 4, 2, 128, true, 599, None, false),
    ]
}

fn run_general(
    dev: &Device,
    dt: DType,
    case: usize,
) -> (Vec<f32>, Vec<f32>, Vec<(usize, usize)>, usize, usize) {
    run_general_shared(dev, dt, case, 1, false)
}

/// (case of `general_cases`, query sequences per key sequence): shared keys and values
/// in the single-query kernels (heads of 64, 128 and 32; the last three enough for the
/// grouped one) and gathered for many queries.
const SHARED_CASES: [(usize, usize); 8] = [
    (7, 4),
    (5, 3),
    (8, 2),
    (2, 2),
    (0, 2),
    (14, 4),
    (15, 2),
    (16, 2),
];

/// A general case with keys and values for `b / share` sequences, query sequence i
/// attending to key sequence i / share; the naive reference gets them repeated. q sits at
/// column 3 of a wider tensor, or with `q_aligned` at column 0 of rows of whole 16-byte
/// packs (the tensor-core decode kernels need q's rows aligned).
fn run_general_shared(
    dev: &Device,
    dt: DType,
    case: usize,
    share: usize,
    q_aligned: bool,
) -> (Vec<f32>, Vec<f32>, Vec<(usize, usize)>, usize, usize) {
    run_general_scaled(dev, dt, case, share, q_aligned, 0.3)
}

/// [`run_general_shared`] with the scores scaled by `scale`.
fn run_general_scaled(
    dev: &Device,
    dt: DType,
    case: usize,
    share: usize,
    q_aligned: bool,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<(usize, usize)>, usize, usize) {
    let (b, lq, lk, heads, kvh, d, causal, q_offset, window, with_bias) = general_cases()[case];
    let (qc, qw) = if q_aligned {
        (0, heads * d + 8)
    } else {
        (3, heads * d + 5)
    };
    let kvw = 2 * kvh * d; // k and v packed side by side
    let qd = randn(100 + case as u64, b * lq * qw);
    let kvd = randn(200 + case as u64, b / share * lk * kvw);
    let kv_rows: Vec<f32> = (0..b)
        .flat_map(|i| kvd[i / share * lk * kvw..][..lk * kvw].iter().copied())
        .collect();
    let key_ranges: Vec<(usize, usize)> = (0..b).map(|i| ((i * 3) % 4, lk - (i * 2) % 3)).collect();
    let n_buckets = 7;
    let table = randn(300 + case as u64, n_buckets * heads);
    let buckets: Vec<i32> = (0..q_offset + lq + lk)
        .map(|r| ((r * 5) % n_buckets) as i32)
        .collect();
    let table_t = Tensor::from_f32(&table, &[n_buckets, heads], DType::F32, dev).unwrap();
    let opts = ops::AttentionOptions {
        heads,
        kv_heads: kvh,
        head_dim: d,
        scale,
        causal,
        q_offset,
        window,
        key_ranges: key_ranges.clone(),
        ranges_on_device: None,
        bias: with_bias.then(|| ops::RelativeBias {
            table: &table_t,
            buckets: buckets.clone(),
        }),
    };
    let qt = t(&qd, &[b, lq, qw], dt, dev);
    let kvt = t(&kvd, &[b / share, lk, kvw], dt, dev);
    let got = ops::attention(
        ops::Heads {
            tensor: &qt,
            col: qc,
        },
        ops::Heads {
            tensor: &kvt,
            col: 0,
        },
        ops::Heads {
            tensor: &kvt,
            col: kvh * d,
        },
        &opts,
    )
    .unwrap();
    assert_eq!(got.shape(), &[b, lq, heads * d]);
    let want = naive_general_attention(
        (&DType::round_f32(dt, &qd), lq, qw, qc),
        (&DType::round_f32(dt, &kv_rows), lk, kvw, 0),
        (&DType::round_f32(dt, &kv_rows), lk, kvw, kvh * d),
        b,
        &opts,
        Some(&table),
    );
    (got.to_f32_vec().unwrap(), want, key_ranges, lq, heads * d)
}

#[test]
fn cpu_general_attention_matches_naive() {
    for case in 0..general_cases().len() {
        let (got, want, ..) = run_general(&Device::Cpu, DType::F32, case);
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "case {case}: {err}");
    }
    for (case, share) in SHARED_CASES {
        let (got, want, ..) = run_general_shared(&Device::Cpu, DType::F32, case, share, false);
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "case {case} sharing keys by {share}: {err}");
    }
    for (case, scale) in NON_POSITIVE_SCALES {
        let (got, want, ..) = run_general_scaled(&Device::Cpu, DType::F32, case, 1, false, scale);
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "case {case} scale {scale}: {err}");
    }
}

/// (case of `general_cases`, scale): scales the flash kernel does not take (it folds a
/// positive scale into its exponent), on cases that it takes in 16 bits at scale 0.3 (a
/// zero scale averages the visible values).
const NON_POSITIVE_SCALES: [(usize, f32); 4] = [(9, -0.3), (10, 0.0), (11, -0.05), (13, -0.3)];

fn naive_rms(x: &[f32], g: &[f32], h: usize, eps: f64) -> Vec<f32> {
    x.chunks(h)
        .flat_map(|r| {
            let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            r.iter()
                .zip(g)
                .map(move |(v, gg)| (*v as f64 / (ms + eps).sqrt() * *gg as f64) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn naive_rotary(
    x: &[f32],
    rows: usize,
    width: usize,
    col: usize,
    heads: usize,
    hd: usize,
    pos: &[i32],
    inv: &[f32],
    sc: f32,
) -> Vec<f32> {
    let mut y = x.to_vec();
    let half = inv.len();
    for r in 0..rows {
        for h in 0..heads {
            for p in 0..half {
                let ang = pos[r] as f64 * inv[p] as f64;
                let (s, c) = (ang.sin() * sc as f64, ang.cos() * sc as f64);
                let i1 = r * width + col + h * hd + p;
                let (a, b) = (x[i1] as f64, x[i1 + half] as f64);
                y[i1] = (a * c - b * s) as f32;
                y[i1 + half] = (b * c + a * s) as f32;
            }
        }
    }
    y
}

#[test]
fn cpu_rms_norm_glu_rotary_scale_match_naive() {
    let dev = Device::Cpu;
    let (rows, h) = (6, 41);
    let (x, r, g) = (randn(40, rows * h), randn(41, rows * h), randn(42, h));
    let y = ops::rms_norm(
        &t(&x, &[rows, h], DType::F32, &dev),
        Some(&t(&r, &[rows, h], DType::F32, &dev)),
        &t(&g, &[h], DType::F32, &dev),
        1e-6,
    )
    .unwrap();
    let sum: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
    assert!(rel_err(&y.to_f32_vec().unwrap(), &naive_rms(&sum, &g, h, 1e-6)) < 1e-6);

    let xx = randn(43, rows * 2 * h);
    for act in [Activation::Silu, Activation::GeluTanh] {
        let y = ops::glu(&t(&xx, &[rows, 2 * h], DType::F32, &dev), act).unwrap();
        let want: Vec<f32> = xx
            .chunks(2 * h)
            .flat_map(|c| (0..h).map(move |j| act.apply(c[j]) * c[h + j]))
            .collect();
        assert!(rel_err(&y.to_f32_vec().unwrap(), &want) < 1e-6);
    }

    let s = ops::scale(&t(&x, &[rows, h], DType::F32, &dev), -0.37).unwrap();
    let want: Vec<f32> = x.iter().map(|a| a * -0.37).collect();
    assert_eq!(s.to_f32_vec().unwrap(), want);

    let (b, l, width, col, heads, hd) = (2, 5, 70, 6, 3, 20);
    let xr = randn(44, b * l * width);
    let pos: Vec<i32> = (0..b * l).map(|i| (i * 3 + 1) as i32).collect();
    let inv: Vec<f32> = (0..8)
        .map(|p| 10000f32.powf(-(2 * p) as f32 / 16.0))
        .collect();
    let mut xt = t(&xr, &[b, l, width], DType::F32, &dev);
    ops::rotary(
        &mut xt,
        col,
        heads,
        hd,
        &Tensor::from_i32(&pos, &[b * l], &dev).unwrap(),
        &t(&inv, &[8], DType::F32, &dev),
        1.25,
    )
    .unwrap();
    let want = naive_rotary(&xr, b * l, width, col, heads, hd, &pos, &inv, 1.25);
    assert!(rel_err(&xt.to_f32_vec().unwrap(), &want) < 1e-6);
}

#[test]
fn cuda_general_ops_match_cpu_for_every_dtype() {
    let Some(gpu) = gpu("cuda_general_ops_match_cpu_for_every_dtype") else {
        return;
    };
    let cpu = Device::Cpu;
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let tol = tolerance(dt);
        // The GPU against the CPU (within the dtype's tolerance), the CPU against the f64
        // reference.
        let agree = |what: String, g: &[f32], c: &[f32], want: &[f32]| {
            let (eg, ec) = (rel_err(g, c), rel_err(c, want));
            assert!(eg <= tol, "attention {what} {dt}: gpu vs cpu {eg}");
            assert!(ec <= 1e-5, "attention {what} {dt}: cpu vs naive {ec}");
            eprintln!("attention {what} {dt:<5} rel err {eg:.2e}");
        };
        for case in 0..general_cases().len() {
            let (g, want, ..) = run_general(&gpu, dt, case);
            let (c, ..) = run_general(&cpu, dt, case);
            agree(format!("case {case}"), &g, &c, &want);
        }
        // Unaligned q, then aligned q (the grouped tensor-core decode kernel in f16/bf16 for
        // cases 14-16, whose steps have the work it needs), decode steps unshared too.
        let aligned = SHARED_CASES.into_iter().chain((4..=8).map(|c| (c, 1)));
        let shared = SHARED_CASES.into_iter().map(|c| (c, false));
        for ((case, share), q_aligned) in shared.chain(aligned.map(|c| (c, true))) {
            let (g, want, ..) = run_general_shared(&gpu, dt, case, share, q_aligned);
            let (c, ..) = run_general_shared(&cpu, dt, case, share, q_aligned);
            let what = format!("case {case} keys shared by {share} q aligned {q_aligned}");
            agree(what, &g, &c, &want);
        }
        for (case, scale) in NON_POSITIVE_SCALES {
            let (g, want, ..) = run_general_scaled(&gpu, dt, case, 1, false, scale);
            let (c, ..) = run_general_scaled(&cpu, dt, case, 1, false, scale);
            agree(format!("case {case} scale {scale}"), &g, &c, &want);
        }
        let (rows, h) = (7, 1031);
        let (x, r, gm) = (randn(50, rows * h), randn(51, rows * h), randn(52, h));
        let run = |d: &Device| {
            ops::rms_norm(
                &t(&x, &[rows, h], dt, d),
                Some(&t(&r, &[rows, h], dt, d)),
                &t(&gm, &[h], dt, d),
                1e-6,
            )
            .unwrap()
            .to_f32_vec()
            .unwrap()
        };
        let e = rel_err(&run(&gpu), &run(&cpu));
        assert!(e <= tol, "rms_norm {dt}: {e}");
        let xx = randn(53, rows * 2 * h);
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
            let run = |d: &Device| {
                ops::glu(&t(&xx, &[rows, 2 * h], dt, d), act)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap()
            };
            let e = rel_err(&run(&gpu), &run(&cpu));
            assert!(e <= tol, "glu {act:?} {dt}: {e}");
        }
        let run = |d: &Device| {
            ops::scale(&t(&x, &[rows, h], dt, d), 0.61)
                .unwrap()
                .to_f32_vec()
                .unwrap()
        };
        assert!(rel_err(&run(&gpu), &run(&cpu)) <= tol);
        let run = |d: &Device| {
            ops::embed_scaled(
                &[
                    (
                        &t(&gm[..200], &[10, 20], dt, d),
                        &Tensor::from_i32(&[3, 9, 0], &[3], d).unwrap(),
                    ),
                    (
                        &t(&r[..100], &[5, 20], dt, d),
                        &Tensor::from_i32(&[4, 4, 1], &[3], d).unwrap(),
                    ),
                ],
                4.5,
            )
            .unwrap()
            .to_f32_vec()
            .unwrap()
        };
        assert!(rel_err(&run(&gpu), &run(&cpu)) <= tol, "embed_scaled {dt}");
        let (b, l, width, col, heads, hd) = (3, 37, 200, 8, 4, 48);
        let xr = randn(54, b * l * width);
        let pos: Vec<i32> = (0..b * l).map(|i| (i * 7 % 300) as i32).collect();
        let inv: Vec<f32> = (0..20)
            .map(|p| 10000f32.powf(-(2 * p) as f32 / 40.0))
            .collect();
        let run = |d: &Device| {
            let mut xt = t(&xr, &[b, l, width], dt, d);
            ops::rotary(
                &mut xt,
                col,
                heads,
                hd,
                &Tensor::from_i32(&pos, &[b * l], d).unwrap(),
                &t(&inv, &[20], DType::F32, d),
                1.0,
            )
            .unwrap();
            xt.to_f32_vec().unwrap()
        };
        let e = rel_err(&run(&gpu), &run(&cpu));
        assert!(e <= tol, "rotary {dt}: {e}");
        eprintln!("rms_norm/glu/scale/embed/rotary {dt} ok");
    }
}

#[test]
fn logprob_topk_matches_a_full_sort() {
    // A short vocabulary, and GPT2's with values on a grid of 1/4 so that many tie.
    // Two stages (slices of 2048 tokens, ranked above a threshold or sorted by per-thread
    // lists, then a merge of at most 6016 candidates a row: by k rounds of one warp up to
    // 128 slices, by rank past that) up to k = 64; one block a row past that.
    for (rows, vocab, k, ties) in [
        (5, 1037, 9, false),
        (5, 50257, 64, true),
        (5, 50257, 50, false),
        (5, 250_112, 48, true),
        (5, 300_000, 40, false),
        (5, 94 * 2048, 64, false),
        (5, 2 * 2048 + 1, 1, true),
        (5, 2048 + 5, 40, true),
        (5, 250_112, 8, true),
        (5, 250_112, 64, false),
        (5, 32000, 65, true),
        (5, 32000, 16, true),
        (5, 32000, 17, false),
        (5, 20, 16, true),
        (5, 32000, 32, false),
        (5, 32000, 33, false),
        (5, 2048 + 7, 31, true),
    ] {
        logprob_topk_case(rows, vocab, k, if ties { 0.25 } else { 0.0 });
    }
    // Values on a grid of 8, nearly all 0: every slice has more keys at its threshold
    // than the filtering top-k holds, so it sorts.
    for k in [1, 8, 32, 50] {
        logprob_topk_case(5, 32000, k, 8.0);
    }
}

/// `grid` > 0 rounds the values to its multiples, so that many tie.
fn logprob_topk_case(rows: usize, vocab: usize, k: usize, grid: f32) {
    let mut x = randn(60 + vocab as u64, rows * vocab);
    if grid > 0.0 {
        x.iter_mut().for_each(|v| *v = (*v / grid).round() * grid);
    }
    // Five EOS ids, one past the first slice; on the rows they are masked on they hold the
    // row's largest values, so a mask that slipped would show in the ids.
    let eos = [17i64, 400, 3, 9, 5000];
    let mask = [true, false, true, false, false];
    for (r, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        for &e in eos.iter().filter(|&&e| (e as usize) < vocab) {
            x[r * vocab + e as usize] = 10.0 + e as f32 / 4096.0;
        }
    }
    let check = |dev: &Device, dt: DType, tol: f32, renormalize: bool| {
        let t = Tensor::from_f32(&x, &[rows, vocab], dt, dev).unwrap();
        let xr = dt.round_f32(&x);
        let eos_mask = ops::EosMask {
            rows: &mask,
            eos: &eos,
            renormalize,
        };
        let top = ops::logprob_topk(&t, k, Some(eos_mask)).unwrap();
        for r in 0..rows {
            let row = &xr[r * vocab..(r + 1) * vocab];
            // Renormalized rows sum over the tokens the mask leaves.
            let kept: Vec<f64> = (0..vocab)
                .filter(|j| !(renormalize && mask[r] && eos.contains(&(*j as i64))))
                .map(|j| row[j] as f64)
                .collect();
            let lse = {
                let m = kept.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                m + kept.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
            };
            let mut order: Vec<usize> = (0..vocab)
                .filter(|j| !(mask[r] && eos.contains(&(*j as i64))))
                .collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let ids: Vec<i32> = order[..k].iter().map(|&j| j as i32).collect();
            assert_eq!(
                &top.ids[r * k..(r + 1) * k],
                &ids[..],
                "row {r} on {dev} {dt}"
            );
            for (t, &j) in order[..k].iter().enumerate() {
                let want = (row[j] as f64 - lse) as f32;
                assert!(
                    (top.logprobs[r * k + t] - want).abs() <= tol,
                    "row {r} rank {t}: {} vs {want}",
                    top.logprobs[r * k + t]
                );
            }
            assert!((top.lse[r] as f64 - lse).abs() <= tol as f64);
        }
    };
    for renormalize in [false, true] {
        check(&Device::Cpu, DType::F32, 1e-4, renormalize);
        if let Some(g) = gpu("logprob_topk_matches_a_full_sort") {
            for dt in [DType::F32, DType::F16, DType::BF16] {
                check(&g, dt, 1e-4, renormalize);
            }
        }
    }
}

#[test]
fn reorder_row_prefixes_match_a_gather() {
    let (rows, pos, width) = (5, 7, 24);
    let idx = [4i32, 4, 0, 2, 1];
    let data: Vec<Vec<f32>> = (0..3).map(|i| randn(70 + i, rows * pos * width)).collect();
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu("reorder_row_prefixes_match_a_gather"));
    for dev in &devices {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            // Whole 16-byte packs, and a prefix that ends inside one.
            for prefix in [4 * width, 3 * width + 5] {
                let mut xs: Vec<Tensor> = data
                    .iter()
                    .map(|d| t(d, &[rows, pos, width], dt, dev))
                    .collect();
                let it = Tensor::from_i32(&idx, &[rows], dev).unwrap();
                let mut refs: Vec<&mut Tensor> = xs.iter_mut().collect();
                ops::reorder_row_prefixes(&mut refs, &it, prefix).unwrap();
                for (x, d) in xs.iter().zip(&data) {
                    let got = x.to_f32_vec().unwrap();
                    let want = dt.round_f32(d);
                    let row = pos * width;
                    for (i, &s) in idx.iter().enumerate() {
                        let s = s as usize;
                        assert_eq!(
                            &got[i * row..i * row + prefix],
                            &want[s * row..s * row + prefix],
                            "{dev} {dt} prefix {prefix} row {i}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn reorder_rejects_source_rows_out_of_range() {
    use lightseq::models::decode::DecodeState;
    use lightseq::nn::attention::KvCache;
    let cache = KvCache::new(3, 4, 8, DType::F32, &Device::Cpu).unwrap();
    let mut st = DecodeState::new(3, 4, vec![cache]);
    assert!(st.reorder(&[0, 3, 1]).is_err());
    assert!(st.reorder(&[0, 1]).is_err());
    assert!(st.reorder(&[2, 2, 0]).is_ok());
}

/// A cached self-attention step: the step's keys and values land in the caches at its row
/// and its queries attend over the caches with them (one launch on CUDA for one query a
/// row), against host-written caches and the naive attention over them.
#[test]
fn attention_cached_appends_and_attends() {
    // (batch, new positions, heads, kv_heads, head_dim, capacity, row): grouped heads over
    // more than one key tile, one tile of 39-41 keys (values taken a 16-byte pack a thread,
    // the new row among them), a head of 40 bytes in 16 bits (not whole 16-byte packs),
    // the first row, and two new positions (written, then attended causally).
    let cases = [
        (3, 1, 4, 2, 64, 160, 150),
        (3, 1, 4, 2, 64, 64, 40),
        (2, 1, 3, 3, 20, 40, 7),
        (2, 1, 2, 1, 16, 9, 0),
        (2, 2, 4, 2, 32, 50, 30),
    ];
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu("attention_cached_appends_and_attends"));
    for dev in &devices {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for (ci, &(b, nt, heads, kvh, d, cap, row)) in cases.iter().enumerate() {
                for on_device in [false, true] {
                    let (qd, kd) = (heads * d, kvh * d);
                    // Rows of whole 16-byte packs past q, k and v.
                    let w = qd + 2 * kd + 8;
                    let seed = 900 + 10 * ci as u64;
                    let src = dt.round_f32(&randn(seed, b * nt * w));
                    let k0 = dt.round_f32(&randn(seed + 1, b * cap * kd));
                    let v0 = dt.round_f32(&randn(seed + 2, b * cap * kd));
                    let key_ranges: Vec<(usize, usize)> =
                        (0..b).map(|i| (((i * 2) % 3).min(row), row + nt)).collect();
                    let opts = ops::AttentionOptions {
                        heads,
                        kv_heads: kvh,
                        head_dim: d,
                        scale: 0.25,
                        causal: nt > 1,
                        q_offset: row,
                        window: None,
                        key_ranges,
                        bias: None,
                        ranges_on_device: None,
                    };
                    let s = t(&src, &[b, nt, w], dt, dev);
                    let mut kc = t(&k0, &[b, cap, kd], dt, dev);
                    let mut vc = t(&v0, &[b, cap, kd], dt, dev);
                    let row_t =
                        on_device.then(|| Tensor::from_i32(&[row as i32], &[1], dev).unwrap());
                    let got = ops::attention_cached(
                        ops::Heads { tensor: &s, col: 0 },
                        (&mut kc, &mut vc),
                        row,
                        row_t.as_ref(),
                        &s,
                        (qd, qd + kd),
                        &opts,
                    )
                    .unwrap();
                    let (mut ek, mut ev) = (k0.clone(), v0.clone());
                    for bi in 0..b {
                        for i in 0..nt {
                            let at = (bi * cap + row + i) * kd;
                            let from = (bi * nt + i) * w + qd;
                            ek[at..at + kd].copy_from_slice(&src[from..from + kd]);
                            ev[at..at + kd].copy_from_slice(&src[from + kd..from + 2 * kd]);
                        }
                    }
                    let what = format!("{dev} {dt} case {ci} device row {on_device}");
                    assert_eq!(kc.to_f32_vec().unwrap(), ek, "keys, {what}");
                    assert_eq!(vc.to_f32_vec().unwrap(), ev, "values, {what}");
                    let want = naive_general_attention(
                        (&src, nt, w, 0),
                        (&ek, cap, kd, 0),
                        (&ev, cap, kd, 0),
                        b,
                        &opts,
                        None,
                    );
                    let err = rel_err(&got.to_f32_vec().unwrap(), &want);
                    assert!(err <= tolerance(dt), "{what}: {err}");
                }
            }
            // A row past the caches is refused before anything is written.
            let (b, heads, d, cap) = (2, 2, 16, 4);
            let s = t(
                &randn(990, b * 3 * heads * d),
                &[b, 1, 3 * heads * d],
                dt,
                dev,
            );
            let cache = randn(991, b * cap * heads * d);
            let mut kc = t(&cache, &[b, cap, heads * d], dt, dev);
            let mut vc = t(&cache, &[b, cap, heads * d], dt, dev);
            let before = kc.to_f32_vec().unwrap();
            let opts = ops::AttentionOptions {
                heads,
                kv_heads: heads,
                head_dim: d,
                scale: 1.0,
                causal: false,
                q_offset: cap,
                window: None,
                key_ranges: vec![(0, cap); b],
                bias: None,
                ranges_on_device: None,
            };
            let q = ops::Heads { tensor: &s, col: 0 };
            let bad = ops::attention_cached(q, (&mut kc, &mut vc), cap, None, &s, (32, 64), &opts);
            assert!(bad.is_err(), "{dev} {dt}");
            assert_eq!(kc.to_f32_vec().unwrap(), before, "{dev} {dt}");
            // So are key ranges past the caches, with a row that fits.
            let opts = ops::AttentionOptions {
                q_offset: 1,
                key_ranges: vec![(0, cap + 1); b],
                ..opts
            };
            let q = ops::Heads { tensor: &s, col: 0 };
            let bad = ops::attention_cached(q, (&mut kc, &mut vc), 1, None, &s, (32, 64), &opts);
            assert!(bad.is_err(), "{dev} {dt}");
            assert_eq!(kc.to_f32_vec().unwrap(), before, "{dev} {dt}");
        }
    }
}

#[test]
fn write_rows_pair_equals_two_writes() {
    let (b, cap, t_new, width, src_w) = (3, 9, 2, 24, 80);
    let src = randn(80, b * t_new * src_w);
    let base = randn(81, b * cap * width);
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu("write_rows_pair_equals_two_writes"));
    for dev in &devices {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let s = t(&src, &[b, t_new, src_w], dt, dev);
            let fresh = || t(&base, &[b, cap, width], dt, dev);
            let (mut k1, mut v1, mut k2, mut v2) = (fresh(), fresh(), fresh(), fresh());
            // The row on the device holds the same value as `row` (captured steps read it).
            let row = Tensor::from_i32(&[5], &[1], dev).unwrap();
            ops::write_rows_pair((&mut k1, &mut v1), 5, Some(&row), &s, (7, 40), width).unwrap();
            ops::write_rows(&mut k2, 5, None, 0, &s, 7, width).unwrap();
            ops::write_rows(&mut v2, 5, None, 0, &s, 40, width).unwrap();
            for (x, y) in [(&k1, &k2), (&v1, &v2)] {
                assert_eq!(
                    x.to_f32_vec().unwrap(),
                    y.to_f32_vec().unwrap(),
                    "{dev} {dt}"
                );
            }
            // Sources past the row's columns are refused, before anything is written.
            let before = k1.to_f32_vec().unwrap();
            let bad = ops::write_rows_pair((&mut k1, &mut v1), 0, None, &s, (7, 60), width);
            assert!(bad.is_err(), "{dev} {dt}");
            assert_eq!(k1.to_f32_vec().unwrap(), before, "{dev} {dt}");
        }
    }
}

/// Decode steps of the attention layers (`nn::SelfAttention::forward_cached` appending to
/// its cache, `nn::CrossAttention::forward` over a fixed memory), on CUDA against the CPU in
/// f16 and bf16: the single-query kernels read the caches and ranges before they wait for
/// the projection kernel before them, and q and the appended row after it. Head sizes of 4,
/// 8 and 16 whole 16-byte packs (the tiled kernels), and 24 (the two-phase kernel); caches of
/// more keys than one tile by the last step.
#[test]
fn cuda_attention_layer_steps_match_cpu() {
    use lightseq::nn::{CrossAttention, KvCache, Linear, SelfAttention, SelfAttentionExtras};
    let Some(gpu) = gpu("cuda_attention_layer_steps_match_cpu") else {
        return;
    };
    let cpu = Device::Cpu;
    let lin = |seed: u64, n: usize, k: usize, dt: DType, d: &Device| Linear {
        weight: t(
            &randn(seed, n * k)
                .iter()
                .map(|v| v * 0.2)
                .collect::<Vec<_>>(),
            &[n, k],
            dt,
            d,
        ),
        bias: Some(t(&randn(seed + 1, n), &[n], dt, d)),
    };
    for dt in [DType::F16, DType::BF16] {
        for (heads, head_dim, steps) in [(4, 32, 5), (8, 64, 70), (2, 128, 9), (3, 24, 6)] {
            let (batch, hidden, src_len) = (4, 96, 11);
            let qd = heads * head_dim;
            let scale = 0.4 / (head_dim as f32).sqrt();
            let layers = |d: &Device| {
                (
                    SelfAttention {
                        qkv: lin(30, 3 * qd, hidden, dt, d),
                        out: lin(32, hidden, qd, dt, d),
                        heads,
                        kv_heads: heads,
                        head_dim,
                        scale,
                    },
                    CrossAttention {
                        q: lin(34, qd, hidden, dt, d),
                        kv: lin(36, 2 * qd, hidden, dt, d),
                        out: lin(38, hidden, qd, dt, d),
                        heads,
                        head_dim,
                        scale,
                    },
                )
            };
            let memory = randn(40, batch * src_len * hidden);
            // Sources of different lengths: row b sees its first src_len - b keys.
            let src_ranges: Vec<(usize, usize)> = (0..batch).map(|b| (0, src_len - b)).collect();
            let run = |d: &Device| {
                let (sa, ca) = layers(d);
                let kv = ca
                    .memory(
                        &t(&memory, &[batch * src_len, hidden], dt, d),
                        batch,
                        src_len,
                    )
                    .unwrap();
                let mut cache = KvCache::new(batch, steps, heads * head_dim, dt, d).unwrap();
                let mut outs = Vec::new();
                for step in 0..steps {
                    let x = t(
                        &randn(50 + step as u64, batch * hidden),
                        &[batch, hidden],
                        dt,
                        d,
                    );
                    let ranges: Vec<(usize, usize)> = (0..batch).map(|_| (0, step + 1)).collect();
                    let extras = SelfAttentionExtras::default();
                    let a = sa
                        .forward_cached(&x, batch, 1, &mut cache, step, &ranges, extras)
                        .unwrap();
                    let c = ca
                        .forward(&a, batch, 1, &kv, &src_ranges, None, None)
                        .unwrap();
                    outs.push(c.to_f32_vec().unwrap());
                }
                outs
            };
            let (g, c) = (run(&gpu), run(&cpu));
            for (step, (gs, cs)) in g.iter().zip(&c).enumerate() {
                let err = rel_err(gs, cs);
                assert!(
                    err < tolerance(dt),
                    "{dt} heads {heads} x {head_dim}, step {step}: rel err {err:.2e}"
                );
            }
            eprintln!("attention layer steps {dt} {heads} x {head_dim}: {steps} steps ok");
        }
    }
}
