//! Sampling: the warped distribution against an independent computation, by chi-square on
//! many draws; and end to end: top_k = 1 equals greedy, a fixed seed repeats.

mod common;

use common::fixtures_dir;
use lightseq::generate::processors::{softmax, warp};
use lightseq::generate::search::Rng;
use lightseq::generate::{generate, GenerationOptions, Inputs, Resolved};
use lightseq::io::ModelDir;
use lightseq::models;
use lightseq::{DType, Device};

/// The distribution sampling should follow, computed directly in f64: softmax(logits / T),
/// restricted to the k most likely, then to the smallest most-likely set whose
/// probability reaches top_p, renormalized.
fn expected(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<f64> {
    let n = logits.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let mut keep = vec![false; n];
    for &i in order.iter().take(if k == 0 { n } else { k }) {
        keep[i] = true;
    }
    let z: f64 = (0..n)
        .filter(|&i| keep[i])
        .map(|i| (logits[i] as f64 / t).exp())
        .sum();
    let mut probs: Vec<f64> = (0..n)
        .map(|i| {
            if keep[i] {
                (logits[i] as f64 / t).exp() / z
            } else {
                0.0
            }
        })
        .collect();
    if p < 1.0 {
        let mut cum = 0.0;
        let mut kept = vec![false; n];
        for &i in &order {
            if !keep[i] {
                continue;
            }
            kept[i] = true;
            cum += probs[i];
            if cum >= p {
                break;
            }
        }
        let z: f64 = (0..n).filter(|&i| kept[i]).map(|i| probs[i]).sum();
        probs = (0..n)
            .map(|i| if kept[i] { probs[i] / z } else { 0.0 })
            .collect();
    }
    probs
}

/// Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty).
fn chi2_critical(df: usize) -> f64 {
    let d = df as f64;
    let z = 3.0902;
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

fn resolved(t: f32, k: usize, p: f32) -> Resolved {
    let o = GenerationOptions {
        do_sample: Some(true),
        temperature: Some(t),
        top_k: Some(k),
        top_p: Some(p),
        ..Default::default()
    };
    Resolved::new(&o, false).unwrap()
}

#[test]
fn sampled_frequencies_follow_the_warped_distribution() {
    let logits: Vec<f32> = vec![1.3, -0.4, 0.9, 2.1, 0.0, -1.7, 1.1, 0.5, -0.2, 1.8];
    let n_draws = 60_000;
    for (t, k, p) in [
        (1.0, 0, 1.0),
        (0.6, 0, 1.0),
        (1.7, 0, 1.0),
        (1.0, 4, 1.0),
        (0.8, 6, 1.0),
        (1.0, 0, 0.7),
        (1.3, 0, 0.9),
        (0.9, 5, 0.8),
    ] {
        let cfg = resolved(t, k, p);
        let mut s = logits.clone();
        warp(&cfg, &mut s, 1);
        let probs = softmax(&s);
        let want = expected(&logits, t as f64, k, p as f64);
        let mut rng = Rng::new(1234 + k as u64);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n_draws {
            counts[rng.categorical(&probs)] += 1;
        }
        let mut chi2 = 0.0;
        let mut df = 0;
        for (c, &e) in counts.iter().zip(&want) {
            if e == 0.0 {
                assert_eq!(*c, 0, "T={t} k={k} p={p}: a filtered token was drawn");
                continue;
            }
            let exp = e * n_draws as f64;
            chi2 += (*c as f64 - exp).powi(2) / exp;
            df += 1;
        }
        let crit = chi2_critical(df - 1);
        eprintln!(
            "T={t} top_k={k} top_p={p}: chi2 {chi2:.2} on {} df (critical {crit:.2})",
            df - 1
        );
        assert!(chi2 < crit, "T={t} k={k} p={p}: chi2 {chi2} >= {crit}");
    }
}

fn run(name: &str, opts: &GenerationOptions) -> Vec<Vec<Vec<i64>>> {
    let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
    let m = models::load_decoder(&md, DType::F32, &Device::Cpu).unwrap();
    let prompts = vec![vec![3, 14, 15], vec![9, 2, 6, 5, 35], vec![8]];
    let prompts: Vec<Vec<i64>> = prompts
        .into_iter()
        .map(|p| p.into_iter().map(|x| x % m.vocab() as i64).collect())
        .collect();
    generate(m.as_ref(), Inputs::Ids(&prompts), opts)
        .unwrap()
        .into_iter()
        .map(|h| h.into_iter().map(|x| x.tokens).collect())
        .collect()
}

#[test]
fn top_k_one_equals_greedy_and_seeds_repeat() {
    for name in ["gpt2", "bart", "t5"] {
        let base = GenerationOptions {
            max_new_tokens: Some(8),
            eos_token_id: Some(vec![]),
            decoder_start_token_id: Some(0),
            ..Default::default()
        };
        let greedy = run(name, &base);
        let top1 = run(
            name,
            &GenerationOptions {
                do_sample: Some(true),
                top_k: Some(1),
                seed: Some(7),
                ..base.clone()
            },
        );
        assert_eq!(greedy, top1, "{name}: top_k=1 sampling differs from greedy");
        let sample = |seed| {
            run(
                name,
                &GenerationOptions {
                    do_sample: Some(true),
                    top_k: Some(0),
                    temperature: Some(1.5),
                    seed: Some(seed),
                    num_return_sequences: Some(3),
                    ..base.clone()
                },
            )
        };
        let (a, b) = (sample(11), sample(11));
        assert_eq!(a, b, "{name}: the same seed gave different samples");
        let c = sample(12);
        assert_ne!(a, c, "{name}: different seeds gave the same samples");
    }
}
