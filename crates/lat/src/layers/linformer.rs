//! Linformer attention (Wang et al. 2020), as the `linformer` package (0.2.3) defines it: keys
//! and values are projected along the sequence to `k` positions with learned matrices
//! `proj_k`, `proj_v` [seq_len, k], then every head attends to those `k` with softmax attention.
//! Sequences may be shorter than `seq_len` (the projections are sliced). It replaces
//! self-attention (`linformer_settings`, non-causal only) or cross-attention
//! (`context_linformer_settings`).
//!
//! Unlike the package, masked positions (`input_mask`, or `context_mask` for cross-attention)
//! are zeroed before the projection, so padding cannot leak into the compressed keys.
//!
//! Decoding (cross-attention only: self-attention Linformer is never causal) keeps the
//! context's projected keys and values.

use candle_core::{Tensor, D};

use super::{Call, Layer, Mode, Step, SITE_ATTN};
use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::graph::Grads;
use crate::nn::{dropout, Linear};
use crate::params::{Builder, Init};

#[derive(Clone, Debug)]
pub(crate) struct Linformer {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// Sequence projection of the keys, [seq_len, k].
    pub proj_k: Tensor,
    /// Sequence projection of the values, [seq_len, k].
    pub proj_v: Tensor,
    pub to_out: Linear,
    pub heads: usize,
    pub dim_head: usize,
    /// One key/value head shared by every query head.
    pub one_kv_head: bool,
    /// Dropout on the attention probabilities.
    pub dropout: f64,
    /// Longest sequence of keys and values (rows of the projections).
    pub seq_len: usize,
    /// Keys and values come from the context (cross-attention).
    pub reads_context: bool,
}

/// One stream's state: the context's projected keys and values [1, heads, k, dim_head].
#[derive(Clone, Debug)]
pub(crate) struct State {
    keys: Tensor,
    values: Tensor,
}

impl Linformer {
    /// Self-attention (`linformer_settings`).
    pub fn new_self(b: &Builder, c: &TransformerConfig) -> Result<Self> {
        let k = c.linformer_settings.expect("linformer_settings is set").k;
        Self::new(b, c, c.max_seq_len, k, false)
    }

    /// The most bytes one stream's state holds as cross-attention: the projected keys and
    /// values (f32).
    pub fn max_state_bytes(c: &TransformerConfig) -> usize {
        let k = c.context_linformer_settings.map_or(0, |s| s.k);
        2 * c.heads * k * c.dim_head.unwrap_or(c.dim / c.heads) * 4
    }

    /// Cross-attention (`context_linformer_settings`).
    pub fn new_context(b: &Builder, c: &TransformerConfig) -> Result<Self> {
        let s = c.context_linformer_settings.expect("context_linformer_settings is set");
        Self::new(b, c, s.seq_len, s.k, true)
    }

    fn new(b: &Builder, c: &TransformerConfig, seq_len: usize, k: usize, reads_context: bool) -> Result<Self> {
        let (dim, heads) = (c.dim, c.heads);
        let dim_head = c.dim_head.unwrap_or(dim / heads);
        let kv = if c.one_kv_head { dim_head } else { dim_head * heads };
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
            one_kv_head: c.one_kv_head,
            dropout: c.attn_dropout,
            seq_len,
            reads_context,
        })
    }

    /// Keys and values of `src` [batch, m, dim] projected along the sequence, per head:
    /// [batch, heads, k, dim_head] each. `keep` [batch, m] zeroes masked positions.
    fn project(&self, src: &Tensor, keep: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, m, _) = src.dims3()?;
        if m > self.seq_len {
            return Err(Error::input(format!("Linformer attention takes at most {} positions (its seq_len), got {m}; raise max_seq_len or the context seq_len", self.seq_len)));
        }
        let along = |layer: &Linear, proj: &Tensor| -> Result<Tensor> {
            let t = layer.matmul(src)?;
            let t = match keep {
                Some(mk) => t.broadcast_mul(&mk.to_dtype(t.dtype())?.unsqueeze(D::Minus1)?)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?.contiguous()?.broadcast_matmul(&proj.narrow(0, 0, m)?)?.transpose(1, 2)?)
        };
        let k = self.proj_k.dim(1)?;
        let kv_heads = if self.one_kv_head { 1 } else { self.heads };
        let split = |t: Tensor| -> Result<Tensor> {
            let t = t.reshape((b, k, kv_heads, self.dim_head))?.transpose(1, 2)?;
            Ok(t.broadcast_as((b, self.heads, k, self.dim_head))?.contiguous()?)
        };
        Ok((split(along(&self.to_k, &self.proj_k)?)?, split(along(&self.to_v, &self.proj_v)?)?))
    }

    /// Softmax attention of the queries of `x` to projected keys and values.
    fn attend(&self, x: &Tensor, keys: &Tensor, values: &Tensor, seed: Option<u64>, mode: Mode) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, dh) = (self.heads, self.dim_head);
        let q = self.to_q.apply(x, mode)?.reshape((b, n, h, dh))?.transpose(1, 2)?.contiguous()?;
        let dots = (q.matmul(&keys.t()?)? * (dh as f64).powf(-0.5))?;
        let attn = dropout(&candle_nn::ops::softmax(&dots, D::Minus1)?, self.dropout, seed)?;
        let out = attn.matmul(values)?.transpose(1, 2)?.contiguous()?.reshape((b, n, h * dh))?;
        self.to_out.apply(&out, mode)
    }

    /// Where keys and values come from, and which of their positions are real.
    fn source<'a>(&self, h: &'a Tensor, call: &'a Call) -> Result<(&'a Tensor, Option<&'a Tensor>)> {
        if !self.reads_context {
            return Ok((h, call.mask()));
        }
        Ok((call.context()?, call.inputs.context_mask.as_ref()))
    }
}

impl Layer for Linformer {
    type Saved = std::convert::Infallible;
    type State = State;
    const HAND_WRITTEN: bool = false;

    fn forward(&self, h: &Tensor, call: &Call, _mode: Mode) -> Result<(Tensor, Option<Self::Saved>)> {
        let (src, keep) = self.source(h, call)?;
        let (keys, values) = self.project(src, keep)?;
        Ok((self.attend(h, &keys, &values, call.dropout_seed(SITE_ATTN), Mode::Graph)?, None))
    }

    fn backward(&self, saved: Self::Saved, _h: &Tensor, _dy: &Tensor, _call: &Call, _grads: &mut Grads) -> Result<Tensor> {
        match saved {}
    }

    fn prefill(&self, h: &Tensor, call: &Call, _n: usize) -> Result<(Tensor, Vec<State>)> {
        // The context is projected once, for the states and the pass alike.
        let states = self.start(call, h.dim(0)?)?;
        let (keys, values) = stacked(states.iter())?;
        Ok((self.attend(h, &keys, &values, call.dropout_seed(SITE_ATTN), Mode::Graph)?, states))
    }

    /// As cross-attention the state holds only the context's projected keys and values: it
    /// is the same at every position.
    fn start(&self, call: &Call, rows: usize) -> Result<Vec<State>> {
        if !self.reads_context {
            return Err(Error::input("Linformer self-attention is not causal: it cannot decode"));
        }
        let (keys, values) = self.project(call.context_for(rows)?, call.inputs.context_mask.as_ref())?;
        (0..rows).map(|r| Ok(State { keys: keys.narrow(0, r, 1)?, values: values.narrow(0, r, 1)? })).collect()
    }

    fn step(&self, h: &Tensor, states: &mut [&mut State], _step: &Step) -> Result<Tensor> {
        let (keys, values) = stacked(states.iter().map(|s| &**s))?;
        self.attend(h, &keys, &values, None, Mode::Decode)
    }

    fn state_bytes(state: &State) -> usize {
        (state.keys.elem_count() + state.values.elem_count()) * state.keys.dtype().size_in_bytes()
    }
}

/// The projected keys and values of every row's state, [rows, heads, k, dim_head] each.
fn stacked<'a>(states: impl Iterator<Item = &'a State>) -> Result<(Tensor, Tensor)> {
    let (keys, values): (Vec<&Tensor>, Vec<&Tensor>) = states.map(|s| (&s.keys, &s.values)).unzip();
    Ok((Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?))
}
