//! `lat export --model M --out STATE_DICT.safetensors|.pt [--kwargs KWARGS.json]`

use std::path::PathBuf;

use candle_core::Device;
use linear_attention_transformer::checkpoint;

use super::{usage, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A model file.
    #[arg(long)]
    model: PathBuf,
    /// The state dict to write: `.safetensors`, or `.pt` for a torch.save archive.
    #[arg(long)]
    out: PathBuf,
    /// Where the model's keyword arguments go, as JSON. Default: beside --out, with the
    /// extension .json.
    #[arg(long)]
    kwargs: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let kwargs = a.kwargs.clone().unwrap_or_else(|| a.out.with_extension("json"));
    if kwargs == a.out {
        return Err(usage("--kwargs must differ from --out"));
    }
    let model = checkpoint::load(&a.model, &Device::Cpu, false)?;
    let json = checkpoint::export(&model, &a.out)?;
    let pretty = serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&json).expect("the configuration is JSON")).expect("JSON prints");
    if let Err(e) = checkpoint::write_atomic(&kwargs, format!("{pretty}\n").as_bytes()) {
        std::fs::remove_file(&a.out).ok();
        return Err(e);
    }
    eprintln!(
        "wrote {} ({} tensors) and {}; in Python: LinearAttentionTransformerLM(**json.load(open(...))).load_state_dict(..., strict=True)",
        a.out.display(),
        model.params().len(),
        kwargs.display()
    );
    Ok(())
}
