//! `lat import --torch CHECKPOINT --config CONFIG.json [--key NAME] --out MODEL.safetensors`

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Device;
use linear_attention_transformer::{checkpoint, Config};

use super::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The reference model's state dict: a `torch.save` file (any PyTorch version, including a
    /// training checkpoint that holds it beside the optimizer's state) or a safetensors file.
    #[arg(long, alias = "state-dict")]
    torch: PathBuf,
    /// The model's keyword arguments as JSON (or TOML).
    #[arg(long)]
    config: PathBuf,
    /// In a training checkpoint, the entry that holds the model's state dict (default: the
    /// file itself, else the first of state_dict, model_state_dict, model, module, net,
    /// network, model_state, weights, params).
    #[arg(long)]
    key: Option<String>,
    /// The model file to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let config = Config::from_file(&a.config)?;
    let model = checkpoint::import(&a.torch, a.key.as_deref(), &config, &Device::Cpu, false)?;
    checkpoint::save(&model, &a.out, &HashMap::new())?;
    eprintln!("wrote {} ({} parameters)", a.out.display(), model.num_parameters());
    Ok(())
}
