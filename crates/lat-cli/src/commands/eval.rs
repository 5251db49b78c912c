//! `lat eval --model M [--data PATH] [--tokenizer T] [--split validation|test] [--device cpu|cuda] [--json]`

use linear_attention_transformer::checkpoint;
use linear_attention_transformer::train::data::Split;
use linear_attention_transformer::train::evaluate;

use super::{corpus, device, usage, ModelArgs, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: corpus::Source,
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
    /// Print {"bpc": bits per byte, "loss_per_token": nats, "tokens": n, "bytes": n}.
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
    let (config, metadata) = checkpoint::peek(&a.model.path)?;
    let trained_len = metadata.get("lat.seq_len").and_then(|s| s.parse::<usize>().ok());
    let planned_len = a.seq_len.or(trained_len).unwrap_or(config.max_seq_len);
    let plan = super::plan::inference_plan(&config, linear_attention_transformer::plan::Workload::Forward { batch: a.batch, seq_len: planned_len })?;
    a.memory.check(&plan, |limit| {
        match super::memory::largest(a.batch, |b| {
            super::plan::inference_plan(&config, linear_attention_transformer::plan::Workload::Forward { batch: b, seq_len: planned_len }).is_ok_and(|p| p.total <= limit)
        }) {
            Some(b) => format!("lower --batch to at most {b}"),
            None => "lower --seq-len".to_string(),
        }
    })?;
    let model = checkpoint::load(&a.model.path, &device::parse(&a.device)?, false)?;
    let config = model.config();
    if config.return_embeddings {
        return Err(usage("lat eval measures bits per byte: the model needs logits"));
    }
    let Some(codec) = a.model.codec(config)? else {
        return Err(usage(format!("the model has {} token ids and no tokenizer: give --tokenizer, or a model directory with tokenizer.json", config.num_tokens)));
    };
    if codec.is_bytes() && config.num_tokens < 256 {
        return Err(usage("lat eval measures bits per byte: a model without a tokenizer needs num_tokens >= 256"));
    }
    let seq_len = a.seq_len.or(trained_len).unwrap_or(config.max_seq_len);
    if seq_len == 0 || seq_len > config.max_positions() {
        return Err(usage(format!("--seq-len {seq_len} must be between 1 and the model's {} positions", config.max_positions())));
    }
    let scratch = tempfile::tempdir().map_err(|e| usage(format!("cannot create a temporary folder: {e}")))?;
    let (data, text) = corpus::open(&a.source, scratch.path(), &scratch.path().join("corpus.bin"))?;
    // A run folder's token cache, when it holds this corpus, else one made here.
    let run_cache = checkpoint::model_file(&a.model.path).with_file_name("tokens.bin");
    let corpus = corpus::tokens(text, &codec, Some(&run_cache), &scratch.path().join("tokens.bin"), a.json)?;
    let tokens = match split {
        None => corpus.all(),
        Some(s) => corpus.split(s),
    };
    let e = evaluate(&model, tokens, seq_len, a.batch, None)?;
    let bytes = (tokens.len() as f64 * tokens.bytes_per_token()).round() as u64;
    if a.json {
        println!("{}", serde_json::json!({"bpc": e.bpc, "loss_per_token": e.loss, "tokens": e.tokens, "bytes": bytes}));
    } else if codec.is_bytes() {
        println!("{:.4} bits per character ({:.4} nats) over {} bytes of {} ({}), windows of {seq_len}", e.bpc, e.loss, e.tokens, corpus::name(&a.source, &data), a.split);
    } else {
        println!(
            "{:.4} bits per byte; loss {:.4} nats per token ({:.2} bytes per token) over {} tokens, {bytes} bytes of {} ({}), windows of {seq_len}",
            e.bpc,
            e.loss,
            tokens.bytes_per_token(),
            e.tokens,
            corpus::name(&a.source, &data),
            a.split
        );
    }
    Ok(())
}
