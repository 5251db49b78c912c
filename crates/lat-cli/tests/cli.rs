//! The `lat` commands as a user runs them: contracts of DESIGN.md, one-line errors, no
//! half-written outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn lat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lat")).args(args).output().expect("lat runs")
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name).to_string_lossy().into_owned()
}

/// A failure: non-zero exit, and exactly one line on stderr starting with "error: ".
fn fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure, got success; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn import_then_logits_reproduces_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = path(dir.path(), "m.safetensors");
    let out = path(dir.path(), "logits.safetensors");
    let o = lat(&["import", "--torch", &fixture("causal_masked.pt"), "--config", &fixture("causal_masked.json"), "--out", &model]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = lat(&["logits", "--model", &model, "--tokens", &fixture("causal_masked.safetensors"), "--out", &out]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap().remove("logits").unwrap();
    let want = candle_core::safetensors::load(fixture("causal_masked.safetensors"), &Device::Cpu).unwrap().remove("output").unwrap();
    let err = ((&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()) / want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err <= 1e-4, "relative error {err}");
    // The model file carries the Python keyword arguments and the reference's tensor names.
    let bytes = std::fs::read(&model).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["lat.config"]).unwrap();
    assert_eq!(config["num_tokens"], 48);
    assert_eq!(config["n_local_attn_heads"], 1);
    let names = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();
    assert!(names.contains_key("transformer.layers.layers.0.0.fn.to_q.weight"));
}

#[test]
fn training_checkpoints_import_and_models_export_for_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = |name: &str| fixture(&format!("checkpoints/{name}"));
    let (model, back) = (path(dir.path(), "m.safetensors"), path(dir.path(), "back.safetensors"));
    let o = lat(&["import", "--torch", &ckpt("tutorial.pt"), "--config", &ckpt("model.json"), "--out", &model]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (pt, kwargs) = (path(dir.path(), "sd.pt"), path(dir.path(), "sd.json"));
    let o = lat(&["export", "--model", &model, "--out", &pt]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The keyword arguments land beside the state dict, and the export imports back unchanged.
    let o = lat(&["import", "--torch", &pt, "--config", &kwargs, "--out", &back]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&back, &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
    }
}

#[test]
fn bad_files_and_arguments_give_one_line_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = path(dir.path(), "out.safetensors");
    fails(&lat(&["logits", "--model", "/nonexistent/model.safetensors", "--tokens", &fixture("causal_masked.safetensors"), "--out", &out]), "No such file");
    let garbage = path(dir.path(), "garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    fails(&lat(&["logits", "--model", &garbage, "--tokens", &fixture("causal_masked.safetensors"), "--out", &out]), "not a valid safetensors file");
    // A config that does not match the state dict.
    let config = path(dir.path(), "c.json");
    std::fs::write(&config, r#"{"num_tokens": 48, "dim": 32, "depth": 3, "max_seq_len": 64, "heads": 4, "dim_head": 8, "local_attn_window_size": 8}"#).unwrap();
    let model = path(dir.path(), "m.safetensors");
    fails(&lat(&["import", "--torch", &fixture("causal_masked.pt"), "--config", &config, "--out", &model]), "missing tensor");
    std::fs::write(&config, r#"{"num_tokens": 48, "dim": 32, "depth": 2, "max_seq_len": 64, "heads": 4, "n_local_attn_heads": 5}"#).unwrap();
    fails(&lat(&["import", "--torch", &fixture("causal_masked.pt"), "--config", &config, "--out", &model]), "n_local_attn_heads");
    // Tokens out of range.
    let o = lat(&["import", "--torch", &fixture("causal_masked.pt"), "--config", &fixture("causal_masked.json"), "--out", &model]);
    assert!(o.status.success());
    let tokens = path(dir.path(), "t.safetensors");
    Tensor::new(&[[1i64, 48]], &Device::Cpu).unwrap().save_safetensors("tokens", &tokens).unwrap();
    fails(&lat(&["logits", "--model", &model, "--tokens", &tokens, "--out", &out]), "token id 48 is out of range");
    Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap().save_safetensors("nottokens", &tokens).unwrap();
    fails(&lat(&["logits", "--model", &model, "--tokens", &tokens, "--out", &out]), "no tensor named \"tokens\"");
    assert!(!Path::new(&out).exists(), "a failed command left an output file");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp")).count(), 0);
}

/// Settings that make `lat train` take about a second.
const TINY: &[&str] = &[
    "--set",
    "model.dim=16",
    "--set",
    "model.depth=1",
    "--set",
    "model.heads=2",
    "--set",
    "model.dim_head=8",
    "--set",
    "model.n_local_attn_heads=1",
    "--set",
    "model.max_seq_len=32",
    "--set",
    "model.local_attn_window_size=8",
    "--set",
    "train.seq_len=32",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.eval_every=5",
    "--set",
    "train.eval_windows=4",
    "--set",
    "train.sample_every=5",
    "--set",
    "train.sample_len=20",
    "--set",
    "train.checkpoint_every=5",
    "--set",
    "train.log_every=2",
    "--set",
    "train.tokenizer=bytes",
    "--quiet",
];

fn train(dir: &Path, extra: &[&str]) -> Output {
    let data = path(dir, "corpus.txt");
    if !Path::new(&data).exists() {
        let text: String = (0..300).map(|i| format!("{i} to be or not to be, that is the question.\n")).collect();
        std::fs::write(&data, text).unwrap();
    }
    let out = path(dir, "run");
    let mut args = vec!["train", "--data", data.as_str(), "--out", out.as_str()];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    lat(&args)
}

#[test]
fn train_writes_metrics_plot_and_models_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(dir.path(), &["--max-steps", "10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("parameters") && stdout.contains("[model]") && stdout.contains("bits per character"), "{stdout}");
    let run = dir.path().join("run");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(records.iter().any(|r| r["kind"] == "train" && r["loss"].as_f64().is_some() && r["tokens_per_s"].as_f64().is_some()));
    assert!(records.iter().any(|r| r["kind"] == "validation" && r["bpc"].as_f64().is_some()));
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    // The model file works with the other commands.
    let model = path(&run, "model.safetensors");
    let o = lat(&["eval", "--model", &model, "--data", &path(dir.path(), "corpus.txt"), "--split", "test", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(e["bpc"].as_f64().unwrap() > 0.0 && e["tokens"].as_u64().unwrap() > 0);
    // A second run into the same folder is refused; --resume continues to the new limit.
    fails(&train(dir.path(), &["--max-steps", "12"]), "already holds a run");
    let o = train(dir.path(), &["--max-steps", "14", "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resuming at step 10"));
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(*steps.iter().max().unwrap(), 14);
}

#[test]
fn generation_with_a_seed_is_reproducible_and_cache_agrees() {
    let dir = tempfile::tempdir().unwrap();
    assert!(train(dir.path(), &["--max-steps", "5"]).status.success());
    let model = path(&dir.path().join("run"), "model.safetensors");
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model.as_str(), "--prompt", "to be", "--max-new", "40", "--json"];
        args.extend_from_slice(extra);
        let o = lat(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(gen(&["--seed", "3", "--top-p", "0.9"]), gen(&["--seed", "3", "--top-p", "0.9"]));
    assert_eq!(gen(&["--top-k", "1"]), gen(&["--top-k", "1", "--no-cache"]));
    fails(&lat(&["generate", "--model", &model, "--prompt", "x", "--max-new", "5", "--temperature", "0"]), "temperature");
}

#[test]
fn quantized_models_generate_evaluate_and_refuse_training() {
    let dir = tempfile::tempdir().unwrap();
    assert!(train(dir.path(), &["--max-steps", "5"]).status.success());
    let model = path(&dir.path().join("run"), "model.safetensors");
    let (int8, bf16) = (path(dir.path(), "int8.safetensors"), path(dir.path(), "bf16.safetensors"));
    for (to, out) in [("int8", &int8), ("bf16", &bf16)] {
        let o = lat(&["quantize", "--model", &model, "--to", to, "--out", out]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("{to}: ")));
        assert!(std::fs::metadata(out).unwrap().len() < std::fs::metadata(&model).unwrap().len());
        let o = lat(&["generate", "--model", out, "--prompt", "to be", "--max-new", "20", "--top-k", "1", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = lat(&["eval", "--model", out, "--data", &path(dir.path(), "corpus.txt"), "--split", "test", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    fails(&lat(&["quantize", "--model", &int8, "--to", "bf16", "--out", &path(dir.path(), "again.safetensors")]), "already quantized (int8)");
    fails(&lat(&["quantize", "--model", &model, "--to", "int4", "--out", &path(dir.path(), "q.safetensors")]), "unknown quantization \"int4\"");
    fails(&lat(&["quantize", "--model", &model, "--to", "int8", "--out", &model]), "--out must differ");
    fails(&lat(&["quantize", "--model", &path(dir.path(), "run"), "--to", "int8", "--out", &path(dir.path(), "run")]), "--out must differ");
    // Into a model directory; one that cannot be written from leaves none behind.
    let o = lat(&["quantize", "--model", &path(dir.path(), "run"), "--to", "int8", "--out", &path(dir.path(), "int8-dir")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("int8-dir/model.safetensors").is_file());
    fails(&lat(&["quantize", "--model", &int8, "--to", "int8", "--out", &path(dir.path(), "again-dir")]), "already quantized");
    assert!(!dir.path().join("again-dir").exists());
    fails(&lat(&["bench", "--model", &int8, "--mode", "train", "--seq-len", "16", "--steps", "1"]), "cannot be trained");
    fails(&lat(&["export", "--model", &bf16, "--out", &path(dir.path(), "sd.pt")]), "cannot be exported");
    assert!(!dir.path().join("again.safetensors").exists() && !dir.path().join("q.safetensors").exists() && !dir.path().join("sd.pt").exists());
}

#[test]
fn training_killed_at_random_moments_resumes_from_its_last_checkpoint() {
    use linear_attention_transformer::train::peek_checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let data = path(dir.path(), "corpus.txt");
    std::fs::write(&data, (0..300).map(|i| format!("{i} all the world's a stage, and all the men and women merely players.\n")).collect::<String>()).unwrap();
    let out = dir.path().join("run");
    let checkpoint = out.join("checkpoint.safetensors");
    let mut rng = linear_attention_transformer::rng::Rng::new(7);
    let mut last = 0;
    for round in 0..5 {
        let mut args =
            vec!["train".to_string(), "--data".into(), data.clone(), "--out".into(), out.to_string_lossy().into_owned(), "--max-steps".into(), "100000".into(), "--time-limit".into(), "".into()];
        args.extend(TINY.iter().map(|s| s.to_string()));
        args.extend(["--set", "train.checkpoint_every=1", "--set", "train.eval_every=0", "--set", "train.sample_every=0"].map(String::from));
        if checkpoint.exists() {
            args.push("--resume".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_lat")).args(&args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300 + rng.below(700)));
        child.kill().unwrap(); // SIGKILL: no chance to clean up
        child.wait().unwrap();
        if checkpoint.exists() {
            let step = peek_checkpoint(&checkpoint).unwrap_or_else(|e| panic!("round {round}: the checkpoint does not load: {e}")).step;
            assert!(step >= last, "round {round}: the checkpoint went back from step {last} to {step}");
            last = step;
        }
    }
    assert!(last > 0, "no checkpoint was ever written");
    // One more run to a fixed step, uninterrupted: it continues from the last checkpoint.
    let target = (last + 3).to_string();
    let o = train(dir.path(), &["--max-steps", &target, "--resume"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(&format!("resuming at step {last}")), "{stdout}");
    assert_eq!(peek_checkpoint(&checkpoint).unwrap().step, last + 3);
    assert!(lat(&["eval", "--model", &path(&out, "model.safetensors"), "--data", &data, "--json"]).status.success());
}

#[test]
fn the_copy_task_reaches_full_held_out_accuracy() {
    let o = lat(&["copy-task", "--steps", "300", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["sequence_accuracy"].as_f64(), Some(1.0), "{r}");
}

#[test]
fn plan_prints_the_memory_a_workload_needs() {
    let o = lat(&["plan"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    for line in ["parameters (f32)", "AdamW moments", "activations kept for the backward pass", "total", "fits"] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    let o = lat(&["plan", "--set", "train.batch_size=16", "--json", "--max-memory", "1MB"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["fits"], false);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.iter().map(|i| i["bytes"].as_u64().unwrap()).sum::<u64>(), v["total"].as_u64().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let model = path(dir.path(), "m.safetensors");
    assert!(lat(&["import", "--torch", &fixture("causal_masked.pt"), "--config", &fixture("causal_masked.json"), "--out", &model]).status.success());
    for mode in ["forward", "generate", "serve"] {
        let o = lat(&["plan", "--model", &model, "--mode", mode, "--batch", "4", "--json"]);
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["total"].as_u64().unwrap() > 0, "{mode}");
    }
}
