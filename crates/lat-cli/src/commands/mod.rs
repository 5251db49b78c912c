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
pub mod train;

use linear_attention_transformer::Error;

/// Errors of the command-line layer: library errors, or a message about the arguments.
pub type Result<T> = std::result::Result<T, Error>;

/// An error about the command's arguments.
pub fn usage(message: impl Into<String>) -> Error {
    Error::Input(message.into())
}
