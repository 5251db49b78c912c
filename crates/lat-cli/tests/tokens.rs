//! Token-level models as a user runs them: a BPE trained on a corpus, a model trained with it
//! into a model directory, evaluated in bits per byte, generating and serving UTF-8 text; and
//! every bad input a one-line error that leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use linear_attention_transformer::text::Codec;
use serde_json::{json, Value};

fn lat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lat")).args(args).output().expect("lat runs")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// A failure: non-zero exit, and exactly one line on stderr starting with "error: ".
fn fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got success; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle) && !err.contains("panicked"), "stderr {err:?} lacks {needle:?}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Some 60 KB of text with characters of one to four bytes.
fn corpus(dir: &Path) -> PathBuf {
    let lines = ["To be, or not to be, that is the question:", "Zürich und Köln — 東京 🦀 Ωμέγα.", "Whether 'tis nobler in the mind to suffer", "The slings and arrows of outrageous fortune."];
    let text: String = (0..1200).map(|i| format!("{} {i}\n", lines[i % 4])).collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

const SMALL: [&str; 20] = [
    "--set",
    "model.dim=32",
    "--set",
    "model.n_local_attn_heads=1",
    "--set",
    "model.depth=1",
    "--set",
    "model.heads=2",
    "--set",
    "model.dim_head=16",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.seq_len=64",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.sample_every=0",
    "--set",
    "train.eval_windows=2",
];

#[test]
fn a_token_model_trains_evaluates_in_bits_per_byte_generates_and_serves_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let tok = dir.path().join("tok.json");
    let out = ok(&lat(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "320", "--out", s(&tok), "--quiet"]));
    assert!(out.contains("ids") && out.contains("bytes per token"), "{out}");
    let codec = Codec::load(&tok).unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--data", s(&data), "--tokenizer", s(&tok), "--out", s(&run), "--max-steps", "3", "--quiet"];
    args.extend(SMALL);
    let out = ok(&lat(&args));
    assert!(out.contains("bits per byte"), "{out}");
    // The run folder is a model directory; num_tokens is the tokenizer's vocabulary.
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokens.bin"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_tokens"], codec.vocab_size());
    // The next session reads the token cache it built.
    let resumed = lat(&["train", "--data", s(&data), "--out", s(&run), "--resume", "--max-steps", "4"]);
    ok(&resumed);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("(reused)"), "{}", String::from_utf8_lossy(&resumed.stderr));

    let e: Value = serde_json::from_str(&ok(&lat(&["eval", "--model", s(&run), "--data", s(&data), "--split", "test", "--json"]))).unwrap();
    let (bpb, per_token) = (e["bpc"].as_f64().unwrap(), e["loss_per_token"].as_f64().unwrap());
    let bytes_per_token = e["bytes"].as_f64().unwrap() / e["tokens"].as_f64().unwrap();
    assert!(bytes_per_token > 1.2, "{e}");
    assert!((bpb - per_token / std::f64::consts::LN_2 / bytes_per_token).abs() < 0.05 * bpb, "{e}");
    let text = ok(&lat(&["eval", "--model", s(&run.join("model.safetensors")), "--data", s(&data)]));
    assert!(text.contains("bits per byte") && text.contains("nats per token"), "{text}");

    // Generated text is whole characters, streamed or not, and decodes the ids exactly.
    let streamed = ok(&lat(&["generate", "--model", s(&run), "--prompt", "Zürich ", "--max-new", "40", "--seed", "3"]));
    assert!(streamed.starts_with("Zürich "), "{streamed}");
    let j: Value = serde_json::from_str(&ok(&lat(&["generate", "--model", s(&run), "--prompt", "Zürich ", "--max-new", "40", "--seed", "3", "--json"]))).unwrap();
    let ids: Vec<u32> = j["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(streamed.trim_end_matches('\n'), format!("Zürich {}", codec.decode(&ids)));

    // Served from the directory, the same text.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lat")).args(["serve", "--model", s(&run), "--port", "0"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = format!("http://{}/v1/completions", line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap());
    let greedy = |stream: bool| ureq::post(&url).send_string(&json!({"prompt": "To be", "max_tokens": 30, "temperature": 0, "stream": stream}).to_string()).unwrap().into_string().unwrap();
    let whole: Value = serde_json::from_str(&greedy(false)).unwrap();
    let streamed: String = greedy(true)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").filter(|d| *d != "[DONE]").map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string()))
        .collect();
    child.kill().ok();
    child.wait().ok();
    let j: Value = serde_json::from_str(&ok(&lat(&["generate", "--model", s(&run), "--prompt", "To be", "--max-new", "30", "--top-k", "1", "--json"]))).unwrap();
    let ids: Vec<u32> = j["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(whole["choices"][0]["text"], codec.decode(&ids));
    assert_eq!(streamed, codec.decode(&ids));
    assert_eq!(whole["usage"]["prompt_tokens"], codec.encode(b"To be").unwrap().len());
}

#[test]
fn bad_token_inputs_are_one_line_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let tok = dir.path().join("tok.json");
    ok(&lat(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "300", "--out", s(&tok), "--quiet"]));
    let run = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--out", s(&run), "--max-steps", "1", "--quiet"];
        args.extend(SMALL);
        args.extend(extra);
        lat(&args)
    };
    fails(&train(&["--data", s(&data), "--tokenizer", s(&dir.path().join("missing.json"))]), "missing.json");
    let corrupt = dir.path().join("corrupt.json");
    std::fs::write(&corrupt, "{\"model\": {\"type\": \"BPE\", \"vocab\": 7}}").unwrap();
    fails(&train(&["--data", s(&data), "--tokenizer", s(&corrupt)]), "not a tokenizer.json");
    fails(&train(&["--data", s(&data), "--tokenizer", s(&tok), "--set", "model.num_tokens=100"]), "raise model.num_tokens to at least");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    fails(&train(&["--data", s(&empty), "--tokenizer", s(&tok)]), "empty");
    let jsonl = dir.path().join("docs.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
    fails(&train(&["--data", s(&jsonl), "--tokenizer", s(&tok)]), "no string field \"text\"");
    assert!(!run.join("tokens.bin").exists() && !run.join("model.safetensors").exists(), "nothing written");
    if run.exists() {
        let left: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("tmp") || n.to_string_lossy().contains("partial")).collect();
        assert!(left.is_empty(), "{left:?}");
    }
    // JSON Lines with the field named: trains.
    let mut good = vec![];
    for line in std::fs::read_to_string(&data).unwrap().lines() {
        good.push(json!({"body": line}).to_string());
    }
    std::fs::write(&jsonl, good.join("\n")).unwrap();
    ok(&train(&["--data", s(&jsonl), "--text-field", "body", "--tokenizer", s(&tok)]));
    // The reference's README model: its configuration takes the tokenizer's vocabulary, and
    // names the tokenizer it needs when there is none.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/readme_lm.toml");
    let plan: Value = serde_json::from_str(&ok(&lat(&["plan", "--config", s(&example), "--tokenizer", s(&tok), "--json"]))).unwrap();
    assert!(plan["total"].as_u64().unwrap() > 0, "{plan}");
    fails(&lat(&["train", "--config", s(&example), "--out", s(&dir.path().join("readme")), "--quiet"]), "bpe-20000.json");
    // The tokenizer command's own errors.
    fails(&lat(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "100", "--out", s(&dir.path().join("t.json"))]), "at least 257");
    fails(&lat(&["tokenizer", "train", "--data", s(&empty), "--vocab-size", "300", "--out", s(&dir.path().join("t.json"))]), "empty");
    assert!(!dir.path().join("t.json").exists());
    // A model directory's tokenizer must cover the model's ids, and a token model without one
    // takes ids only.
    let model = dir.path().join("run/model.safetensors");
    let lone = dir.path().join("lone.safetensors");
    std::fs::copy(&model, &lone).unwrap();
    fails(&lat(&["generate", "--model", s(&lone), "--prompt", "x", "--max-new", "2"]), "no tokenizer");
    ok(&lat(&["generate", "--model", s(&lone), "--tokenizer", s(&tok), "--prompt", "x", "--max-new", "2"]));
}

#[test]
fn a_run_learns_its_tokenizer_from_the_training_split_and_resumes_with_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let tok = dir.path().join("tok.json");
    ok(&lat(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "300", "--out", s(&tok), "--quiet"]));
    let train = |run: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--data", s(&data), "--out", s(run), "--max-steps", "2", "--quiet"];
        args.extend(SMALL);
        args.extend(extra);
        lat(&args)
    };
    let num_tokens = |run: &Path| serde_json::from_str::<Value>(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()["num_tokens"].clone();

    // bpe:N learns what `lat tokenizer train` learns from the same split, into the run folder.
    let run = dir.path().join("bpe");
    ok(&train(&run, &["--tokenizer", "bpe:300"]));
    assert_eq!(std::fs::read(run.join("tokenizer.json")).unwrap(), std::fs::read(&tok).unwrap());
    assert_eq!(num_tokens(&run), 300);
    assert!(std::fs::read_to_string(run.join("config.toml")).unwrap().contains("tokenizer = \"bpe:300\""));
    // Resuming reads that copy: without it the run cannot go on.
    let resumed = lat(&["train", "--data", s(&data), "--out", s(&run), "--resume", "--max-steps", "3"]);
    ok(&resumed);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("(reused)"), "{}", String::from_utf8_lossy(&resumed.stderr));
    // Quantized into a model directory, the model keeps its tokenizer; as a lone file it is
    // told where the tokenizer is.
    let int8 = dir.path().join("int8");
    ok(&lat(&["quantize", "--model", s(&run), "--to", "int8", "--out", s(&int8)]));
    assert_eq!(std::fs::read(int8.join("tokenizer.json")).unwrap(), std::fs::read(&tok).unwrap());
    assert!(ok(&lat(&["generate", "--model", s(&int8), "--prompt", "To be", "--max-new", "8"])).starts_with("To be"));
    let lone = lat(&["quantize", "--model", s(&run), "--to", "bf16", "--out", s(&dir.path().join("bf16.safetensors"))]);
    ok(&lone);
    assert!(String::from_utf8_lossy(&lone.stderr).contains("pass --tokenizer"), "{}", String::from_utf8_lossy(&lone.stderr));
    std::fs::remove_file(run.join("tokenizer.json")).unwrap();
    fails(&lat(&["train", "--data", s(&data), "--out", s(&run), "--resume", "--max-steps", "4"]), "tokenizer.json");

    // The built-in run learns a BPE of 1 024 ids; bytes stay a setting away.
    let default = dir.path().join("default");
    ok(&train(&default, &[]));
    assert_eq!(num_tokens(&default), 1024);
    assert!(Codec::load(&default.join("tokenizer.json")).unwrap().vocab_size() <= 1024);
    let bytes = dir.path().join("bytes");
    ok(&train(&bytes, &["--tokenizer", "bytes"]));
    assert_eq!(num_tokens(&bytes), 256);
    assert!(!bytes.join("tokenizer.json").exists());
    // A tokenizer that another model left behind does not stay beside a byte model: not in a
    // new run's folder, nor in the directory a byte model is quantized into.
    let reused = dir.path().join("reused");
    std::fs::create_dir_all(&reused).unwrap();
    std::fs::copy(&tok, reused.join("tokenizer.json")).unwrap();
    ok(&train(&reused, &["--tokenizer", "bytes"]));
    assert!(!reused.join("tokenizer.json").exists());
    ok(&lat(&["quantize", "--model", s(&bytes), "--to", "int8", "--out", s(&int8)]));
    assert!(!int8.join("tokenizer.json").exists());
    // (A barely trained byte model may print bytes that are not UTF-8.)
    assert!(lat(&["generate", "--model", s(&int8), "--prompt", "To be", "--max-new", "4"]).status.success());
    // The f32 model is not overwritten through another spelling of its path.
    let other_spelling = dir.path().join("bytes/../bytes");
    fails(&lat(&["quantize", "--model", s(&bytes), "--to", "int8", "--out", s(&other_spelling)]), "--out must differ");

    for (extra, needle) in [
        (&["--tokenizer", "bpe:12"][..], "at least 257"),
        (&["--tokenizer", "bpe:many"][..], "bpe:N learns"),
        (&["--tokenizer", "bpe:300", "--set", "model.num_tokens=100"][..], "raise model.num_tokens to at least 300"),
        (&["--tokenizer", "bytes", "--set", "model.num_tokens=300"][..], "num_tokens = 256"),
    ] {
        let run = dir.path().join("refused");
        fails(&train(&run, extra), needle);
        assert!(!run.exists(), "{extra:?} left a run folder");
    }
}
