//! `lat generate --model M (--prompt TEXT | --prompt-tokens IN.safetensors) --max-new N
//! [--tokenizer T] [--top-k K] [--top-p P] [--temperature T] [--seed S] [--no-cache] [--json]`

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use linear_attention_transformer::checkpoint;
use linear_attention_transformer::generate::{generate, Sampling};
use linear_attention_transformer::text::TextDecoder;

use super::{device, usage, ModelArgs, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text: encoded by the model's tokenizer, or its UTF-8 bytes for a byte-level model.
    #[arg(long, conflicts_with = "prompt_tokens")]
    prompt: Option<String>,
    /// A safetensors file whose `tokens` tensor ([n] or [batch, n], integers) holds the prompts.
    #[arg(long)]
    prompt_tokens: Option<PathBuf>,
    /// New tokens per prompt.
    #[arg(long)]
    max_new: usize,
    /// Keep the K most likely tokens (1 = greedy).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens while the mass before each is at most P.
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop a row when it emits this token.
    #[arg(long)]
    eos: Option<u32>,
    /// Re-run the whole sequence for every token, as the reference does.
    #[arg(long)]
    no_cache: bool,
    /// Print {"tokens": [...], "new_tokens": N, "seconds": s, "tokens_per_s": r} instead of text.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    memory: super::memory::MemoryArgs,
}

pub fn run(a: Args) -> Result<()> {
    let dev: Device = device::parse(&a.device)?;
    let (config, _) = checkpoint::peek(&a.model.path)?;
    let codec = a.model.codec(&config)?;
    let prompts: Vec<Vec<u32>> = match (&a.prompt, &a.prompt_tokens) {
        (Some(text), None) => match &codec {
            Some(c) => vec![c.encode(text.as_bytes())?],
            None => return Err(usage(format!("the model has {} token ids and no tokenizer: give --tokenizer, a model directory with tokenizer.json, or --prompt-tokens", config.num_tokens))),
        },
        (None, Some(path)) => {
            let t = checkpoint::read_tensors(path)?;
            let tokens = t.get("tokens").ok_or_else(|| usage(format!("{}: no tensor named \"tokens\"", path.display())))?;
            if !tokens.dtype().is_int() {
                return Err(usage(format!("{}: tokens must be integers", path.display())));
            }
            let tokens = tokens.to_dtype(DType::I64)?;
            let rows: Vec<Vec<i64>> = match tokens.rank() {
                1 => vec![tokens.to_vec1()?],
                2 => tokens.to_vec2()?,
                _ => return Err(usage(format!("{}: tokens must be [n] or [batch, n], got {:?}", path.display(), tokens.dims()))),
            };
            rows.into_iter().map(|r| r.into_iter().map(|t| u32::try_from(t).map_err(|_| usage(format!("token id {t} is out of range")))).collect()).collect::<Result<_>>()?
        }
        _ => return Err(usage("give --prompt TEXT or --prompt-tokens FILE")),
    };
    let work = linear_attention_transformer::plan::Workload::Generate { streams: prompts.len(), prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(0) };
    a.memory.check(&super::plan::inference_plan(&config, work)?, |_| "generate for fewer prompts at once".to_string())?;
    let model = checkpoint::load(&a.model.path, &dev, false)?;
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let stream = !a.json && prompts.len() == 1;
    let mut out = std::io::stdout().lock();
    // The prompt, then each token's text once its characters are whole.
    let mut decoder = codec.as_ref().map(|c| TextDecoder::after(c, &prompts[0]));
    if let (true, Some(c)) = (stream, &codec) {
        out.write_all(c.decode(&prompts[0]).as_bytes()).ok();
        out.flush().ok();
    }
    let started = Instant::now();
    let result = generate(&model, &prompts, a.max_new, &sampling, a.seed, a.eos, !a.no_cache, &mut |_, t| {
        if stream {
            match &mut decoder {
                Some(d) => out.write_all(&d.push(t)).ok(),
                None => write!(out, "{t} ").ok(),
            };
            out.flush().ok();
        }
    })?;
    if let (true, Some(d)) = (stream, &mut decoder) {
        out.write_all(&d.finish()).ok();
    }
    let seconds = started.elapsed().as_secs_f64();
    let produced: usize = result.iter().map(Vec::len).sum();
    if a.json {
        let tokens = if result.len() == 1 { serde_json::json!(result[0]) } else { serde_json::json!(result) };
        writeln!(out, "{}", serde_json::json!({"tokens": tokens, "new_tokens": produced, "seconds": seconds, "tokens_per_s": produced as f64 / seconds})).ok();
    } else if stream {
        writeln!(out).ok();
    } else {
        for row in &result {
            match &codec {
                Some(c) => writeln!(out, "{}", c.decode(row)).ok(),
                None => writeln!(out, "{}", row.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ")).ok(),
            };
        }
    }
    if !a.json {
        eprintln!("{produced} tokens in {seconds:.2} s ({:.1} tokens/s{})", produced as f64 / seconds, if a.no_cache { ", no cache" } else { "" });
    }
    Ok(())
}
