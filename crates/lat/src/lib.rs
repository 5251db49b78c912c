//! Linear attention transformer language models.
//!
//! A transformer whose heads mix local windowed softmax attention, `(Q Kᵀ) V`, with global
//! linear attention, `Q (Kᵀ V)`, so that its cost grows linearly with the sequence length. This
//! crate reproduces the Python library `linear-attention-transformer` 0.19.1: the same arguments
//! with the same defaults, the same weight names, and outputs equal to float rounding.

pub mod attention;
mod backprop;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod image;
pub mod kernels;
mod layers;
pub mod model;
pub mod nn;
mod params;
pub mod pass;
pub mod rng;
pub mod train;
mod vjp;

pub use config::{Config, LinformerContextSettings, LinformerSettings, LocalHeads, TransformerConfig};
pub use error::{Error, Result};
pub use model::{DecodeState, Inputs, LinearAttentionTransformer, LinearAttentionTransformerLM};
pub use params::Param;
pub use pass::Pass;
