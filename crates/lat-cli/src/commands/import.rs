//! `lat import --torch STATE_DICT.pt --config CONFIG.json --out MODEL.safetensors`

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Device;
use linear_attention_transformer::{checkpoint, Config};

use super::Result;

#[derive(clap::Args)]
pub struct Args {
    /// A `torch.save(model.state_dict())` file of the reference implementation.
    #[arg(long)]
    torch: PathBuf,
    /// The model's keyword arguments as JSON (or TOML).
    #[arg(long)]
    config: PathBuf,
    /// The model file to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let config = Config::from_file(&a.config)?;
    let model = checkpoint::import_torch(&a.torch, &config, &Device::Cpu, false)?;
    checkpoint::save(&model, &a.out, &HashMap::new())?;
    eprintln!("wrote {} ({} parameters)", a.out.display(), model.num_parameters());
    Ok(())
}
