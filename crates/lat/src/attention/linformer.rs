//! Linformer attention (Wang et al. 2020), as the `linformer` package (0.2.3) defines it: keys
//! and values are projected along the sequence to `k` positions with learned matrices
//! `proj_k`, `proj_v` [seq_len, k], then every head attends to those `k` with softmax attention.
//! Sequences may be shorter than `seq_len` (the projections are sliced).
//!
//! Unlike the package, masked positions (`input_mask`, or `context_mask` for cross-attention)
//! are zeroed before the projection, so padding cannot leak into the compressed keys.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::nn::{dropout, Linear};
use crate::params::{Builder, Init};

#[derive(Clone, Debug)]
/// Linformer self- or cross-attention (`LinformerSelfAttention`).
pub struct Linformer {
    /// Query projection, no bias.
    pub to_q: Linear,
    /// Key projection, no bias.
    pub to_k: Linear,
    /// Value projection, no bias.
    pub to_v: Linear,
    /// Sequence projection of the keys, [seq_len, k].
    pub proj_k: Tensor,
    /// Sequence projection of the values, [seq_len, k].
    pub proj_v: Tensor,
    /// Output projection, with bias.
    pub to_out: Linear,
    /// Attention heads.
    pub heads: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// One key/value head shared by every query head.
    pub one_kv_head: bool,
    /// Dropout on the attention probabilities.
    pub dropout: f64,
    /// Longest sequence of keys and values (rows of the projections).
    pub seq_len: usize,
}

impl Linformer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(b: &Builder, dim: usize, seq_len: usize, k: usize, heads: usize, dim_head: Option<usize>, one_kv_head: bool, dropout: f64) -> Result<Self> {
        let dim_head = dim_head.unwrap_or(dim / heads);
        let kv = if one_kv_head { dim_head } else { dim_head * heads };
        let bound = 1.0 / (k as f64).sqrt();
        Ok(Self {
            to_q: Linear::new(&b.pp("to_q"), dim, dim_head * heads, false)?,
            to_k: Linear::new(&b.pp("to_k"), dim, kv, false)?,
            proj_k: b.get("proj_k", &[seq_len, k], Init::Uniform(bound))?,
            to_v: Linear::new(&b.pp("to_v"), dim, kv, false)?,
            proj_v: b.get("proj_v", &[seq_len, k], Init::Uniform(bound))?,
            to_out: Linear::new(&b.pp("to_out"), dim_head * heads, dim, true)?,
            heads,
            dim_head,
            one_kv_head,
            dropout,
            seq_len,
        })
    }

    /// `x` [batch, n, dim]; keys and values from `context` [batch, m, dim] if given, else from
    /// `x`; `kv_mask` [batch, m] (nonzero = keep) zeroes masked key/value positions.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, kv_mask: Option<&Tensor>, seed: Option<u64>) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let src = context.unwrap_or(x);
        let m = src.dim(1)?;
        if m > self.seq_len {
            return Err(Error::input(format!(
                "Linformer attention takes at most {} positions (its seq_len), got {m}; raise max_seq_len or the context seq_len",
                self.seq_len
            )));
        }
        let (h, dh) = (self.heads, self.dim_head);
        let keep = |t: Tensor| -> Result<Tensor> {
            Ok(match kv_mask {
                Some(mk) => t.broadcast_mul(&mk.to_dtype(t.dtype())?.unsqueeze(D::Minus1)?)?,
                None => t,
            })
        };
        // [b, m, kv] projected along the sequence: [b, k, kv].
        let project = |layer: &Linear, proj: &Tensor| -> Result<Tensor> {
            let t = keep(layer.matmul(src)?)?;
            Ok(t.transpose(1, 2)?.contiguous()?.broadcast_matmul(&proj.narrow(0, 0, m)?)?.transpose(1, 2)?)
        };
        let (keys, values) = (project(&self.to_k, &self.proj_k)?, project(&self.to_v, &self.proj_v)?);
        let k = self.proj_k.dim(1)?;
        let kv_heads = if self.one_kv_head { 1 } else { h };
        let split = |t: Tensor| -> Result<Tensor> {
            let t = t.reshape((b, k, kv_heads, dh))?.transpose(1, 2)?;
            Ok(t.broadcast_as((b, h, k, dh))?.contiguous()?)
        };
        let (keys, values) = (split(keys)?, split(values)?);
        let q = self.to_q.matmul(x)?.reshape((b, n, h, dh))?.transpose(1, 2)?.contiguous()?;
        let dots = (q.matmul(&keys.t()?)? * (dh as f64).powf(-0.5))?;
        let attn = dropout(&candle_nn::ops::softmax(&dots, D::Minus1)?, self.dropout, seed)?;
        let out = attn.matmul(&values)?.transpose(1, 2)?.contiguous()?.reshape((b, n, h * dh))?;
        self.to_out.forward(&out)
    }
}
