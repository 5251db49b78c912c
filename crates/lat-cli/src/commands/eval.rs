//! `lat eval --model M [--data PATH] [--split validation|test] [--device cpu|cuda] [--json]`

use std::path::PathBuf;

use linear_attention_transformer::checkpoint;
use linear_attention_transformer::train::data::Split;
use linear_attention_transformer::train::evaluate;

use super::{corpus, device, usage, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A model file.
    #[arg(long)]
    model: PathBuf,
    /// Corpus: a file or folder, raw, .gz or .zip. Default: the bundled Shakespeare.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which part of the corpus (first 90 % train, next 5 % validation, last 5 % test); `all`
    /// evaluates the whole file.
    #[arg(long, default_value = "test")]
    split: String,
    /// Window length (context). Default: the length the model was trained on, else max_seq_len.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Print {"bpc": x, "tokens": n}.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    memory: super::memory::MemoryArgs,
}

pub fn run(a: Args) -> Result<()> {
    let split = match a.split.as_str() {
        "all" => None,
        s => Some(s.parse::<Split>()?),
    };
    let (config, metadata) = checkpoint::peek(&a.model)?;
    let trained_len = metadata.get("lat.seq_len").and_then(|s| s.parse::<usize>().ok());
    let planned_len = a.seq_len.or(trained_len).unwrap_or(config.max_seq_len);
    let plan = super::plan::inference_plan(&config, linear_attention_transformer::plan::Workload::Forward { batch: a.batch, seq_len: planned_len })?;
    a.memory.check(&plan, |limit| match super::memory::largest(a.batch, |b| super::plan::inference_plan(&config, linear_attention_transformer::plan::Workload::Forward { batch: b, seq_len: planned_len }).is_ok_and(|p| p.total <= limit)) {
        Some(b) => format!("lower --batch to at most {b}"),
        None => "lower --seq-len".to_string(),
    })?;
    let model = checkpoint::load(&a.model, &device::parse(&a.device)?, false)?;
    let config = model.config();
    if config.num_tokens < 256 || config.return_embeddings {
        return Err(usage("lat eval measures bits per byte: the model needs num_tokens >= 256 and logits"));
    }
    let seq_len = a.seq_len.or(trained_len).unwrap_or(config.max_seq_len);
    if seq_len == 0 || seq_len > config.max_positions() {
        return Err(usage(format!("--seq-len {seq_len} must be between 1 and the model's {} positions", config.max_positions())));
    }
    let scratch = tempfile::tempdir().map_err(|e| usage(format!("cannot create a temporary folder: {e}")))?;
    let (data, corpus) = corpus::open(a.data.as_deref(), scratch.path(), &scratch.path().join("corpus.bin"))?;
    let bytes = match split {
        None => corpus.bytes(),
        Some(s) => corpus.split(s),
    };
    let e = evaluate(&model, bytes, seq_len, a.batch, None)?;
    if a.json {
        println!("{}", serde_json::json!({"bpc": e.bpc, "tokens": e.tokens}));
    } else {
        println!("{:.4} bits per character ({:.4} nats) over {} bytes of {} ({}), windows of {seq_len}", e.bpc, e.loss, e.tokens, data.display(), a.split);
    }
    Ok(())
}
