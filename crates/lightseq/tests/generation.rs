//! Generation against HF `generate`: the references in tests/fixtures/generation (made by
//! scripts/make_generation_fixtures.py, each prompt generated alone by HF in float64) must
//! be reproduced token for token with all prompts of a case in one ragged batch, scores
//! within 1e-3.

mod common;

use common::{fixtures_dir, gpu};
use lightseq::generate::{generate, GenerationOptions, Inputs};
use lightseq::io::ModelDir;
use lightseq::models;
use lightseq::{DType, Device};

fn cases() -> Vec<serde_json::Value> {
    fixture_files("generation", 6)
}

/// The fixture files of `sub` (at least `min`), parsed.
fn fixture_files(sub: &str, min: usize) -> Vec<serde_json::Value> {
    let dir = fixtures_dir().join(sub);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(
        files.len() >= min,
        "{sub} fixtures missing: see scripts/make_generation_fixtures.py and make_group_beam_fixtures.py"
    );
    files
        .iter()
        .map(|f| serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
        .collect()
}

fn check_model(fixture: &serde_json::Value, device: &Device) -> Vec<Vec<Vec<Vec<i64>>>> {
    let name = fixture["model"].as_str().unwrap();
    let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
    let model = models::load_decoder(&md, DType::F32, device).unwrap();
    // The model directory's generation defaults apply under each case's options, as in HF.
    let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
    let prompts: Vec<Vec<i64>> = serde_json::from_value(fixture["prompts"].clone()).unwrap();
    let mut all = Vec::new();
    for (ci, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let opts = GenerationOptions::from_json(&case["options"]).or(&defaults);
        let out = generate(model.as_ref(), Inputs::Ids(&prompts), &opts).unwrap();
        let want: Vec<Vec<Vec<i64>>> = serde_json::from_value(case["sequences"].clone()).unwrap();
        let want_scores: Vec<Vec<f64>> = serde_json::from_value(case["scores"].clone()).unwrap();
        let got: Vec<Vec<Vec<i64>>> = out
            .iter()
            .map(|h| h.iter().map(|x| x.tokens.clone()).collect())
            .collect();
        assert_eq!(
            got, want,
            "{name} case {ci} {}: sequences differ",
            case["options"]
        );
        for (p, (hs, ws)) in out.iter().zip(&want_scores).enumerate() {
            for (h, w) in hs.iter().zip(ws) {
                assert!(
                    (h.score as f64 - w).abs() <= 1e-3,
                    "{name} case {ci} prompt {p}: score {} vs HF {w}",
                    h.score
                );
            }
        }
        all.push(got);
    }
    eprintln!(
        "{name}: {} cases token-exact on {device}",
        fixture["cases"].as_array().unwrap().len()
    );
    all
}

#[test]
fn cpu_generation_matches_hf_generate() {
    for f in cases() {
        check_model(&f, &Device::Cpu);
    }
}

/// Group (diverse) beam search against HF 4.x's `_group_beam_search` (HF 5.x has none):
/// tests/fixtures/generation_groups, made by scripts/make_group_beam_fixtures.py.
#[test]
fn cpu_group_beam_search_matches_hf4_generate() {
    for f in fixture_files("generation_groups", 3) {
        check_model(&f, &Device::Cpu);
    }
}

#[test]
fn gpu_generation_gives_the_cpu_tokens() {
    let Some(dev) = gpu("gpu_generation_gives_the_cpu_tokens") else {
        return;
    };
    for f in cases() {
        // Same references as the CPU: tokens must agree exactly in f32.
        check_model(&f, &dev);
    }
}

fn load(
    name: &str,
) -> (
    Box<dyn lightseq::models::decode::Decoder>,
    GenerationOptions,
) {
    let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
    let m = models::load_decoder(&md, DType::F32, &Device::Cpu).unwrap();
    let d = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
    (m, d)
}

fn prompts(vocab: usize) -> Vec<Vec<i64>> {
    vec![vec![5, 17, 3, 9], vec![11, 2], vec![7, 7, 30, 1, 4, 16]]
        .into_iter()
        .map(|p| p.into_iter().map(|x: i64| x % vocab as i64).collect())
        .collect()
}

fn seqs(
    m: &dyn lightseq::models::decode::Decoder,
    inputs: Inputs,
    o: &GenerationOptions,
) -> Vec<Vec<(Vec<i64>, f32)>> {
    generate(m, inputs, o)
        .unwrap()
        .into_iter()
        .map(|h| h.into_iter().map(|x| (x.tokens, x.score)).collect())
        .collect()
}

/// A decoder-only batch whose long prompt ends at the last position of the model's table
/// (HF's default max_length is capped there) beside a short prompt that goes on: the long
/// prompt's rows keep stepping after they finish, and every result is the prompt's alone.
#[test]
fn a_prompt_at_the_position_limit_beside_a_short_one_generates_as_alone() {
    let (m, d) = load("gpt2");
    let limit = m.max_decoder_positions();
    let vocab = m.vocab() as i64;
    let long: Vec<i64> = (0..limit as i64 - 3).map(|i| (i * 7 + 3) % vocab).collect();
    let short: Vec<i64> = vec![5 % vocab, 17 % vocab, 3 % vocab];
    for beams in [1, 2] {
        let o = GenerationOptions {
            num_beams: Some(beams),
            ..Default::default()
        }
        .or(&d);
        let both = seqs(m.as_ref(), Inputs::Ids(&[long.clone(), short.clone()]), &o);
        for (i, p) in [&long, &short].into_iter().enumerate() {
            let alone = seqs(m.as_ref(), Inputs::Ids(std::slice::from_ref(p)), &o);
            assert_eq!(both[i].len(), alone[0].len(), "beams {beams} prompt {i}");
            for (b, a) in both[i].iter().zip(&alone[0]) {
                assert_eq!(
                    b.0, a.0,
                    "beams {beams} prompt {i}: tokens differ from alone"
                );
                assert!((b.1 - a.1).abs() <= 1e-4, "beams {beams} prompt {i}: score");
            }
        }
        assert_eq!(
            both[0][0].0.len(),
            limit,
            "the long prompt ends at the limit"
        );
        assert!(both[1][0].0.len() > limit - long.len() + short.len());
    }
}

/// HF's default length rule: without max_length or max_new_tokens in the call, 20 tokens
/// past the input, capped at the model's max_position_embeddings (rotary models too); a
/// model's configured max_length of 20 is that default, any other value a limit.
#[test]
fn default_lengths_follow_hf() {
    let (m, d) = load("llama");
    let limit = m.default_length_cap();
    assert!(
        limit < 1000,
        "llama fixture: max_position_embeddings {limit}"
    );
    let vocab = m.vocab() as i64;
    for len in [3, limit - 5] {
        let p: Vec<i64> = (0..len as i64).map(|i| (i * 5 + 1) % vocab).collect();
        let o = GenerationOptions {
            eos_token_id: Some(vec![]),
            ..Default::default()
        }
        .or(&d);
        let out = seqs(m.as_ref(), Inputs::Ids(&[p]), &o);
        assert_eq!(out[0][0].0.len(), (len + 20).min(limit), "prompt of {len}");
    }
    let dir = std::env::temp_dir().join(format!("lightseq-gen-defaults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (given, want) in [(20, None), (142, Some(142))] {
        std::fs::write(
            dir.join("generation_config.json"),
            format!("{{\"max_length\": {given}}}"),
        )
        .unwrap();
        let o = GenerationOptions::model_defaults(&dir, &serde_json::json!({})).unwrap();
        assert_eq!(
            o.max_length, want,
            "generation_config.json max_length {given}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Samples of one prompt that end at EOS before the others come back as HF returns them:
/// padded with the pad id (0 for T5, whose EOS is 1) and stripped of it, so each ends at
/// its first EOS.
#[test]
fn shorter_samples_end_at_their_eos() {
    let (m, d) = load("t5");
    let p = prompts(m.vocab());
    let mut shorter = 0;
    for seed in 0..12 {
        let o = GenerationOptions {
            do_sample: Some(true),
            num_return_sequences: Some(4),
            max_new_tokens: Some(12),
            seed: Some(seed),
            ..Default::default()
        }
        .or(&d);
        let eos = o.eos_token_id.clone().unwrap_or_default();
        assert!(!eos.is_empty(), "t5 fixture: no EOS id");
        for hyps in seqs(m.as_ref(), Inputs::Ids(&p), &o) {
            let longest = hyps.iter().map(|h| h.0.len()).max().unwrap();
            for (tokens, _) in &hyps {
                // The decoder start token is the pad id; EOS is looked for after it.
                if let Some(i) = tokens.iter().skip(1).position(|t| eos.contains(t)) {
                    assert_eq!(
                        tokens.len(),
                        i + 2,
                        "seed {seed}: tokens after EOS: {tokens:?}"
                    );
                }
                if tokens.len() < longest {
                    shorter += 1;
                }
            }
        }
    }
    assert!(
        shorter > 0,
        "no sample ended before the others: the check says nothing"
    );
}

/// Beam sampling draws 2 x beams candidates a step without replacement; with top_k 1 the
/// warper keeps 2 tokens a beam, and at the first step only beam 0 has a nonzero
/// probability (the others start at -1e9), so 2 tokens are drawable against 6 candidates
/// at 3 beams. It runs, as HF's does (it panicked on an index before), and returns
/// finite-scored beams of the full length.
#[test]
fn beam_sampling_with_fewer_tokens_than_candidates_runs() {
    let (m, d) = load("gpt2");
    let p = prompts(m.vocab());
    for beams in [2, 3] {
        let o = GenerationOptions {
            do_sample: Some(true),
            num_beams: Some(beams),
            num_return_sequences: Some(beams),
            top_k: Some(1),
            max_new_tokens: Some(5),
            min_new_tokens: Some(5),
            ..Default::default()
        }
        .or(&d);
        let out = seqs(m.as_ref(), Inputs::Ids(&p), &o);
        for (i, hyps) in out.iter().enumerate() {
            assert_eq!(hyps.len(), beams, "prompt {i}");
            for (tokens, score) in hyps {
                assert!(score.is_finite(), "prompt {i}, beams {beams}: {hyps:?}");
                assert_eq!(tokens.len(), p[i].len() + 5, "prompt {i}, beams {beams}");
                assert_eq!(&tokens[..p[i].len()], &p[i][..], "prompt {i}: prefix");
            }
        }
    }
}

#[test]
fn diverse_lambda_zero_equals_beam_search() {
    for name in ["gpt2", "bart", "t5"] {
        let (m, d) = load(name);
        let p = prompts(m.vocab());
        let base = GenerationOptions {
            max_new_tokens: Some(7),
            num_beams: Some(4),
            num_return_sequences: Some(4),
            ..Default::default()
        }
        .or(&d);
        let plain = seqs(m.as_ref(), Inputs::Ids(&p), &base);
        let zero = seqs(
            m.as_ref(),
            Inputs::Ids(&p),
            &GenerationOptions {
                diverse_lambda: Some(0.0),
                ..base.clone()
            },
        );
        assert_eq!(
            plain, zero,
            "{name}: diverse_lambda 0 differs from beam search"
        );
        // A large sibling penalty keeps at most one child per parent after the first step,
        // so the returned beams still differ, and the result moves away from plain search.
        let div = seqs(
            m.as_ref(),
            Inputs::Ids(&p),
            &GenerationOptions {
                diverse_lambda: Some(50.0),
                ..base.clone()
            },
        );
        for hyps in &div {
            let distinct: std::collections::HashSet<_> = hyps.iter().map(|h| &h.0).collect();
            assert_eq!(
                distinct.len(),
                hyps.len(),
                "{name}: duplicate hypotheses under diverse_lambda"
            );
        }
        assert_ne!(plain, div, "{name}: diverse_lambda 50 changed nothing");
    }
}

#[test]
fn beam_groups_differ_and_one_group_is_beam_search() {
    for name in ["gpt2", "marian", "t5"] {
        let (m, d) = load(name);
        let p = prompts(m.vocab());
        let base = GenerationOptions {
            max_new_tokens: Some(6),
            num_beams: Some(4),
            num_return_sequences: Some(4),
            ..Default::default()
        }
        .or(&d);
        let plain = seqs(m.as_ref(), Inputs::Ids(&p), &base);
        // One group: the Hamming penalty has no other group to act on.
        let one = seqs(
            m.as_ref(),
            Inputs::Ids(&p),
            &GenerationOptions {
                num_beam_groups: Some(1),
                diversity_penalty: Some(5.0),
                ..base.clone()
            },
        );
        assert_eq!(plain, one, "{name}: one group differs from beam search");
        // Four groups of one beam with a heavy penalty: each group's first token differs
        // from the earlier groups', so the four results start differently.
        let groups = seqs(
            m.as_ref(),
            Inputs::Ids(&p),
            &GenerationOptions {
                num_beam_groups: Some(4),
                diversity_penalty: Some(1e4),
                ..base.clone()
            },
        );
        let start = if m.is_encoder_decoder() { 1 } else { 0 };
        for (i, hyps) in groups.iter().enumerate() {
            let first = |h: &(Vec<i64>, f32)| h.0[if start == 1 { 1 } else { p[i].len() }];
            let firsts: std::collections::HashSet<i64> = hyps.iter().map(first).collect();
            assert_eq!(
                firsts.len(),
                hyps.len(),
                "{name} prompt {i}: groups share a first token: {hyps:?}"
            );
        }
        // Without a penalty every group runs the same search: duplicates appear.
        let same = seqs(
            m.as_ref(),
            Inputs::Ids(&p),
            &GenerationOptions {
                num_beam_groups: Some(2),
                diversity_penalty: Some(0.0),
                ..base.clone()
            },
        );
        for hyps in &same {
            let distinct: std::collections::HashSet<_> = hyps.iter().map(|h| &h.0).collect();
            assert!(
                distinct.len() < hyps.len(),
                "{name}: unpenalized groups should repeat each other"
            );
        }
    }
}

#[test]
fn decoding_from_encoder_states_equals_decoding_from_ids() {
    for name in ["bart", "t5", "fsmt"] {
        let (m, d) = load(name);
        let p = prompts(m.vocab());
        let o = GenerationOptions {
            max_new_tokens: Some(6),
            num_beams: Some(3),
            ..Default::default()
        }
        .or(&d);
        let (states, lengths) = m.encode_sources(&p).unwrap();
        assert_eq!(states.shape()[0], p.len());
        let a = seqs(m.as_ref(), Inputs::Ids(&p), &o);
        let b = seqs(m.as_ref(), Inputs::EncoderStates(&states, &lengths), &o);
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn bad_generation_options_are_errors() {
    let (m, d) = load("gpt2");
    let p = prompts(m.vocab());
    let cases = [
        GenerationOptions {
            num_beams: Some(2),
            num_return_sequences: Some(3),
            ..Default::default()
        },
        GenerationOptions {
            num_beams: Some(4),
            num_beam_groups: Some(3),
            ..Default::default()
        },
        GenerationOptions {
            num_return_sequences: Some(2),
            ..Default::default()
        },
        GenerationOptions {
            do_sample: Some(true),
            temperature: Some(0.0),
            ..Default::default()
        },
        GenerationOptions {
            top_p: Some(1.5),
            ..Default::default()
        },
        GenerationOptions {
            max_length: Some(3),
            ..Default::default()
        },
        // Non-finite values would turn the scores into NaN or infinity.
        GenerationOptions {
            do_sample: Some(true),
            temperature: Some(f32::NAN),
            ..Default::default()
        },
        GenerationOptions {
            repetition_penalty: Some(f32::INFINITY),
            ..Default::default()
        },
        GenerationOptions {
            num_beams: Some(2),
            length_penalty: Some(f32::NAN),
            ..Default::default()
        },
        GenerationOptions {
            num_beams: Some(4),
            num_beam_groups: Some(2),
            diversity_penalty: Some(f32::NAN),
            ..Default::default()
        },
    ];
    for o in cases {
        let r = generate(m.as_ref(), Inputs::Ids(&p), &o.clone().or(&d));
        assert!(r.is_err(), "{o:?} should be refused");
    }
    let bad_prompt = vec![vec![1, 1000]];
    assert!(generate(m.as_ref(), Inputs::Ids(&bad_prompt), &d).is_err());
    assert!(generate(m.as_ref(), Inputs::Ids(&[vec![]]), &d).is_err());
    assert!(generate(m.as_ref(), Inputs::Ids(&[]), &d)
        .unwrap()
        .is_empty());
}

/// f16 greedy decoding gives the f32 tokens wherever f32's choice is unambiguous: on every
/// generation fixture, each f16 token must equal the f32 one up to the first step where
/// f32's chosen logit does not lead every other by more than twice the largest f16 - f32
/// logit difference at that step (teacher-forced forwards of both over the f32 output), the
/// point past which f16 may legitimately choose otherwise. The comparison must cover most
/// steps, so the test cannot pass by finding everything ambiguous.
#[test]
fn f16_greedy_agrees_with_f32_where_f32_is_unambiguous() {
    let Some(dev) = gpu("f16_greedy_agrees_with_f32_where_f32_is_unambiguous") else {
        return;
    };
    let (mut compared, mut total) = (0usize, 0usize);
    for f in cases() {
        let name = f["model"].as_str().unwrap();
        let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
        let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
        let opts = GenerationOptions {
            num_beams: Some(1),
            do_sample: Some(false),
            max_new_tokens: Some(10),
            ..Default::default()
        }
        .or(&defaults);
        let prompts: Vec<Vec<i64>> = serde_json::from_value(f["prompts"].clone()).unwrap();
        let run = |dt: DType| -> Vec<Vec<i64>> {
            let m = models::load_decoder(&md, dt, &dev).unwrap();
            generate(m.as_ref(), Inputs::Ids(&prompts), &opts)
                .unwrap()
                .into_iter()
                .map(|h| h[0].tokens.clone())
                .collect()
        };
        let (want, got) = (run(DType::F32), run(DType::F16));
        let enc_dec = models::load_decoder(&md, DType::F32, &dev)
            .unwrap()
            .is_encoder_decoder();
        // Teacher-forced f32 logits over the f32 output: position k predicts token k + 1.
        let batch = if enc_dec {
            models::Batch {
                input_ids: prompts.clone(),
                decoder_input_ids: Some(want.clone()),
                ..Default::default()
            }
        } else {
            models::Batch {
                input_ids: want.clone(),
                ..Default::default()
            }
        };
        let out = models::load(&md, DType::F32, &dev)
            .unwrap()
            .forward(&batch)
            .unwrap();
        let out16 = models::load(&md, DType::F16, &dev)
            .unwrap()
            .forward(&batch)
            .unwrap();
        assert_eq!(out.name, "logits", "{name}");
        let [_, len, vocab] = out.shape;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let start = if enc_dec { 1 } else { prompts[i].len() };
            total += w.len() - start;
            for k in start..w.len() {
                let at = (i * len + k - 1) * vocab..(i * len + k) * vocab;
                let row = &out.data[at.clone()];
                let diff = row
                    .iter()
                    .zip(&out16.data[at])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let chosen = row[w[k] as usize];
                let rival = row
                    .iter()
                    .enumerate()
                    .filter(|(v, _)| *v != w[k] as usize)
                    .map(|(_, &x)| x)
                    .fold(f32::NEG_INFINITY, f32::max);
                if chosen - rival <= 2.0 * diff + 1e-4 {
                    break;
                }
                assert_eq!(
                    g.get(k),
                    Some(&w[k]),
                    "{name} prompt {i}: f16 token {k} differs from f32's unambiguous choice (margin {:.3})",
                    chosen - rival
                );
                compared += 1;
            }
        }
    }
    eprintln!("f16 vs f32 greedy: {compared} of {total} generated tokens were unambiguous in f32 and all agreed");
    assert!(
        compared * 2 >= total,
        "only {compared} of {total} steps were unambiguous: the check says too little"
    );
}

/// Single-token steps replayed from CUDA graphs (gpt2, xglm, llama and the seq2seq models
/// capture them)
/// give exactly the tokens and scores of launching every kernel, in f16, through beam
/// search (cache reorders between replays), sampling and a batch with left padding. Twelve
/// new tokens: the second single-token step is captured, the rest are replays.
#[test]
fn gpu_graph_replay_matches_eager_launches() {
    let Some(dev) = gpu("gpu_graph_replay_matches_eager_launches") else {
        return;
    };
    for name in ["gpt2", "bart", "marian", "xglm", "llama"] {
        let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
        let m = models::load_decoder(&md, DType::F16, &dev).unwrap();
        let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
        let p = prompts(m.vocab());
        for o in [
            GenerationOptions {
                num_beams: Some(4),
                max_new_tokens: Some(12),
                min_new_tokens: Some(12),
                ..Default::default()
            },
            GenerationOptions {
                do_sample: Some(true),
                top_k: Some(20),
                seed: Some(7),
                max_new_tokens: Some(12),
                min_new_tokens: Some(12),
                ..Default::default()
            },
        ] {
            let o = o.or(&defaults);
            std::env::set_var("LIGHTSEQ_CUDA_GRAPHS", "0");
            let eager = seqs(m.as_ref(), Inputs::Ids(&p), &o);
            std::env::set_var("LIGHTSEQ_CUDA_GRAPHS", "require");
            let graphs = seqs(m.as_ref(), Inputs::Ids(&p), &o);
            std::env::remove_var("LIGHTSEQ_CUDA_GRAPHS");
            assert_eq!(
                graphs, eager,
                "{name}: graph replay differs from eager launches"
            );
        }
    }
}

/// Threads generating at once on one device, with decode steps captured and replayed as
/// graphs, get what each gets alone: a capture records only its own thread's work.
#[test]
fn gpu_concurrent_generation_matches_sequential() {
    let Some(dev) = gpu("gpu_concurrent_generation_matches_sequential") else {
        return;
    };
    let md = ModelDir::open(&fixtures_dir().join("gpt2")).unwrap();
    let m = models::load_decoder(&md, DType::F16, &dev).unwrap();
    let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
    let p = prompts(m.vocab());
    let opts: Vec<GenerationOptions> = (0..4)
        .map(|i| {
            GenerationOptions {
                num_beams: Some(1 + 3 * (i % 2)),
                max_new_tokens: Some(16),
                min_new_tokens: Some(16),
                ..Default::default()
            }
            .or(&defaults)
        })
        .collect();
    let alone: Vec<_> = opts
        .iter()
        .map(|o| seqs(m.as_ref(), Inputs::Ids(&p), o))
        .collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = opts
            .iter()
            .map(|o| {
                let (m, p) = (&m, &p);
                s.spawn(move || {
                    (0..3)
                        .map(|_| seqs(m.as_ref(), Inputs::Ids(p), o))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (want, got) in alone.iter().zip(&together) {
        for g in got {
            assert_eq!(
                g, want,
                "a concurrent generation differs from the same one alone"
            );
        }
    }
}

/// Beam reorders between steps: on the GPU the caches stay in place and the decode
/// attention reads each position from the row a table names; the CPU moves the rows. Both
/// must give the same logits at every step, including a step of two positions after
/// reorders (which gathers the keys into place) and replayed CUDA graphs.
#[test]
fn reordered_steps_match_between_devices() {
    let Some(dev) = gpu("reordered_steps_match_between_devices") else {
        return;
    };
    // Row i takes row src[i]'s state: duplicates, swaps, moves across batch items.
    let srcs: [[usize; 4]; 6] = [
        [1, 1, 0, 3],
        [0, 2, 2, 1],
        [3, 0, 1, 2],
        [2, 2, 3, 3],
        [1, 0, 3, 2],
        [0, 0, 0, 1],
    ];
    for name in ["gpt2", "bart", "t5"] {
        let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
        let run = |device: &Device| -> Vec<Vec<f32>> {
            let m = models::load_decoder(&md, DType::F32, device).unwrap();
            let v = m.vocab() as i64;
            let tok = |i: usize, j: usize| ((7 * i + 3 * j + 5) as i64) % v;
            let sources = [vec![4, 9, 2, 7, 1], vec![3, 8, 6]];
            let src = m.is_encoder_decoder().then(|| {
                sources
                    .iter()
                    .map(|s| s.iter().map(|x| x % v).collect())
                    .collect::<Vec<Vec<i64>>>()
            });
            let mut st = m.begin(src.as_deref(), 4, 44).unwrap();
            let mut out = Vec::new();
            // 34 positions first, so later steps take the kernel's tiles of 32 or more keys
            // (values read a 16-byte pack a thread).
            let first: Vec<Vec<i64>> = (0..4)
                .map(|r| (0..34).map(|j| tok(r, j)).collect())
                .collect();
            out.push(
                m.step_logits(&mut st, &first)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap(),
            );
            for (i, s) in srcs.iter().enumerate() {
                st.reorder(s).unwrap();
                let t = if i == 3 { 2 } else { 1 };
                let tokens: Vec<Vec<i64>> = (0..4)
                    .map(|r| (0..t).map(|j| tok(r + i, j + 2)).collect())
                    .collect();
                out.push(
                    m.step_logits(&mut st, &tokens)
                        .unwrap()
                        .to_f32_vec()
                        .unwrap(),
                );
            }
            out
        };
        let (want, got) = (run(&Device::Cpu), run(&dev));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = common::rel_err(g, w);
            assert!(e < 1e-4, "{name} step {i}: rel err {e} against the CPU");
        }
    }
}

/// A model keeps its last run's buffers (and captured step graph) for the next run of the
/// same shape: runs alternating between shapes, sources, beam search and greedy (the same
/// rows either way), give what each gives on a freshly loaded model.
#[test]
fn runs_reusing_the_last_runs_buffers_match_fresh_ones() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu("runs_reusing_the_last_runs_buffers_match_fresh_ones"));
    for dev in &devices {
        for name in ["bart", "gpt2"] {
            let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
            let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
            let load = || models::load_decoder(&md, DType::F32, dev).unwrap();
            let m = load();
            let p = prompts(m.vocab());
            let short = vec![p[0].clone(), p[2].clone()];
            // Same shape, other sources: the kept buffers must take the new values.
            let reversed: Vec<Vec<i64>> = p.iter().rev().cloned().collect();
            // Greedy over as many rows as beam search over `p` (12), of the same lengths.
            let p4: Vec<Vec<i64>> = (0..4).flat_map(|_| p.iter().cloned()).collect();
            let runs: Vec<(Vec<Vec<i64>>, GenerationOptions)> = [
                (&p, 4, 6),
                (&p, 4, 6),
                (&reversed, 4, 6),
                (&p4, 1, 6),
                (&p, 4, 6),
                (&short, 4, 6),
                (&p, 1, 6),
                (&p, 4, 6),
                (&p, 4, 9),
            ]
            .into_iter()
            .map(|(ids, beams, n)| {
                let o = GenerationOptions {
                    num_beams: Some(beams),
                    max_new_tokens: Some(n),
                    min_new_tokens: Some(n),
                    ..Default::default()
                }
                .or(&defaults);
                (ids.clone(), o)
            })
            .collect();
            for (i, (ids, o)) in runs.iter().enumerate() {
                if i == 7 {
                    // The next run, of the kept shape, allocates afresh.
                    m.release_kept_state();
                }
                let got = seqs(m.as_ref(), Inputs::Ids(ids), o);
                let want = seqs(load().as_ref(), Inputs::Ids(ids), o);
                assert_eq!(
                    got, want,
                    "{name} on {dev}: run {i} differs from a fresh model's"
                );
            }
        }
    }
}

/// Greedy search while rows are under their minimum length: the device top-k masks EOS in
/// the logits and renormalizes (the fast path) where the host path processes every logit.
/// A bad word equal to EOS changes no score (HF skips it) but sends every step to the host
/// path, which is the reference. EOS is the token greedy search picks most often, so the
/// mask decides steps.
#[test]
fn greedy_under_a_minimum_length_masks_eos_on_the_device_as_on_the_host() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu(
        "greedy_under_a_minimum_length_masks_eos_on_the_device_as_on_the_host",
    ));
    for dev in &devices {
        for name in ["bart", "gpt2"] {
            let md = ModelDir::open(&fixtures_dir().join(name)).unwrap();
            let defaults = GenerationOptions::model_defaults(&md.path, &md.config).unwrap();
            let m = models::load_decoder(&md, DType::F32, dev).unwrap();
            let p = prompts(m.vocab());
            let plain = GenerationOptions {
                max_new_tokens: Some(8),
                ..Default::default()
            }
            .or(&defaults);
            let mut counts = vec![0usize; m.vocab()];
            for (toks, _) in seqs(m.as_ref(), Inputs::Ids(&p), &plain)
                .into_iter()
                .flatten()
            {
                for &t in &toks {
                    counts[t as usize] += 1;
                }
            }
            let eos = (0..counts.len()).max_by_key(|&t| counts[t]).unwrap() as i64;
            let opts = |host: bool| {
                GenerationOptions {
                    max_new_tokens: Some(8),
                    min_new_tokens: Some(6),
                    eos_token_id: Some(vec![eos]),
                    bad_words_ids: host.then(|| vec![vec![eos]]),
                    ..Default::default()
                }
                .or(&defaults)
            };
            let fast = seqs(m.as_ref(), Inputs::Ids(&p), &opts(false));
            let host = seqs(m.as_ref(), Inputs::Ids(&p), &opts(true));
            for (i, (f, h)) in fast.iter().zip(&host).enumerate() {
                assert_eq!(f[0].0, h[0].0, "{name} on {dev}, prompt {i}: tokens");
                assert!(
                    (f[0].1 - h[0].1).abs() <= 1e-4,
                    "{name} on {dev}, prompt {i}: score {} vs {}",
                    f[0].1,
                    h[0].1
                );
            }
            // The mask decided steps: without the minimum length, some prompt ends sooner.
            let unmasked = GenerationOptions {
                max_new_tokens: Some(8),
                eos_token_id: Some(vec![eos]),
                ..Default::default()
            }
            .or(&defaults);
            let free = seqs(m.as_ref(), Inputs::Ids(&p), &unmasked);
            assert!(
                free.iter()
                    .zip(&fast)
                    .any(|(a, b)| a[0].0.len() < b[0].0.len()),
                "{name}: EOS {eos} never ended an unconstrained run"
            );
        }
    }
}
