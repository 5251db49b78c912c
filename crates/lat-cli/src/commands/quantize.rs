//! `lat quantize --model M --to int8|bf16 --out Q`

use std::path::PathBuf;

use linear_attention_transformer::checkpoint::{self, MODEL_FILE, TOKENIZER_FILE};
use linear_attention_transformer::{Error, Quantization};

use super::{usage, Result};

#[derive(clap::Args)]
pub struct Args {
    /// An f32 model file or model directory.
    #[arg(long)]
    model: PathBuf,
    /// int8 (one scale per output channel) or bf16.
    #[arg(long)]
    to: String,
    /// The quantized model: a .safetensors file, or else a model directory, which gets the
    /// model's tokenizer too.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let to: Quantization = a.to.parse()?;
    let model = checkpoint::model_file(&a.model);
    let into_directory = a.out.is_dir() || a.out.extension().is_none_or(|e| e != "safetensors");
    let out = if into_directory { a.out.join(MODEL_FILE) } else { a.out.clone() };
    let same_file = |a: &std::path::Path, b: &std::path::Path| a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    if same_file(&out, &model) {
        return Err(usage("--out must differ from --model: the f32 model is the one to keep"));
    }
    let tokenizer = checkpoint::directory_tokenizer(&model);
    let tokenizer_json = tokenizer.as_ref().map(|t| std::fs::read(t).map_err(|e| Error::io(t, e))).transpose()?;
    let created = into_directory && !a.out.exists();
    if into_directory {
        std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    }
    let q = checkpoint::quantize(&model, to, &out).inspect_err(|_| {
        // A model that cannot be quantized leaves no folder behind.
        if created {
            std::fs::remove_dir(&a.out).ok();
        }
    })?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!("wrote {} ({to}: {} linear weights; {:.1} MiB, was {:.1} MiB); run it with lat generate, serve, eval or logits", out.display(), q.matrices, mib(q.bytes_after), mib(q.bytes_before));
    match (tokenizer, tokenizer_json) {
        (Some(_), Some(json)) if into_directory => checkpoint::write_atomic(&a.out.join(TOKENIZER_FILE), &json)?,
        (Some(t), _) => eprintln!("note: the model's tokenizer is {}: pass --tokenizer with it, or quantize into a model directory (--out DIR)", t.display()),
        // A tokenizer left in the directory by another model would be read as this one's.
        (None, _) if into_directory => {
            let stale = a.out.join(TOKENIZER_FILE);
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
            }
        }
        _ => {}
    }
    Ok(())
}
