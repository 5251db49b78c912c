//! Replays the fuzzing corpus (fuzz/corpus/TARGET/): the seed inputs, and every input the fuzzer
//! (`lat-fuzz`) found to matter. Each must give a result or an error, never a panic.

use std::path::{Path, PathBuf};

use linear_attention_transformer::checkpoint::{self, torch};
use linear_attention_transformer::train::RunConfig;
use linear_attention_transformer::Config;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files.into_iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect()
}

fn replay(target: &str, run: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    for (path, input) in corpus(target) {
        assert!(std::panic::catch_unwind(|| run(&input)).is_ok(), "{} panics", path.display());
    }
}

#[test]
fn model_files() {
    replay("model-file", |b| {
        let _ = checkpoint::parse(Path::new("<corpus>"), b);
    });
}

#[test]
fn pytorch_archives() {
    replay("torch", |b| {
        let _ = torch::state_dict(b, None);
    });
}

#[test]
fn state_dict_pickles() {
    replay("pickle", |b| {
        let _ = torch::parse_pickle(b);
    });
}

#[test]
fn configurations() {
    replay("config", |b| {
        let text = String::from_utf8_lossy(b);
        let _ = Config::from_json_str(&text);
        let _ = Config::from_toml_str(&text);
        let _ = RunConfig::from_toml(&text);
    });
}

#[test]
fn the_seeds_are_valid_inputs() {
    let seed = |target: &str| corpus(target).into_iter().find(|(p, _)| p.file_name().unwrap().to_string_lossy().starts_with("seed-tiny")).unwrap().1;
    assert!(checkpoint::parse(Path::new("seed"), &seed("model-file")).is_ok());
    let pt = seed("torch");
    assert_eq!(torch::state_dict(&pt, None).unwrap().len(), torch::parse_pickle(&seed("pickle")).unwrap());
}
