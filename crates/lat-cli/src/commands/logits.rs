//! `lat logits --model MODEL.safetensors --tokens IN.safetensors --out OUT.safetensors [--device cpu|cuda]`

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Device;
use linear_attention_transformer::{checkpoint, Inputs, Pass};

use super::{device, usage, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A model file.
    #[arg(long)]
    model: PathBuf,
    /// A safetensors file with `tokens` (integer, [batch, n]) and optionally `mask`
    /// (u8 or bool, [batch, n], 1 = keep), `context` and `context_mask`.
    #[arg(long)]
    tokens: PathBuf,
    /// Where to write `logits` (f32, [batch, n, num_tokens]; the embeddings with
    /// return_embeddings).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    memory: super::memory::MemoryArgs,
}

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse(&a.device)?;
    let mut input = checkpoint::read_tensors(&a.tokens)?;
    if let Some((b, n)) = input.get("tokens").and_then(|t| t.dims2().ok()) {
        let (config, _) = checkpoint::peek(&a.model)?;
        let plan = super::plan::inference_plan(&config, linear_attention_transformer::plan::Workload::Forward { batch: b, seq_len: n })?;
        a.memory.check(&plan, |_| "pass fewer or shorter sequences".to_string())?;
    }
    let model = checkpoint::load(&a.model, &dev, false)?;
    for t in input.values_mut() {
        *t = t.to_device(&dev)?;
    }
    let tokens = input.get("tokens").ok_or_else(|| usage(format!("{}: no tensor named \"tokens\"", a.tokens.display())))?;
    let inputs = Inputs { input_mask: input.get("mask"), context: input.get("context"), context_mask: input.get("context_mask") };
    let logits = model.forward(tokens, &inputs, &Pass::eval())?.to_device(&Device::Cpu)?;
    checkpoint::write_safetensors(&a.out, &[("logits".to_string(), logits)], &HashMap::new())?;
    Ok(())
}
