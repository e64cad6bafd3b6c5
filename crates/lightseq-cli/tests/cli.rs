//! The `lightseq` binary end to end: forward on fixtures, and every kind of bad input
//! answered with one clear `error:` line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lightseq"))
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lightseq-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn forward(model: &Path, input: &Path, out: &Path) -> Output {
    bin()
        .arg("forward")
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu"])
        .output()
        .unwrap()
}

/// Asserts a clean failure whose single error line contains `needle`.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "error line `{}` lacks `{needle}`",
        lines[0]
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn forward_writes_reference_matching_output() {
    let d = tmpdir("ok");
    let out = d.join("out.safetensors");
    for name in ["bert", "gpt2", "bert_mlm_sharded"] {
        let m = fixtures().join(name);
        let o = forward(&m, &m.join("input.json"), &out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = lightseq::io::safetensors::SafeTensorsFile::open(&out).unwrap();
        let want =
            lightseq::io::safetensors::SafeTensorsFile::open(&m.join("reference.safetensors"))
                .unwrap();
        let key = want.tensors.keys().next().unwrap().clone();
        let (gs, g) = got.read_f32(&key).unwrap();
        let (ws, w) = want.read_f32(&key).unwrap();
        assert_eq!(gs, ws);
        let num: f64 = g
            .iter()
            .zip(&w)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!((num / den).sqrt() < 1e-4, "{name}");
    }
}

#[test]
fn forward_handles_encoder_decoders_and_images() {
    let d = tmpdir("zoo");
    let out = d.join("out.safetensors");
    for (name, input, key) in [
        ("t5", "input.json", "logits"),
        ("marian", "input.json", "logits"),
        ("vit", "input.safetensors", "hidden"),
    ] {
        let m = fixtures().join(name);
        let o = forward(&m, &m.join(input), &out);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = lightseq::io::safetensors::SafeTensorsFile::open(&out).unwrap();
        let want =
            lightseq::io::safetensors::SafeTensorsFile::open(&m.join("reference.safetensors"))
                .unwrap();
        let (gs, g) = got.read_f32(key).unwrap();
        let (ws, w) = want.read_f32(key).unwrap();
        assert_eq!(gs, ws, "{name}");
        let num: f64 = g
            .iter()
            .zip(&w)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!((num / den).sqrt() < 1e-4, "{name}");
    }
    // An encoder-decoder without decoder inputs, and images of the wrong size.
    let inp = d.join("in.json");
    write(&inp, r#"{"input_ids": [[1, 2, 3]]}"#);
    assert_clean_error(
        &forward(&fixtures().join("bart"), &inp, &out),
        "needs `decoder_input_ids`",
    );
    let px = d.join("px.safetensors");
    lightseq::io::safetensors::write_f32(&px, &[("pixel_values", &[1, 3, 8, 8], &[0.5f32; 192])])
        .unwrap();
    assert_clean_error(&forward(&fixtures().join("vit"), &px, &out), "do not match");
    assert_clean_error(&forward(&fixtures().join("gpt2"), &px, &out), "input");
}

#[test]
fn convert_fairseq_writes_a_loadable_model() {
    let d = tmpdir("fairseq");
    let src = fixtures().join("fairseq/pre_norm");
    let o = bin()
        .args(["convert", "fairseq"])
        .arg(src.join("checkpoint.pt"))
        .arg(d.join("m"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("m2m_100"));
    let o = forward(
        &d.join("m"),
        &src.join("input.json"),
        &d.join("out.safetensors"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args(["convert", "fairseq"])
        .arg(d.join("missing.pt"))
        .arg(d.join("m2"))
        .output()
        .unwrap();
    assert_clean_error(&o, "missing.pt");
}

fn generate_cmd(model: &Path, args: &[&str], out: &Path) -> Output {
    bin()
        .arg("generate")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn generate_matches_the_hf_references_through_the_cli() {
    // Case 3 of each reference file: beam 3, length_penalty 0.6, early stopping, 3 returned.
    let d = tmpdir("gen");
    for name in ["gpt2", "bart", "t5"] {
        let refs = read_json(&fixtures().join("generation").join(format!("{name}.json")));
        let case = &refs["cases"][3];
        let o = &case["options"];
        let inp = d.join("in.json");
        write(
            &inp,
            &serde_json::json!({ "input_ids": refs["prompts"] }).to_string(),
        );
        let out = d.join("out.json");
        let mut args: Vec<String> = vec!["--input".into(), inp.display().to_string()];
        for (flag, key) in [
            ("--max-new-tokens", "max_new_tokens"),
            ("--num-beams", "num_beams"),
            ("--length-penalty", "length_penalty"),
            ("--num-return-sequences", "num_return_sequences"),
            ("--eos-token-id", "eos_token_id"),
            ("--pad-token-id", "pad_token_id"),
            ("--decoder-start-token-id", "decoder_start_token_id"),
        ] {
            if !o[key].is_null() {
                args.push(flag.into());
                args.push(o[key].to_string());
            }
        }
        args.push("--early-stopping".into());
        args.push(o["early_stopping"].to_string());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = generate_cmd(&fixtures().join(name), &argv, &out);
        assert!(
            r.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let got = read_json(&out);
        assert_eq!(got["sequences"], case["sequences"], "{name}");
    }
}

#[test]
fn generate_reads_generation_config_and_text() {
    let d = tmpdir("gencfg");
    let m = d.join("gpt2");
    copy_dir(&fixtures().join("gpt2"), &m);
    // Defaults from generation_config.json equal the same options given as flags.
    write(
        &m.join("generation_config.json"),
        r#"{"num_beams": 3, "max_new_tokens": 4, "eos_token_id": 99, "pad_token_id": 0, "num_return_sequences": 2}"#,
    );
    let (a, b) = (d.join("a.json"), d.join("b.json"));
    let r = generate_cmd(
        &m,
        &["--text", "hello world the cat", "--text", "sat on the mat"],
        &a,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    std::fs::remove_file(m.join("generation_config.json")).unwrap();
    let flags = [
        "--num-beams",
        "3",
        "--max-new-tokens",
        "4",
        "--eos-token-id",
        "99",
        "--pad-token-id",
        "0",
        "--num-return-sequences",
        "2",
    ];
    let inp = d.join("in.json");
    write(&inp, r#"{"input_ids": [[1, 2, 3, 4], [5, 6, 3, 7]]}"#);
    let mut args = vec!["--input", inp.to_str().unwrap()];
    args.extend(flags);
    let r = generate_cmd(&m, &args, &b);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (ja, jb) = (read_json(&a), read_json(&b));
    assert_eq!(ja["sequences"], jb["sequences"]);
    assert_eq!(ja["sequences"][0].as_array().unwrap().len(), 2);
    // Text out: the decoded sequences start with the prompt's words.
    let text = ja["text"][0][0].as_str().unwrap();
    assert!(text.starts_with("hello world the cat"), "{text}");
}

#[test]
fn generate_errors_are_clear() {
    let d = tmpdir("generr");
    let out = d.join("o.json");
    let g = fixtures().join("gpt2");
    let inp = d.join("in.json");
    write(&inp, r#"{"input_ids": [[1, 2]]}"#);
    let i = inp.to_str().unwrap();
    assert_clean_error(&generate_cmd(&g, &[], &out), "exactly one of");
    assert_clean_error(
        &generate_cmd(&g, &["--input", i, "--text", "x"], &out),
        "exactly one of",
    );
    assert_clean_error(
        &generate_cmd(&g, &["--input", i, "--early-stopping", "sometimes"], &out),
        "early_stopping",
    );
    assert_clean_error(
        &generate_cmd(
            &g,
            &[
                "--input",
                i,
                "--num-beams",
                "2",
                "--num-return-sequences",
                "3",
            ],
            &out,
        ),
        "num_return_sequences",
    );
    assert_clean_error(
        &generate_cmd(&g, &["--input", i, "--max-length", "2"], &out),
        "max_length",
    );
    assert_clean_error(
        &generate_cmd(&fixtures().join("bart"), &["--text", "hello"], &out),
        "tokenizer.json",
    );
    assert_clean_error(
        &generate_cmd(&fixtures().join("bert"), &["--input", i], &out),
        "does not generate",
    );
    let st = d.join("states.safetensors");
    lightseq::io::safetensors::write_f32(
        &st,
        &[("encoder_hidden_states", &[1, 2, 32], &[0.1f32; 64])],
    )
    .unwrap();
    assert_clean_error(
        &generate_cmd(&g, &["--encoder-states", st.to_str().unwrap()], &out),
        "encoder-decoder",
    );
    write(&inp, r#"{"input_ids": [[1, 5000]]}"#);
    assert_clean_error(
        &generate_cmd(&g, &["--input", i], &out),
        "outside the vocabulary",
    );
}

#[test]
fn generate_from_encoder_states_file() {
    // States made by the library's encoder, written as a user would write HF's.
    let d = tmpdir("genstates");
    let m = fixtures().join("bart");
    let md = lightseq::io::ModelDir::open(&m).unwrap();
    let model =
        lightseq::models::load_decoder(&md, lightseq::DType::F32, &lightseq::Device::Cpu).unwrap();
    let src = vec![vec![5i64, 9, 14, 3], vec![7, 2]];
    let (states, lens) = model.encode_sources(&src).unwrap();
    let v = states.to_f32_vec().unwrap();
    let mask: Vec<f32> = (0..2)
        .flat_map(|b| (0..states.shape()[1]).map(move |t| if t < [4, 2][b] { 1.0 } else { 0.0 }))
        .collect();
    assert_eq!(lens, vec![4, 2]);
    let st = d.join("states.safetensors");
    lightseq::io::safetensors::write_f32(
        &st,
        &[
            ("encoder_hidden_states", states.shape(), &v),
            ("attention_mask", &states.shape()[..2], &mask),
        ],
    )
    .unwrap();
    let inp = d.join("in.json");
    write(&inp, &serde_json::json!({ "input_ids": src }).to_string());
    let (a, b) = (d.join("a.json"), d.join("b.json"));
    let flags = ["--max-new-tokens", "5", "--num-beams", "2"];
    let r = generate_cmd(
        &m,
        &[&["--encoder-states", st.to_str().unwrap()][..], &flags].concat(),
        &a,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = generate_cmd(
        &m,
        &[&["--input", inp.to_str().unwrap()][..], &flags].concat(),
        &b,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(read_json(&a)["sequences"], read_json(&b)["sequences"]);
}

fn train_rows(name: &str) -> (serde_json::Value, String) {
    let refs = read_json(&fixtures().join(format!("train/{name}.json")));
    let lines: Vec<String> = refs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r.get("src") {
            Some(_) => r.to_string(),
            None => serde_json::json!({ "ids": r }).to_string(),
        })
        .collect();
    (refs, lines.join("\n") + "\n")
}

fn read_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_logs_the_pytorch_losses_and_saves_a_loadable_model() {
    let d = tmpdir("train");
    for name in ["gpt2", "marian"] {
        let (refs, rows) = train_rows(name);
        let data = d.join(format!("{name}.jsonl"));
        write(&data, &rows);
        for case in refs["cases"].as_array().unwrap() {
            let log = d.join("log.jsonl");
            let save = d.join("saved");
            let ls = case["label_smoothing"].as_f64().unwrap().to_string();
            let clip = case["clip_norm"].as_f64().unwrap_or(0.0).to_string();
            let o = bin()
                .args(["train", "--device", "cpu", "--init"])
                .arg(fixtures().join(name))
                .arg("--train")
                .arg(&data)
                .arg("--save-dir")
                .arg(&save)
                .arg("--log")
                .arg(&log)
                .args([
                    "--max-steps",
                    "15",
                    "--lr",
                    "0.001",
                    "--adam-betas",
                    "0.9,0.98",
                    "--weight-decay",
                    "0.01",
                    "--dropout",
                    "0",
                    "--shuffle",
                    "false",
                ])
                .args(["--label-smoothing", &ls, "--clip-norm", &clip])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let logged = read_log(&log);
            let want = case["steps"].as_array().unwrap();
            assert_eq!(logged.len(), 15);
            for (i, (g, w)) in logged.iter().zip(want).enumerate() {
                assert_eq!(g["step"].as_u64(), Some(i as u64 + 1));
                for k in ["nll_loss", "lr", "tokens", "grad_norm"] {
                    assert!(g.get(k).is_some(), "log line without {k}");
                }
                let (gl, wl) = (g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
                assert!(
                    ((gl - wl) / wl).abs() <= 1e-4,
                    "{name} step {}: {gl} vs torch {wl}",
                    i + 1
                );
            }
            for f in [
                "config.json",
                "model.safetensors",
                "optimizer.safetensors",
                "loss.png",
            ] {
                assert!(save.join(f).is_file(), "{name}: no {f} in the save dir");
            }
            // The saved directory loads and runs.
            let inp = d.join("in.json");
            if name == "marian" {
                write(
                    &inp,
                    r#"{"input_ids": [[3, 14, 15], [35, 39]], "decoder_input_ids": [[88, 5], [88]]}"#,
                );
            } else {
                write(&inp, r#"{"input_ids": [[3, 14, 15], [35, 39]]}"#);
            }
            let o = forward(&save, &inp, &d.join("out.safetensors"));
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let (_, rows) = train_rows("gpt2");
    let data = d.join("gpt2.jsonl");
    write(&data, &rows);
    let run = |extra: &[&str], model: &Path| {
        bin()
            .args(["train", "--device", "cpu", "--init"])
            .arg(model)
            .arg("--train")
            .arg(&data)
            .arg("--save-dir")
            .arg(d.join("x"))
            .args(extra)
            .output()
            .unwrap()
    };
    assert_clean_error(
        &run(&["--dropout", "1.5"], &fixtures().join("gpt2")),
        "dropout",
    );
    assert_clean_error(&run(&[], &fixtures().join("t5")), "not supported");
    assert_clean_error(&run(&[], &fixtures().join("marian")), "src");
    assert_clean_error(
        &run(&["--schedule", "step"], &fixtures().join("gpt2")),
        "unknown schedule",
    );
    assert_clean_error(&run(&["--dtype", "f8"], &fixtures().join("gpt2")), "f8");
}

#[test]
fn train_resumes_where_it_stopped() {
    let d = tmpdir("resume");
    let (_, rows) = train_rows("marian");
    let data = d.join("marian.jsonl");
    write(&data, &rows);
    let train = |save: &Path, log: &Path, steps: &str, resume: bool| {
        let mut c = bin();
        c.args(["train", "--device", "cpu", "--init"])
            .arg(fixtures().join("marian"))
            .arg("--train")
            .arg(&data)
            .arg("--save-dir")
            .arg(save)
            .arg("--log")
            .arg(log)
            .args(["--max-steps", steps, "--lr", "0.001", "--dropout", "0"])
            .args(["--label-smoothing", "0.1", "--schedule", "inverse_sqrt"])
            .args([
                "--warmup-steps",
                "4",
                "--max-tokens",
                "40",
                "--shuffle",
                "true",
            ]);
        if resume {
            c.arg("--resume");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (full, part) = (d.join("full"), d.join("part"));
    train(&full, &d.join("full.jsonl"), "9", false);
    train(&part, &d.join("part.jsonl"), "4", false);
    train(&part, &d.join("part.jsonl"), "9", true);
    let (a, b) = (
        read_log(&d.join("full.jsonl")),
        read_log(&d.join("part.jsonl")),
    );
    assert_eq!(a.len(), 9);
    assert_eq!(b.len(), 9, "the resumed run appends steps 5..9");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["tokens"], y["tokens"], "same batches after resuming");
        let (l1, l2) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (l1 - l2).abs() <= 1e-6 * l1,
            "step {}: {l1} vs {l2}",
            x["step"]
        );
    }
}

#[test]
fn empty_batch_is_fine() {
    let d = tmpdir("empty");
    let inp = d.join("in.json");
    write(&inp, r#"{"input_ids": []}"#);
    let o = forward(&fixtures().join("bert"), &inp, &d.join("out.safetensors"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn missing_directory() {
    let d = tmpdir("nodir");
    let inp = fixtures().join("bert/input.json");
    assert_clean_error(
        &forward(&d.join("nope"), &inp, &d.join("o")),
        "no such directory",
    );
}

#[test]
fn missing_and_malformed_config() {
    let d = tmpdir("cfg");
    let m = d.join("m");
    copy_dir(&fixtures().join("bert"), &m);
    let inp = m.join("input.json");
    std::fs::remove_file(m.join("config.json")).unwrap();
    assert_clean_error(&forward(&m, &inp, &d.join("o")), "config.json");
    write(&m.join("config.json"), "{\"model_type\": \"bert\", ");
    assert_clean_error(&forward(&m, &inp, &d.join("o")), "malformed JSON");
    write(
        &m.join("config.json"),
        r#"{"model_type": "bert", "hidden_size": "big"}"#,
    );
    assert_clean_error(&forward(&m, &inp, &d.join("o")), "config.json");
}

#[test]
fn unknown_model_type() {
    let d = tmpdir("mt");
    let m = d.join("m");
    copy_dir(&fixtures().join("bert"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("\"bert\"", "\"wavenet\"");
    write(&m.join("config.json"), &cfg);
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        "unsupported model_type `wavenet`",
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let d = tmpdir("st");
    let m = d.join("m");
    copy_dir(&fixtures().join("gpt2"), &m);
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        "truncated",
    );
    std::fs::write(&st, &bytes[..5]).unwrap();
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        "too short",
    );
    let mut junk = bytes.clone();
    junk[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&st, &junk).unwrap();
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        "malformed header",
    );
    std::fs::remove_file(&st).unwrap();
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        "no model.safetensors",
    );
}

#[test]
fn shape_disagreeing_with_config_and_missing_tensor() {
    let d = tmpdir("shape");
    let m = d.join("m");
    copy_dir(&fixtures().join("bert"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let mut v2 = v.clone();
    v2["intermediate_size"] = serde_json::json!(40);
    write(&m.join("config.json"), &v2.to_string());
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        "has shape",
    );
    write(&m.join("config.json"), &cfg);
    // Rewrite the checkpoint without one tensor.
    let st =
        lightseq::io::safetensors::SafeTensorsFile::open(&m.join("model.safetensors")).unwrap();
    let drop = "encoder.layer.1.output.dense.bias";
    assert!(st.tensors.contains_key(drop));
    let kept: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors
        .keys()
        .filter(|k| k.as_str() != drop)
        .map(|k| {
            let (s, v) = st.read_f32(k).unwrap();
            (k.clone(), s, v)
        })
        .collect();
    drop_file(st);
    let refs: Vec<(&str, &[usize], &[f32])> = kept
        .iter()
        .map(|(k, s, v)| (k.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    lightseq::io::safetensors::write_f32(&m.join("model.safetensors"), &refs).unwrap();
    assert_clean_error(
        &forward(&m, &m.join("input.json"), &d.join("o")),
        &format!("missing tensor `{drop}`"),
    );
}

fn drop_file<T>(_: T) {}

#[test]
fn bad_token_ids_and_input_json() {
    let d = tmpdir("ids");
    let m = fixtures().join("gpt2");
    let inp = d.join("in.json");
    let cases = [
        (
            r#"{"input_ids": [[1, 2], [3, 101]]}"#,
            "id 101 is outside the vocabulary",
        ),
        (
            r#"{"input_ids": [[1, -4]]}"#,
            "id -4 is outside the vocabulary",
        ),
        (r#"{"input_ids": [[1, 2.5]]}"#, "not an integer"),
        (r#"{"input_ids": [1, 2]}"#, "must be a list of integers"),
        (r#"{"ids": [[1]]}"#, "no `input_ids`"),
        (r#"{"input_ids": [[1, 2]"#, "malformed JSON"),
        (r#"[[1, 2]]"#, "expected a JSON object"),
    ];
    for (text, needle) in cases {
        write(&inp, text);
        assert_clean_error(&forward(&m, &inp, &d.join("o")), needle);
    }
    let long: Vec<i64> = (0..49).map(|i| i % 100).collect();
    write(
        &inp,
        &serde_json::json!({ "input_ids": [long] }).to_string(),
    );
    assert_clean_error(
        &forward(&m, &inp, &d.join("o")),
        "more than the model's 48 positions",
    );
    assert_clean_error(
        &forward(&m, &d.join("absent.json"), &d.join("o")),
        "absent.json",
    );
    // token types of the wrong shape or out of range
    let b = fixtures().join("bert_cls_types");
    write(&inp, r#"{"input_ids": [[1, 2]], "token_type_ids": [[0]]}"#);
    assert_clean_error(&forward(&b, &inp, &d.join("o")), "same ragged shape");
    write(
        &inp,
        r#"{"input_ids": [[1, 2]], "token_type_ids": [[0, 7]]}"#,
    );
    assert_clean_error(&forward(&b, &inp, &d.join("o")), "outside the vocabulary");
}

#[test]
fn absent_cuda_device_and_bad_options() {
    let d = tmpdir("dev");
    let m = fixtures().join("bert");
    let run = |dev: &str, dtype: &str| {
        bin()
            .arg("forward")
            .arg(&m)
            .arg("--input")
            .arg(m.join("input.json"))
            .arg("--out")
            .arg(d.join("o"))
            .args(["--device", dev, "--dtype", dtype])
            .output()
            .unwrap()
    };
    // No machine has 64 GPUs; without CUDA the error names what is missing instead.
    let o = run("cuda:63", "f32");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cuda:63") || err.contains("CUDA driver library"),
        "{err}"
    );
    assert_clean_error(&o, "device");
    assert_clean_error(&run("tpu", "f32"), "unknown device `tpu`");
    assert_clean_error(&run("cpu", "f8"), "unknown dtype `f8`");
}

#[test]
fn info_describes_model() {
    let o = bin()
        .arg("info")
        .arg(fixtures().join("bert_mlm_sharded"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        s.contains("model_type:   bert") && s.contains("parameters:") && s.contains("F32"),
        "{s}"
    );
    let o = bin()
        .arg("info")
        .arg("/nonexistent/model")
        .output()
        .unwrap();
    assert_clean_error(&o, "no such directory");
}

#[test]
fn train_update_freq_sums_batches_into_one_update() {
    // Split into small batches and summed back with --update-freq, each update is the full
    // batch: the log must match the full-batch PyTorch reference.
    let d = tmpdir("update_freq");
    let (refs, rows) = train_rows("marian");
    let data = d.join("marian.jsonl");
    write(&data, &rows);
    let case = &refs["cases"][1]; // no label smoothing, no clipping
    let log = d.join("log.jsonl");
    let o = bin()
        .args(["train", "--device", "cpu", "--init"])
        .arg(fixtures().join("marian"))
        .arg("--train")
        .arg(&data)
        .arg("--valid")
        .arg(&data)
        .arg("--save-dir")
        .arg(d.join("out"))
        .arg("--log")
        .arg(&log)
        .args(["--max-tokens", "20", "--update-freq", "5", "--epochs", "6"])
        .args([
            "--lr",
            "0.001",
            "--adam-betas",
            "0.9,0.98",
            "--weight-decay",
            "0.01",
        ])
        .args(["--dropout", "0", "--shuffle", "false"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let logged = read_log(&log);
    assert_eq!(logged.len(), 6, "one update per epoch");
    for (g, w) in logged.iter().zip(case["steps"].as_array().unwrap()) {
        let (gl, wl) = (g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
        assert!(((gl - wl) / wl).abs() <= 1e-4, "{gl} vs torch {wl}");
        assert_eq!(g["tokens"].as_u64(), Some(28));
    }
    let valid = std::fs::read_to_string(d.join("out/valid.jsonl")).unwrap();
    assert_eq!(
        valid.lines().count(),
        6,
        "a validation loss after every epoch"
    );
}

#[test]
fn train_rejects_out_of_range_options() {
    let d = tmpdir("train-options");
    let data = d.join("rows.jsonl");
    write(&data, "{\"ids\": [1, 2, 3, 4]}\n{\"ids\": [5, 6, 7]}\n");
    let run = |extra: &[&str]| {
        bin()
            .arg("train")
            .arg("--init")
            .arg(fixtures().join("gpt2"))
            .arg("--train")
            .arg(&data)
            .arg("--save-dir")
            .arg(d.join("out"))
            .args(["--device", "cpu"])
            .args(extra)
            .output()
            .unwrap()
    };
    for (flag, value) in [
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--adam-eps", "-1e-8"),
        ("--weight-decay", "-0.1"),
        ("--clip-norm", "-1"),
        ("--clip-norm", "inf"),
    ] {
        let arg = format!("{flag}={value}");
        assert_clean_error(&run(&[arg.as_str()]), &format!("{flag} must be"));
    }
    assert_clean_error(
        &run(&["--label-smoothing", "1.5"]),
        "--label-smoothing must be in [0, 1)",
    );
    assert_clean_error(&run(&["--max-tokens", "0"]), "--max-tokens must be");
    assert_clean_error(&run(&["--update-freq", "0"]), "--update-freq must be");
    assert_clean_error(&run(&["--dropout", "1"]), "--dropout must be");
    // A seq2seq row with nothing to translate or predict names its line.
    let s2s = d.join("s2s.jsonl");
    write(
        &s2s,
        "{\"src\": [5, 6], \"tgt\": [7, 2]}\n{\"src\": [5, 6], \"tgt\": []}\n",
    );
    let o = bin()
        .arg("train")
        .arg("--init")
        .arg(fixtures().join("marian"))
        .arg("--train")
        .arg(&s2s)
        .arg("--save-dir")
        .arg(d.join("s2s-out"))
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert_clean_error(&o, "s2s.jsonl:2: `src` and `tgt` must not be empty");
    // In range, the same run trains.
    let o = run(&[
        "--lr",
        "1e-3",
        "--label-smoothing",
        "0.1",
        "--clip-norm",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("out/model.safetensors").is_file());
}

#[test]
fn train_a_classifier_from_a_masked_lm_checkpoint() {
    let d = tmpdir("train-fresh-head");
    let data = d.join("rows.jsonl");
    write(
        &data,
        "{\"ids\": [2, 5, 9, 3], \"label\": 1}\n{\"ids\": [2, 7, 3], \"label\": 0}\n",
    );
    let train = |init: &Path, out: &str| {
        bin()
            .arg("train")
            .arg("--init")
            .arg(init)
            .args(["--task", "classify", "--device", "cpu", "--max-steps", "2"])
            .arg("--train")
            .arg(&data)
            .arg("--save-dir")
            .arg(d.join(out))
            .output()
            .unwrap()
    };
    let o = train(&fixtures().join("bert_mlm_sharded"), "first");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("initialized here (not in the checkpoint): bert.pooler.dense.weight, bert.pooler.dense.bias, classifier.weight, classifier.bias"),
        "{err}"
    );
    let config = read_json(&d.join("first/config.json"));
    assert_eq!(
        config["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(config["num_labels"], 2);
    // Its own checkpoint has the head: nothing starts fresh, and the task comes from the
    // saved architectures.
    let o = bin()
        .arg("train")
        .arg("--init")
        .arg(d.join("first"))
        .args(["--device", "cpu", "--max-steps", "1"])
        .arg("--train")
        .arg(&data)
        .arg("--save-dir")
        .arg(d.join("second"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("initialized here"), "{err}");
    assert!(err.contains("Classify"), "{err}");
    // Three classes where the config names none: refused until --num-labels says so.
    let three = d.join("three.jsonl");
    write(
        &three,
        "{\"ids\": [2, 5, 9, 3], \"label\": 2}\n{\"ids\": [2, 7, 3], \"label\": 0}\n",
    );
    let run = |extra: &[&str], out: &str| {
        bin()
            .arg("train")
            .arg("--init")
            .arg(fixtures().join("bert_mlm_sharded"))
            .args(["--task", "classify", "--device", "cpu", "--max-steps", "1"])
            .args(extra)
            .arg("--train")
            .arg(&three)
            .arg("--save-dir")
            .arg(d.join(out))
            .output()
            .unwrap()
    };
    assert_clean_error(&run(&[], "two"), "outside the model's 2 classes");
    let o = run(&["--num-labels", "3"], "three");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_json(&d.join("three/config.json"))["num_labels"], 3);
    assert_clean_error(&run(&["--num-labels", "0"], "none"), "--num-labels must be");
}

#[test]
fn train_a_vit_classifier_from_a_bare_vit_model() {
    let d = tmpdir("train-vit-fresh");
    let m = fixtures().join("vit");
    let config = read_json(&m.join("config.json"));
    let (side, ch) = (
        config["image_size"].as_u64().unwrap() as usize,
        config["num_channels"].as_u64().unwrap_or(3) as usize,
    );
    let rows: Vec<String> = (0..2)
        .map(|k| {
            let px: Vec<f32> = (0..ch * side * side)
                .map(|i| ((i * 37 + k * 11) % 17) as f32 / 8.0 - 1.0)
                .collect();
            serde_json::json!({"pixel_values": px, "label": k}).to_string()
        })
        .collect();
    let data = d.join("rows.jsonl");
    write(&data, &(rows.join("\n") + "\n"));
    let o = bin()
        .arg("train")
        .arg("--init")
        .arg(&m)
        .args(["--device", "cpu", "--max-steps", "1"])
        .arg("--train")
        .arg(&data)
        .arg("--save-dir")
        .arg(d.join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(
            "initialized here (not in the checkpoint): classifier.weight, classifier.bias"
        ),
        "{err}"
    );
    let saved = read_json(&d.join("out/config.json"));
    assert_eq!(
        saved["architectures"],
        serde_json::json!(["ViTForImageClassification"])
    );
    // Saved under ViTForImageClassification's names, the encoder loads again as is.
    let ck = lightseq::io::ModelDir::open(&d.join("out")).unwrap();
    assert!(ck.checkpoint.contains("vit.embeddings.cls_token"));
    assert!(!ck.checkpoint.contains("embeddings.cls_token"));
}
