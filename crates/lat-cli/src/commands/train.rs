//! `lat train [--config FILE.toml] [--data PATH] [--tokenizer tokenizer.json|bpe:N|bytes] [--out DIR]
//! [--max-steps N] [--time-limit D] [--resume]`

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use linear_attention_transformer::text::Codec;
use linear_attention_transformer::train::data::{Split, Text};
use linear_attention_transformer::train::{check_vocabulary, peek_checkpoint, RunConfig, RunFiles, TokenizerSetting, Trainer};
use serde_json::json;

use super::{corpus, device, usage, Result};
use crate::metrics::{plot, read_records, MetricsLog};

#[derive(clap::Args)]
pub struct Args {
    /// Run configuration (TOML with [model] and [train] tables). Default: the built-in
    /// configuration, printed at start.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    source: corpus::Source,
    /// The run's tokens (sets train.tokenizer): a tokenizer.json, bpe:N (a byte-level BPE of N
    /// ids learned from the corpus's training split at the start; the built-in run's is
    /// bpe:1024), or bytes. A token corpus is tokenized once into a cache in the run folder;
    /// model.num_tokens defaults to the vocabulary.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Run folder: checkpoint, model directory (model.safetensors, config.json, and
    /// tokenizer.json for a token model), metrics log, loss plot.
    #[arg(long, default_value = "runs/shakespeare")]
    out: PathBuf,
    /// Stop after this many optimizer steps (sets train.max_steps, the length of the
    /// learning-rate schedule unless the time limit allows fewer).
    #[arg(long)]
    max_steps: Option<u64>,
    /// The run's time, across resumes, e.g. 90s, 15m, 1h30m (sets train.time_limit): the
    /// schedule ends with it, and the model file is written within it.
    #[arg(long)]
    time_limit: Option<String>,
    /// Continue the run saved in --out.
    #[arg(long)]
    resume: bool,
    /// Override any setting: --set model.depth=6 --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    set: Vec<String>,
    /// cpu, or cuda in builds with the cuda feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar or samples; one line per evaluation (also what a non-terminal gets,
    /// with samples).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    memory: super::memory::MemoryArgs,
}

pub fn run(a: Args) -> Result<()> {
    // The time limit counts from here: reading the corpus and building the model are part of
    // the run, as are the final evaluation and the model file.
    let started = Instant::now();
    let device = device::parse(&a.device)?;
    let files = RunFiles { dir: a.out.clone() };
    let saved = if a.resume { Some(peek_checkpoint(&files.checkpoint())?) } else { None };
    if !a.resume && files.checkpoint().exists() {
        let step = peek_checkpoint(&files.checkpoint()).map(|r| r.step.to_string()).unwrap_or_else(|_| "?".into());
        return Err(usage(format!("{} already holds a run (step {step}); pass --resume to continue it, or choose another --out", a.out.display())));
    }
    let (mut run, codec) = match &saved {
        Some(s) => {
            if a.config.is_some() {
                eprintln!("note: --resume continues with the configuration saved in the checkpoint; --config is ignored (use --set to change training settings)");
            }
            let mut run = s.run.clone();
            for s in &a.set {
                run.set(s)?;
            }
            if a.tokenizer.is_some() || run.train.tokenizer != s.run.train.tokenizer {
                return Err(usage("--resume continues with the run's own tokenizer (its copy in the run folder); leave out --tokenizer and train.tokenizer"));
            }
            // The copy the run keeps, so that the ids stay those it was trained on.
            let codec = match run.train.tokenizer_setting()? {
                TokenizerSetting::Bytes => Codec::Bytes,
                _ => Codec::load(&files.tokenizer())?,
            };
            (run, RunCodec::Known(codec))
        }
        None => run_config(a.config.as_deref(), &a.set, a.tokenizer.as_deref())?,
    };
    if let Some(n) = a.max_steps {
        run.train.max_steps = n;
    }
    if let Some(t) = &a.time_limit {
        run.set(&format!("train.time_limit=\"{t}\""))?;
    }
    run.validate()?;
    if let RunCodec::Known(codec) = &codec {
        check_vocabulary(&run.model, codec)?;
    }
    // Before anything is written: a run that cannot fit leaves nothing behind.
    super::plan::check_training(&run, &a.memory)?;

    let (data, text) = corpus::open(&a.source, &a.out, &files.corpus_cache())?;
    let codec = match codec {
        RunCodec::Known(codec) => codec,
        RunCodec::ToLearn { vocab_size } => learn_tokenizer(vocab_size, &run, &text, &files, a.quiet)?,
    };
    let corpus = corpus::tokens(text, &codec, None, &files.token_cache(), a.quiet)?;
    let mut trainer = Trainer::start(run.clone(), corpus, &a.out, a.resume, &device)?;
    linear_attention_transformer::checkpoint::write_atomic(&files.config(), run.to_toml().as_bytes())?;
    let t = run.train.clone();
    println!("# resolved configuration (also in {})", files.config().display());
    print!("{}", run.to_toml());
    if a.config.is_none() && !a.resume {
        let isa = linear_attention_transformer::kernels::matrix_isa();
        println!("# the built-in model's width follows the matrix kernels: dim {} for {isa}", linear_attention_transformer::train::default_model().dim);
    }
    let c = trainer.corpus();
    println!(
        "# {} parameters; corpus {} ({} bytes, {} {}: {} train, {} validation, {} test); device {}",
        trainer.model.num_parameters(),
        data.display(),
        c.text_len(),
        c.len(),
        if codec.is_bytes() { "byte tokens" } else { "tokens" },
        c.split(Split::Train).len(),
        c.split(Split::Validation).len(),
        c.split(Split::Test).len(),
        a.device,
    );
    if let Some(s) = &saved {
        println!("# resuming at step {} ({} tokens seen)", s.step, s.tokens);
    }

    let mut log = MetricsLog::open(&files.metrics(), saved.as_ref().map(|s| s.step))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while saving is ignored: the checkpoint write is atomic anyway.
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).map_err(|e| usage(format!("cannot install the Ctrl-C handler: {e}")))?;
    }

    // Bits per byte of text, per character for a byte model.
    let unit = if codec.is_bytes() { "bpc" } else { "bits/byte" };
    let session_start = Instant::now();
    let elapsed = |before: f64| before + started.elapsed().as_secs_f64();
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::with_draw_target(Some(t.max_steps), ProgressDrawTarget::stderr_with_hz(4)) };
    bar.set_style(ProgressStyle::with_template("{spinner} step {pos}/{len} {wide_bar} {msg}").expect("a valid template").progress_chars("=> "));
    bar.set_position(trainer.step);
    // Without a terminal (a log file, CI) the bar is hidden: report in plain lines instead.
    let live = !bar.is_hidden();
    let say = |text: String| if live { bar.println(text) } else { println!("{text}") };
    let session_tokens0 = trainer.tokens;
    let title = format!("{} ({} parameters)", data.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(), trainer.model.num_parameters());
    let title = &title;
    let mut last_eval: Option<f64> = None;

    let evaluate = |trainer: &mut Trainer, log: &mut MetricsLog, windows: Option<usize>, now: f64| -> Result<f64> {
        let e = trainer.evaluate(Split::Validation, windows)?;
        log.write(&json!({"kind": "validation", "step": trainer.step, "loss": e.loss, "bpc": e.bpc, "tokens": trainer.tokens, "elapsed_s": now, "eval_tokens": e.tokens}))?;
        plot(&read_records(log.path())?, &files.plot(), title)?;
        Ok(e.bpc)
    };

    let stopped_by = loop {
        if trainer.step >= t.max_steps {
            break "max_steps";
        }
        if trainer.out_of_time(elapsed(trainer.elapsed_before)) {
            break "time_limit";
        }
        if stop.load(Ordering::SeqCst) {
            break "interrupt";
        }
        let r = trainer.train_step()?;
        let now = elapsed(trainer.elapsed_before);
        trainer.observe(now);
        let horizon = trainer.horizon.clone();
        bar.set_length(horizon.total);
        bar.set_position(r.step);
        let secs = session_start.elapsed().as_secs_f64().max(1e-9);
        let tps = (trainer.tokens - session_tokens0) as f64 / secs;
        let per_step = horizon.seconds_per_step(r.step, now).unwrap_or(secs / (r.step - saved.as_ref().map_or(0, |s| s.step)).max(1) as f64);
        let left = horizon.total.saturating_sub(r.step) as f64 * per_step + horizon.reserve_s;
        bar.set_message(format!(
            "loss {:.3} ({:.2} {unit}){} | {:.0} tok/s | {} elapsed, {} left",
            r.loss,
            trainer.bits_per_byte(r.loss),
            last_eval.map(|v| format!(" val {v:.3} {unit}")).unwrap_or_default(),
            tps,
            clock(Duration::from_secs_f64(now)),
            clock(Duration::from_secs_f64(left)),
        ));
        if r.skipped {
            say(format!("step {}: non-finite loss or gradient; update skipped", r.step));
        }
        if r.step % t.log_every.max(1) == 0 || r.step == 1 {
            log.write(&json!({
                "kind": "train", "step": r.step, "loss": r.loss, "bpc": trainer.bits_per_byte(r.loss), "lr": r.lr, "grad_norm": r.grad_norm,
                "tokens": r.tokens, "tokens_per_s": tps, "elapsed_s": now,
                "schedule_steps": horizon.total, "schedule_bound": horizon.bound.name(),
            }))?;
        }
        if t.eval_every > 0 && r.step % t.eval_every == 0 && r.step < horizon.total {
            let now = elapsed(trainer.elapsed_before);
            let bpc = evaluate(&mut trainer, &mut log, Some(t.eval_windows), now)?;
            last_eval = Some(bpc);
            let line = format!(
                "step {} loss {:.4} | val {:.4} {unit} | {:.0} tok/s | {} elapsed | schedule: {} steps ({})",
                r.step,
                r.loss,
                bpc,
                tps,
                clock(Duration::from_secs_f64(elapsed(trainer.elapsed_before))),
                horizon.total,
                horizon.bound.name()
            );
            say(line);
        }
        if !a.quiet && t.sample_every > 0 && r.step % t.sample_every == 0 {
            let text = trainer.sample(&t.sample_prompt, t.sample_len, r.step)?;
            say(format!("--- sample at step {} ---\n{}\n---", r.step, text.trim_end()));
        }
        if t.checkpoint_every > 0 && r.step % t.checkpoint_every == 0 {
            let now = elapsed(trainer.elapsed_before);
            trainer.save(now)?;
        }
    };
    bar.finish_and_clear();
    let now = elapsed(trainer.elapsed_before);
    trainer.save(now)?;
    match stopped_by {
        "interrupt" => {
            println!("interrupted at step {}: checkpoint saved in {}; continue with --resume", trainer.step, a.out.display());
            return Ok(());
        }
        "time_limit" => println!("time limit: stopping at step {} to evaluate and write the model within it", trainer.step),
        _ => {}
    }
    println!("evaluating on the whole validation split...");
    let now = elapsed(trainer.elapsed_before);
    let bpc = evaluate(&mut trainer, &mut log, None, now)?;
    println!(
        "step {}: validation {:.4} {} after {} ({} tokens). Wrote {}, {}, {}, {}",
        trainer.step,
        bpc,
        if codec.is_bytes() { "bits per character" } else { "bits per byte" },
        clock(Duration::from_secs_f64(elapsed(trainer.elapsed_before))),
        trainer.tokens,
        files.model().display(),
        files.checkpoint().display(),
        files.metrics().display(),
        files.plot().display()
    );
    Ok(())
}

/// The run configuration of a new run: the TOML file (or the built-in run), the `--set`
/// overrides and the tokenizer, with `model.num_tokens`, unless given, the tokenizer's
/// vocabulary; and the run's codec, unless the run learns its tokenizer from the corpus.
pub fn run_config(config: Option<&Path>, set: &[String], tokenizer: Option<&str>) -> Result<(RunConfig, RunCodec)> {
    let mut num_tokens_given = set.iter().any(|s| s.trim_start().starts_with("model.num_tokens"));
    let mut run = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| linear_attention_transformer::Error::io(path, e))?;
            let mut table: toml::Table = toml::from_str(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?;
            if let Some(model) = table.get_mut("model").and_then(toml::Value::as_table_mut) {
                num_tokens_given |= model.contains_key("num_tokens");
                // A placeholder until the tokenizer is read.
                model.entry("num_tokens").or_insert(toml::Value::Integer(256));
            }
            // Checked once every setting is in.
            toml::Value::Table(table).try_into::<RunConfig>().map_err(|e| usage(format!("{}: {}", path.display(), e.to_string().trim())))?
        }
        None => RunConfig::default(),
    };
    for s in set {
        run.set(s)?;
    }
    if let Some(t) = tokenizer {
        run.train.tokenizer = t.to_string();
    }
    let codec = match run.train.tokenizer_setting()? {
        TokenizerSetting::Bytes => RunCodec::Known(Codec::Bytes),
        TokenizerSetting::Learned(vocab_size) => RunCodec::ToLearn { vocab_size },
        TokenizerSetting::File(path) => RunCodec::Known(Codec::load(&path)?),
    };
    if !num_tokens_given {
        run.model.num_tokens = codec.vocab_size();
    }
    run.validate()?;
    if let RunCodec::Known(codec) = &codec {
        check_vocabulary(&run.model, codec)?;
    }
    Ok((run, codec))
}

/// A run's codec, or the size of the BPE it learns from the corpus once that is read.
pub enum RunCodec {
    Known(Codec),
    ToLearn { vocab_size: usize },
}

impl RunCodec {
    /// The ids the run's tokens take.
    fn vocab_size(&self) -> usize {
        match self {
            RunCodec::Known(codec) => codec.vocab_size(),
            RunCodec::ToLearn { vocab_size } => *vocab_size,
        }
    }
}

/// Text a run's tokenizer learns from: all of a corpus like the bundled one (4.6 MB of training
/// text, about 2 s on two cores), pieces spread over a larger one (about 15 s).
const LEARN_BUDGET: usize = 32 << 20;

/// The BPE of `vocab_size` ids that `train.tokenizer = "bpe:N"` asks for, learned from the
/// training split of `text` into the run folder.
fn learn_tokenizer(vocab_size: usize, run: &RunConfig, text: &Text, files: &RunFiles, quiet: bool) -> Result<Codec> {
    let started = Instant::now();
    let range = text.split_range(Split::Train);
    let (codec, learned) = super::tokenizer::learn(text, range, vocab_size, LEARN_BUDGET, &files.tokenizer(), !quiet)?;
    if !quiet {
        let mb = learned as f64 / 1e6;
        let path = files.tokenizer();
        eprintln!("# tokenizer {}: a byte-level BPE of {} ids learned from {mb:.1} MB of the training split in {:.1} s", path.display(), codec.vocab_size(), started.elapsed().as_secs_f64());
    }
    check_vocabulary(&run.model, &codec)?;
    Ok(codec)
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
