//! Bad input, case by case: every command answers with one line `error: …` that says what is
//! wrong, exits non-zero, and leaves no output file behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn lat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lat")).args(args).output().expect("lat runs")
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name).to_string_lossy().into_owned()
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// Runs `args`, which must fail with one `error:` line containing `needle`.
fn case(name: &str, args: &[&str], needle: &str) {
    let out = lat(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: succeeded");
    assert_eq!(err.lines().count(), 1, "{name}: stderr is not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{name}: {err:?} lacks {needle:?}");
}

fn model(dir: &Path) -> String {
    let m = p(dir, "model.safetensors");
    assert!(lat(&["import", "--torch", &fixture("causal_masked.pt"), "--config", &fixture("causal_masked.json"), "--out", &m]).status.success());
    m
}

#[test]
fn model_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let out = p(dir.path(), "out.safetensors");
    let tokens = fixture("causal_masked.safetensors");
    let bytes = std::fs::read(&m).unwrap();

    let truncated = p(dir.path(), "truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    case("truncated model", &["logits", "--model", &truncated, "--tokens", &tokens, "--out", &out], "not a valid safetensors file");

    let corrupt = p(dir.path(), "corrupt.safetensors");
    let mut flipped = bytes.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x40;
    std::fs::write(&corrupt, &flipped).unwrap();
    case("corrupt tensor data", &["logits", "--model", &corrupt, "--tokens", &tokens, "--out", &out], "corrupt");

    let header = p(dir.path(), "header.safetensors");
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&header, &huge).unwrap();
    case("absurd header size", &["logits", "--model", &header, "--tokens", &tokens, "--out", &out], "not a valid safetensors file");

    let plain = p(dir.path(), "plain.safetensors");
    Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap().save_safetensors("x", &plain).unwrap();
    case("safetensors without configuration", &["logits", "--model", &plain, "--tokens", &tokens, "--out", &out], "not a model file");

    case("missing model", &["generate", "--model", &p(dir.path(), "nope"), "--prompt", "a", "--max-new", "1"], "No such file");
    std::fs::create_dir(dir.path().join("not-a-model")).unwrap();
    case("a folder that is not a model directory", &["eval", "--model", &p(dir.path(), "not-a-model"), "--split", "test"], "not-a-model/model.safetensors");
    assert!(!Path::new(&out).exists());
}

#[test]
fn pytorch_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = p(dir.path(), "m.safetensors");
    let config = p(dir.path(), "c.json");
    let base = std::fs::read_to_string(fixture("causal_masked.json")).unwrap();
    std::fs::write(&config, base.replace("\"depth\": 2", "\"depth\": 3")).unwrap();
    case("state dict lacks tensors", &["import", "--torch", &fixture("causal_masked.pt"), "--config", &config, "--out", &out], "missing tensor transformer.layers.layers.2");
    std::fs::write(&config, base.replace("\"depth\": 2", "\"depth\": 1")).unwrap();
    case("state dict has extra tensors", &["import", "--torch", &fixture("causal_masked.pt"), "--config", &config, "--out", &out], "unexpected tensor transformer.layers.layers.1");
    std::fs::write(&config, base.replace("\"dim_head\": 8", "\"dim_head\": 16")).unwrap();
    case("state dict of another shape", &["import", "--torch", &fixture("causal_masked.pt"), "--config", &config, "--out", &out], "has shape");
    let garbage = p(dir.path(), "garbage.pt");
    std::fs::write(&garbage, b"PK\x03\x04 not really").unwrap();
    case("not a zip archive", &["import", "--torch", &garbage, "--config", &fixture("causal_masked.json"), "--out", &out], "not a PyTorch checkpoint");
    let raw = p(dir.path(), "raw.pkl");
    std::fs::write(&raw, b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.").unwrap();
    case("a bare pickle", &["import", "--torch", &raw, "--config", &fixture("causal_masked.json"), "--out", &out], "neither a PyTorch checkpoint");
    // The forms a checkpoint must not take (tests/fixtures/checkpoints/, written by torch.save).
    let ckpt = |name: &str| fixture(&format!("checkpoints/{name}"));
    let kwargs = ckpt("model.json");
    case("a pickled module", &["import", "--torch", &ckpt("whole_module.pt"), "--config", &kwargs, "--out", &out], "refused");
    case("code in the pickle", &["import", "--torch", &ckpt("code.pt"), "--config", &kwargs, "--out", &out], "posix.system, which is refused");
    case("no state dict", &["import", "--torch", &ckpt("no_state_dict.pt"), "--config", &kwargs, "--out", &out], "no state dict found");
    case("a state dict under another key", &["import", "--torch", &ckpt("custom_key.pt"), "--config", &kwargs, "--out", &out], "--key");
    case("a key that is not there", &["import", "--torch", &ckpt("training.pt"), "--key", "ema", "--config", &kwargs, "--out", &out], "no entry ema");
    // Exports.
    let m = p(dir.path(), "model.safetensors");
    assert!(lat(&["import", "--torch", &ckpt("legacy.pt"), "--config", &kwargs, "--out", &m]).status.success());
    case("an export of unknown format", &["export", "--model", &m, "--out", &p(dir.path(), "sd.npz")], ".safetensors, or .pt");
    case("an export over its own arguments", &["export", "--model", &m, "--out", &p(dir.path(), "sd.json")], "--kwargs must differ");
    case("an export of what is not a model", &["export", "--model", &kwargs, "--out", &p(dir.path(), "sd.pt")], "not a valid safetensors file");
    for name in ["sd.npz", "sd.json", "sd.pt"] {
        assert!(!dir.path().join(name).exists(), "{name} was written");
    }
    std::fs::write(&config, "{ not json").unwrap();
    case("bad config JSON", &["import", "--torch", &fixture("causal_masked.pt"), "--config", &config, "--out", &out], "invalid configuration");
    assert!(!Path::new(&out).exists());
}

#[test]
fn inputs_and_corpora() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let out = p(dir.path(), "out.safetensors");
    let tokens = p(dir.path(), "t.safetensors");
    Tensor::zeros((1, 65), candle_core::DType::I64, &Device::Cpu).unwrap().save_safetensors("tokens", &tokens).unwrap();
    case("longer than the model", &["logits", "--model", &m, "--tokens", &tokens, "--out", &out], "positions");
    Tensor::zeros((2, 3, 4), candle_core::DType::I64, &Device::Cpu).unwrap().save_safetensors("tokens", &tokens).unwrap();
    case("tokens of rank 3", &["logits", "--model", &m, "--tokens", &tokens, "--out", &out], "[batch, n]");
    let mut map = std::collections::HashMap::new();
    map.insert("tokens".to_string(), Tensor::zeros((1, 4), candle_core::DType::I64, &Device::Cpu).unwrap());
    map.insert("mask".to_string(), Tensor::zeros((1, 5), candle_core::DType::U8, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&map, &tokens).unwrap();
    case("mask of another shape", &["logits", "--model", &m, "--tokens", &tokens, "--out", &out], "input_mask has shape");
    case("prompt outside the vocabulary", &["generate", "--model", &m, "--prompt", "zzz", "--max-new", "2"], "out of range");
    let empty = p(dir.path(), "empty.txt");
    std::fs::write(&empty, b"").unwrap();
    case("empty corpus", &["train", "--data", &empty, "--out", &p(dir.path(), "run")], "empty");
    case("missing corpus", &["train", "--data", &p(dir.path(), "nothing"), "--out", &p(dir.path(), "run2")], "No such file");
    let tiny = p(dir.path(), "tiny.txt");
    std::fs::write(&tiny, b"too short").unwrap();
    case("corpus shorter than a window", &["train", "--data", &tiny, "--out", &p(dir.path(), "run3"), "--quiet"], "fewer than seq_len");
    case("unknown setting", &["train", "--set", "model.nope=1", "--out", &p(dir.path(), "run4")], "unknown field");
    case("invalid setting", &["train", "--set", "model.n_local_attn_heads=9", "--out", &p(dir.path(), "run5")], "n_local_attn_heads");
    case("unreadable duration", &["train", "--time-limit", "soon", "--out", &p(dir.path(), "run6")], "duration");
    case("resume without a run", &["train", "--resume", "--out", &p(dir.path(), "run7")], "checkpoint");
    case("bad split", &["eval", "--model", &m, "--split", "dev"], "split");
    assert!(!Path::new(&out).exists());
}

#[test]
fn runs_that_cannot_fit_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], &str); 4] = [
        ("batch", &["--set", "train.batch_size=100000"], "lower train.batch_size to at most"),
        ("length", &["--set", "model.max_seq_len=4194304", "--set", "train.seq_len=4194304", "--set", "train.batch_size=1"], "train.seq_len to at most"),
        ("width", &["--set", "model.dim=65536", "--set", "model.heads=1", "--set", "model.n_local_attn_heads=0"], "lower model.dim or model.depth"),
        ("depth", &["--set", "model.depth=100000"], "lower model.dim or model.depth"),
    ];
    for (name, set, advice) in cases {
        let out = p(dir.path(), name);
        let mut args = vec!["train", "--out", &out];
        args.extend_from_slice(set);
        case(name, &args, advice);
        assert!(!Path::new(&out).exists(), "{name}: a run folder was left behind");
    }
    // Under an explicit limit a small run is refused too, and --force starts it anyway.
    let out = p(dir.path(), "forced");
    let small = [
        "--set",
        "model.dim=32",
        "--set",
        "model.depth=1",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.seq_len=64",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.sample_every=0",
        "--set",
        "train.eval_windows=1",
        "--max-steps",
        "1",
        "--quiet",
    ];
    let mut args = vec!["train", "--out", &out, "--max-memory", "1MB"];
    args.extend_from_slice(&small);
    case("below --max-memory", &args, "under --max-memory");
    assert!(!Path::new(&out).exists());
    args.push("--force");
    let o = lat(&args);
    assert!(o.status.success(), "--force: {}", String::from_utf8_lossy(&o.stderr));
    assert!(Path::new(&out).join("model.safetensors").exists());
    case("bad size", &["plan", "--max-memory", "lots"], "cannot read the size");
}
