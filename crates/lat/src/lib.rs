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
//! The public API: [`Config`] and [`LinearAttentionTransformerLM`] (and the bare stack,
//! [`TransformerConfig`] and [`LinearAttentionTransformer`]); [`generate`] and
//! [`DecodeState`] for constant-time decoding; [`train`] for the training program behind
//! `lat train`; [`text`] for tokenizers; [`checkpoint`] for model files and the PyTorch import; [`Error`]. Gradients
//! come from candle's own `backward()`, so the model also trains from any candle program:
//!
//! ```
//! # use candle_core::{DType, Device, Tensor};
//! # use linear_attention_transformer::{Config, Inputs, LinearAttentionTransformerLM, Pass};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW};
//! # let mut config = Config::new(256, 32, 2, 64);
//! # config.causal = true;
//! let model = LinearAttentionTransformerLM::new(&config, 0, &Device::Cpu, DType::F32)?;
//! let vars = model.vars().into_iter().map(|(_, v)| v).collect();
//! let mut opt = AdamW::new(vars, ParamsAdamW::default())?;
//! let tokens = Tensor::zeros((1, 16), DType::U32, &Device::Cpu)?;
//! let logits = model.forward(&tokens, &Inputs::default(), &Pass::train(0))?;
//! let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &tokens.flatten_all()?)?;
//! opt.backward_step(&loss)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`kernels`] is the one low-level module: the fused ops, for checks and benchmarks. How the
//! crate is laid out is in ARCHITECTURE.md.

#![warn(missing_docs)]

pub mod allocator;
pub mod autoregressive;
mod block;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
mod graph;
pub mod image;
pub mod kernels;
mod layers;
pub mod model;
mod nn;
mod params;
pub mod pass;
pub mod plan;
pub mod quantize;
pub mod rng;
mod stack;
pub mod text;
pub mod train;

pub use autoregressive::{AutoregressiveWrapper, Filter, GenerateArgs};
pub use config::{Config, LinformerContextSettings, LinformerSettings, LocalHeads, StackArgs, TransformerConfig};
pub use error::{Error, Result};
pub use model::{DecodeState, Inputs, LinearAttentionTransformer, LinearAttentionTransformerLM, PROMPT_CHUNK};
pub use params::Param;
pub use pass::Pass;
pub use quantize::Quantization;
