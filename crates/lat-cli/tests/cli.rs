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
