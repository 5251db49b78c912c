//! Training: resuming repeats the uninterrupted run, checkpoints survive interrupted writes,
//! divergence stops cleanly.

use std::path::Path;

use candle_core::Device;
use linear_attention_transformer::train::data::Corpus;
use linear_attention_transformer::train::{peek_checkpoint, RunConfig, Trainer};

fn tiny() -> RunConfig {
    let mut run = RunConfig::default();
    for s in [
        "train.tokenizer=bytes",
        "model.num_tokens=256",
        "model.dim=16",
        "model.depth=2",
        "model.heads=2",
        "model.dim_head=8",
        "model.max_seq_len=32",
        "model.local_attn_window_size=8",
        "model.n_local_attn_heads=1",
        "model.ff_dropout=0.1",
        "model.attn_dropout=0.1",
        "train.seq_len=32",
        "train.batch_size=3",
        "train.grad_accum=2",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.lr=0.01",
    ] {
        run.set(s).unwrap();
    }
    run
}

fn corpus(dir: &Path) -> std::path::PathBuf {
    let text: String = (0..400).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog.\n")).collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn params(t: &Trainer) -> Vec<f32> {
    t.model.params().iter().flat_map(|p| p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn resuming_repeats_the_uninterrupted_run() {
    for reversible in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let data = corpus(dir.path());
        let mut run = tiny();
        run.model.reversible = reversible;
        let mut straight = Trainer::start(run.clone(), Corpus::map(&data).unwrap(), &dir.path().join("a"), false, &Device::Cpu).unwrap();
        let losses_a: Vec<f64> = (0..8).map(|_| straight.train_step().unwrap().loss).collect();
        assert!(losses_a[7] < losses_a[0], "the loss did not fall: {losses_a:?}");

        let out_b = dir.path().join("b");
        let mut first = Trainer::start(run.clone(), Corpus::map(&data).unwrap(), &out_b, false, &Device::Cpu).unwrap();
        let mut losses_b: Vec<f64> = (0..4).map(|_| first.train_step().unwrap().loss).collect();
        first.save(1.0).unwrap();
        drop(first);
        assert_eq!(peek_checkpoint(&out_b.join("checkpoint.safetensors")).unwrap().step, 4);
        let mut second = Trainer::start(run, Corpus::map(&data).unwrap(), &out_b, true, &Device::Cpu).unwrap();
        assert_eq!(second.step, 4);
        losses_b.extend((0..4).map(|_| second.train_step().unwrap().loss));
        for (a, b) in losses_a.iter().zip(&losses_b) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "reversible {reversible}: {losses_a:?} vs {losses_b:?}");
        }
        let (pa, pb) = (params(&straight), params(&second));
        let worst = pa.iter().zip(&pb).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-6, "parameters differ by {worst}");
    }
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let mut t = Trainer::start(tiny(), Corpus::map(&data).unwrap(), &out, false, &Device::Cpu).unwrap();
    t.train_step().unwrap();
    t.save(1.0).unwrap();
    // A write killed before its rename leaves only its temporary file behind.
    let tmp = out.join(format!(".checkpoint.safetensors.tmp-{}", 999_999));
    std::fs::write(&tmp, b"half a checkpoint").unwrap();
    drop(t);
    let resumed = Trainer::start(tiny(), Corpus::map(&data).unwrap(), &out, true, &Device::Cpu).unwrap();
    assert_eq!(resumed.step, 1);
    // A checkpoint damaged in place is refused with a clear error, not loaded.
    let ck = out.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let err = Trainer::start(tiny(), Corpus::map(&data).unwrap(), &out, true, &Device::Cpu).err().expect("a truncated checkpoint must not load").to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
}

#[test]
fn divergence_stops_the_run_instead_of_saving_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let mut run = tiny();
    run.train.lr = 1e30;
    run.train.min_lr = 1e30;
    run.train.warmup_steps = 0;
    run.train.grad_clip = 0.0;
    run.train.max_bad_steps = 2;
    let mut t = Trainer::start(run, Corpus::map(&data).unwrap(), &dir.path().join("run"), false, &Device::Cpu).unwrap();
    let mut outcome = Ok(());
    for _ in 0..20 {
        match t.train_step() {
            Ok(r) if r.skipped => {}
            Ok(_) => {}
            Err(e) => {
                outcome = Err(e.to_string());
                break;
            }
        }
    }
    let err = outcome.expect_err("training with an absurd learning rate must stop");
    assert!(err.contains("non-finite"), "{err}");
}

#[test]
fn the_schedule_ends_with_the_time_limit_and_resumes_with_it() {
    use linear_attention_transformer::train::horizon::Bound;
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let mut run = tiny();
    run.train.max_steps = 10_000;
    run.train.time_limit = "60s".into();
    let out = dir.path().join("run");
    let mut t = Trainer::start(run.clone(), Corpus::map(&data).unwrap(), &out, false, &Device::Cpu).unwrap();
    // A simulated clock: one second per step.
    for s in 1..=6 {
        t.train_step().unwrap();
        t.observe(s as f64);
    }
    assert_eq!(t.horizon.bound, Bound::TimeLimit);
    // 60 s less what the final evaluation and save will take, at a second per step.
    assert!(t.horizon.total > 50 && t.horizon.total < 60, "{:?}", t.horizon);
    assert!(!t.out_of_time(6.0) && t.out_of_time(59.5));
    t.save(6.0).unwrap();
    let resumed = Trainer::start(run.clone(), Corpus::map(&data).unwrap(), &out, true, &Device::Cpu).unwrap();
    assert_eq!(resumed.horizon, t.horizon);
    assert_eq!(resumed.lr(), t.lr());
    // max_steps wins when it is the tighter bound.
    run.train.max_steps = 20;
    let mut short = Trainer::start(run, Corpus::map(&data).unwrap(), &dir.path().join("short"), false, &Device::Cpu).unwrap();
    for s in 1..=6 {
        short.train_step().unwrap();
        short.observe(s as f64);
    }
    assert_eq!((short.horizon.bound, short.horizon.total), (Bound::MaxSteps, 20));
}
