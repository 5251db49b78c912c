//! Linear attention transformer language models.
//!
//! A transformer whose heads mix local windowed softmax attention, `(Q Kᵀ) V`, with global
//! linear attention, `Q (Kᵀ V)`, so that its cost grows linearly with the sequence length. This
//! crate reproduces the Python library `linear-attention-transformer` 0.19.1: the same arguments
//! with the same defaults, the same weight names, and outputs equal to float rounding.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, LocalHeads, Pass};
//!
//! // LinearAttentionTransformerLM(num_tokens = 256, dim = 64, depth = 2, max_seq_len = 128,
//! //     heads = 4, causal = True, n_local_attn_heads = 2, local_attn_window_size = 32)
//! let mut config = Config::new(256, 64, 2, 128);
//! config.heads = 4;
//! config.causal = true;
//! config.n_local_attn_heads = LocalHeads::Uniform(2);
//! config.local_attn_window_size = 32;
//! let model = LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?;
//!
//! // 50 tokens: padded to the window (32) and cropped back, as the reference's Autopadder does.
//! let tokens = Tensor::arange(0u32, 50, &Device::Cpu)?.reshape((1, 50))?;
//! let logits = model.forward(&tokens, &Inputs::default(), &Pass::eval())?;
//! assert_eq!(logits.dims(), &[1, 50, 256]);
//! # Ok::<(), linear_attention_transformer::Error>(())
//! ```
//!
//! Start with [`Config`] and [`LinearAttentionTransformerLM`]; [`generate`] has constant-time
//! generation, [`checkpoint`] model files and the PyTorch import, [`train`] the training program
//! behind `lat train`.

#![warn(missing_docs)]

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
