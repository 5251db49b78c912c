//! `lat-fuzz --target model-file|torch|pickle|config [--seconds N] [--seed S]`: mutation fuzzing
//! of the readers that take untrusted input (`pickle` is the state dict's `data.pkl` alone, which
//! inside an archive mutations rarely reach past the archive's checksums). Starting from the seed inputs of `fuzz/corpus/TARGET/`,
//! it applies random mutations (bit flips, interesting bytes, truncations, splices, repeats) and
//! feeds each input to the target; any panic is a failure, saved to `fuzz/found/TARGET/` and
//! reported. Run it under a memory limit to also catch allocations driven by size fields:
//!
//!     (ulimit -v 4000000; cargo run --release -p lat-fuzz -- --target torch --seconds 120)
//!
//! Inputs worth keeping go into `fuzz/corpus/TARGET/`, which the tests replay.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use linear_attention_transformer::rng::Rng;

#[derive(Parser)]
#[command(name = "lat-fuzz", about = "Mutation fuzzing of the readers of untrusted input")]
struct Args {
    #[arg(long, value_parser = ["model-file", "torch", "pickle", "config"])]
    target: String,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The fuzz folder (corpus/ and found/).
    #[arg(long, default_value = "fuzz")]
    dir: PathBuf,
}

/// Bytes that often break parsers.
const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'{', b'}', b'"', b'\n', b'.', b'X', b'q', b'R'];

fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
    for _ in 0..1 + rng.below(8) {
        let len = input.len() as u64;
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                input[i] = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
            }
            2 if len > 0 => input.truncate(rng.below(len) as usize),
            3 if len > 0 => {
                // Overwrite with a little-endian size that is far too large.
                let i = rng.below(len) as usize;
                for (k, b) in [0xff, 0xff, 0xff, 0x7f].iter().enumerate() {
                    if i + k < input.len() {
                        input[i + k] = *b;
                    }
                }
            }
            4 if len > 1 => {
                let (a, b) = (rng.below(len) as usize, rng.below(len) as usize);
                let (a, b) = (a.min(b), a.max(b));
                let chunk = input[a..b].to_vec();
                let at = rng.below(len) as usize;
                input.splice(at..at, chunk.into_iter().take(4096));
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len() as u64) as usize];
                if !other.is_empty() {
                    let from = rng.below(other.len() as u64) as usize;
                    let at = rng.below(len + 1) as usize;
                    input.truncate(at);
                    input.extend_from_slice(&other[from..]);
                }
            }
            _ => input.push(rng.below(256) as u8),
        }
    }
}

/// Runs one input through the target; only a panic is a failure (errors are the point).
fn run(target: &str, input: &[u8]) -> bool {
    std::panic::catch_unwind(|| {
        let _ = lat_fuzz_target(target, input);
    })
    .is_ok()
}

fn lat_fuzz_target(target: &str, input: &[u8]) -> Result<(), String> {
    use linear_attention_transformer::checkpoint;
    match target {
        "model-file" => checkpoint::parse(Path::new("<fuzz>"), input).map(|_| ()).map_err(|e| e.to_string()),
        "torch" => checkpoint::torch::state_dict(input, None).map(|_| ()).map_err(|e| e.to_string()),
        "pickle" => checkpoint::torch::parse_pickle(input).map(|_| ()).map_err(|e| e.to_string()),
        _ => {
            let text = String::from_utf8_lossy(input);
            let _ = linear_attention_transformer::Config::from_json_str(&text);
            let _ = linear_attention_transformer::Config::from_toml_str(&text);
            linear_attention_transformer::train::RunConfig::from_toml(&text).map(|_| ()).map_err(|e| e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    std::panic::set_hook(Box::new(|_| {}));
    let corpus_dir = a.dir.join("corpus").join(&a.target);
    let found_dir = a.dir.join("found").join(&a.target);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&corpus_dir).map(|d| d.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).collect()).unwrap_or_default();
    if corpus.is_empty() {
        eprintln!("no seed inputs in {}", corpus_dir.display());
        corpus.push(vec![]);
    }
    let mut rng = Rng::new(a.seed);
    let (start, limit) = (Instant::now(), Duration::from_secs(a.seconds));
    let (mut runs, mut failures) = (0u64, 0u64);
    while start.elapsed() < limit {
        let mut input = corpus[rng.below(corpus.len() as u64) as usize].clone();
        mutate(&mut input, &corpus, &mut rng);
        runs += 1;
        if !run(&a.target, &input) {
            failures += 1;
            std::fs::create_dir_all(&found_dir).ok();
            let path = found_dir.join(format!("{:08x}.bin", crc32fast::hash(&input)));
            std::fs::write(&path, &input).ok();
            eprintln!("panic: input saved to {}", path.display());
        }
    }
    println!("{}: {runs} inputs in {:.0} s, {failures} panics", a.target, start.elapsed().as_secs_f64());
    if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
