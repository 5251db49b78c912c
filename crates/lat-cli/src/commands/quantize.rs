//! `lat quantize --model M --to int8|bf16 --out Q`

use std::path::PathBuf;

use linear_attention_transformer::{checkpoint, Quantization};

use super::{usage, Result};

#[derive(clap::Args)]
pub struct Args {
    /// An f32 model file.
    #[arg(long)]
    model: PathBuf,
    /// int8 (one scale per output channel) or bf16.
    #[arg(long)]
    to: String,
    /// The quantized model file to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let to: Quantization = a.to.parse()?;
    if a.out == a.model {
        return Err(usage("--out must differ from --model: the f32 model is the one to keep"));
    }
    let q = checkpoint::quantize(&a.model, to, &a.out)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "wrote {} ({to}: {} linear weights; {:.1} MiB, was {:.1} MiB); run it with lat generate, serve, eval or logits",
        a.out.display(),
        q.matrices,
        mib(q.bytes_after),
        mib(q.bytes_before)
    );
    Ok(())
}
