//! One module per `lat` command.

pub mod bench;
pub mod check;
pub mod copy_task;
pub mod corpus;
pub mod device;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import;
pub mod logits;
pub mod memory;
pub mod plan;
pub mod quantize;
pub mod tokenizer;
pub mod train;

use std::path::PathBuf;

use linear_attention_transformer::text::Codec;
use linear_attention_transformer::{checkpoint, Config, Error};

/// The model a command reads, and the tokenizer of a token-level model given as a lone file.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A model file or model directory.
    #[arg(long = "model")]
    pub path: PathBuf,
    /// The tokenizer of a token-level model given as a single file (a model directory has its own).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    /// The model's codec (see [`checkpoint::codec`]); `None` for ids only.
    pub fn codec(&self, config: &Config) -> Result<Option<Codec>> {
        checkpoint::codec(&self.path, self.tokenizer.as_deref(), config)
    }
}

/// Errors of the command-line layer: library errors, or a message about the arguments.
pub type Result<T> = std::result::Result<T, Error>;

/// An error about the command's arguments.
pub fn usage(message: impl Into<String>) -> Error {
    Error::Input(message.into())
}
