//! `lat plan [--config RUN.toml] [--set section.field=value …]` (a training run, as `lat train`
//! would start it) or `lat plan --model M --mode forward|generate|serve [--seq-len N] [--batch B]`:
//! the memory the workload needs, line by line, before anything is allocated.

use std::path::PathBuf;

use linear_attention_transformer::plan::{self, human, Plan, Workload};
use linear_attention_transformer::train::{Precision, RunConfig};
use linear_attention_transformer::{checkpoint, Config, LinearAttentionTransformerLM};

use super::memory::{largest, MemoryArgs};
use super::{usage, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A run configuration, as for lat train (the default one without it).
    #[arg(long, conflicts_with = "model")]
    config: Option<PathBuf>,
    /// Override a setting of the run: --set train.batch_size=16 (repeatable).
    #[arg(long = "set", value_name = "SECTION.FIELD=VALUE")]
    set: Vec<String>,
    /// The run's tokenizer, as for lat train (its vocabulary sizes the model).
    #[arg(long, conflicts_with = "model")]
    tokenizer: Option<String>,
    /// Plan inference with this model file instead of a training run.
    #[arg(long)]
    model: Option<PathBuf>,
    /// With --model: forward (eval, logits), generate or serve.
    #[arg(long, default_value = "forward")]
    mode: String,
    /// Tokens per sequence (forward) or per prompt (generate, serve); default: max_seq_len.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per pass (forward), or streams (generate, serve: the server's --max-batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    memory: MemoryArgs,
}

pub fn run(a: Args) -> Result<()> {
    let (plan, advice) = match &a.model {
        None => {
            let (run, _) = super::train::run_config(a.config.as_deref(), &a.set, a.tokenizer.as_deref())?;
            let p = training_plan(&run)?;
            let advice = training_advice(&run, a.memory.limit()?.unwrap_or(u64::MAX))?;
            (p, advice)
        }
        Some(m) => {
            let (config, _) = checkpoint::peek(m)?;
            let seq_len = a.seq_len.unwrap_or(config.max_seq_len);
            let work = match a.mode.as_str() {
                "forward" => Workload::Forward { batch: a.batch, seq_len },
                "generate" | "serve" => Workload::Generate { streams: a.batch, prompt_len: seq_len },
                other => return Err(usage(format!("unknown --mode {other}: forward, generate or serve"))),
            };
            (inference_plan(&config, work)?, String::new())
        }
    };
    let limit = a.memory.limit()?;
    if a.json {
        let mut v = serde_json::to_value(&plan).expect("a plan serialises");
        v["available"] = serde_json::json!(limit);
        v["fits"] = serde_json::json!(limit.is_none_or(|l| plan.total <= l));
        println!("{v}");
    } else {
        print!("{}", plan.table());
        match limit {
            Some(l) if plan.total <= l => println!("fits: {} available", human(l)),
            Some(l) => println!("does not fit: {} available{}", human(l), if advice.is_empty() { String::new() } else { format!("; {advice}") }),
            None => println!("(the memory available is unknown here)"),
        }
    }
    Ok(())
}

fn bytes_per_value(p: Precision) -> usize {
    match p {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    }
}

/// The plan of one training step of `run`.
pub fn training_plan(run: &RunConfig) -> Result<Plan> {
    let params = LinearAttentionTransformerLM::count_parameters(&run.model)?;
    let t = &run.train;
    plan::plan(&run.model, params, Workload::Train { batch: t.batch_size, seq_len: t.seq_len, bytes_per_value: bytes_per_value(t.precision), keep_activations: t.keep_activations })
}

/// What to change so that `run` fits in `limit`.
pub fn training_advice(run: &RunConfig, limit: u64) -> Result<String> {
    let params = LinearAttentionTransformerLM::count_parameters(&run.model)?;
    let t = &run.train;
    let f = bytes_per_value(t.precision);
    let fits_with =
        |batch: usize, seq_len: usize, keep_activations: bool| plan::plan(&run.model, params, Workload::Train { batch, seq_len, bytes_per_value: f, keep_activations }).is_ok_and(|p| p.total <= limit);
    if t.keep_activations && run.model.reversible && fits_with(t.batch_size, t.seq_len, false) {
        return Ok("set train.keep_activations=false (the reversible stack then recomputes its activations)".to_string());
    }
    let fits = |batch: usize, seq_len: usize| fits_with(batch, seq_len, t.keep_activations);
    if let Some(b) = largest(t.batch_size, |b| fits(b, t.seq_len)) {
        return Ok(format!("lower train.batch_size to at most {b}"));
    }
    let unit = run.model.pad_to_multiple();
    if let Some(units) = largest(t.seq_len / unit, |u| fits(1, u * unit)) {
        return Ok(format!("lower train.batch_size to 1 and train.seq_len to at most {}", units * unit));
    }
    Ok(format!("the model's {params} parameters, their gradients and AdamW's moments alone need {}: lower model.dim or model.depth", human(params * 16)))
}

/// The plan of inference with a model of `config`.
pub fn inference_plan(config: &Config, work: Workload) -> Result<Plan> {
    plan::plan(config, LinearAttentionTransformerLM::count_parameters(config)?, work)
}

/// Refuses a training run that cannot fit.
pub fn check_training(run: &RunConfig, memory: &MemoryArgs) -> Result<()> {
    let plan = training_plan(run)?;
    memory.check(&plan, |limit| training_advice(run, limit).unwrap_or_default())
}
