//! `lat`'s heap settings (`allocator::configure`) keep a training step's memory for the next
//! step, tensors of more than 32 MiB included. A test binary of its own: it counts the page
//! faults of the `lat` processes it waits for, which other tests' processes would add to.
//! glibc on Linux only: elsewhere `lat` leaves the allocator as it is.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::process::Command;

/// Minor page faults of every child process waited for so far.
fn children_faults() -> i64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_minflt
}

/// The page faults of `lat bench` training a small model for `steps` steps of 10 x 4096
/// tokens, whose logits and their gradients are 40 MiB tensors (glibc maps blocks of 32 MiB
/// and more afresh on every allocation unless told otherwise).
fn faults_of_training(config: &std::path::Path, steps: usize) -> i64 {
    let before = children_faults();
    let args = ["bench", "--config", config.to_str().unwrap(), "--mode", "train", "--seq-len", "4096", "--batch", "10", "--warmup", "0", "--steps", &steps.to_string()];
    let out = Command::new(env!("CARGO_BIN_EXE_lat")).args(args).output().expect("lat runs");
    assert!(out.status.success(), "lat bench failed: {}", String::from_utf8_lossy(&out.stderr));
    children_faults() - before
}

#[test]
fn training_steps_reuse_their_memory() {
    let dir = std::env::temp_dir().join(format!("lat-heap-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tiny.json");
    std::fs::write(&config, r#"{"num_tokens": 256, "dim": 32, "depth": 1, "heads": 2, "max_seq_len": 4096, "causal": true}"#).unwrap();
    let (one, five) = (faults_of_training(&config, 1), faults_of_training(&config, 5));
    std::fs::remove_dir_all(&dir).unwrap();
    // Mapping the large tensors afresh faulted about 100 000 pages a step in again (as many as
    // the whole one-step run); reusing them, four more steps fault almost none.
    assert!(five - one < one / 10, "four more steps faulted {} more pages than one step's run ({one})", five - one);
}
