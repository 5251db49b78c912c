//! Quantized model files, for decoding: every linear layer's weight in bfloat16, or in int8
//! with one scale per output channel; the rest (embeddings, norms, biases, buffers) stays f32.
//! The weights stay in the small form in memory and the decoding products dequantize them on
//! the fly into f32 accumulation ([`crate::kernels::decode`]), so a decoding step, which is
//! bound by reading the weights, reads a half (bf16) or a quarter (int8) of the bytes.
//!
//! A quantized file is a model file with `"lat.quantization"` in its header: `"bf16"` (each
//! linear weight a BF16 tensor) or `"int8"` (each an I8 tensor `name` and an F32 tensor
//! `name.scale` [out]). It serves `generate`, `serve`, `eval` and `logits`; training, casting
//! and exporting it are refused, since its weights are no longer the f32 ones.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::kernels::decode::Packed;

/// Metadata key of the quantization in model files.
pub const QUANTIZATION_KEY: &str = "lat.quantization";

/// How the linear weights of a model file are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// bfloat16, rounded to nearest (ties to even): 8 bits of mantissa.
    Bf16,
    /// int8 with one f32 scale per output channel (`max |row| / 127`).
    Int8,
}

impl Quantization {
    /// `w` [out, in] in this form.
    pub fn pack(self, w: &[f32], out: usize) -> Packed {
        match self {
            Quantization::Bf16 => Packed::bf16(w),
            Quantization::Int8 => Packed::int8(w, out),
        }
    }

    /// How the file holds each linear weight, for error messages.
    pub fn dtype_name(self) -> &'static str {
        match self {
            Quantization::Bf16 => "BF16 tensors",
            Quantization::Int8 => "I8 tensors with F32 scales",
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantization::Bf16 => "bf16",
            Quantization::Int8 => "int8",
        })
    }
}

impl FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Quantization::Bf16),
            "int8" => Ok(Quantization::Int8),
            _ => Err(Error::input(format!("unknown quantization {s:?}: int8 (a scale per output channel) or bf16"))),
        }
    }
}
