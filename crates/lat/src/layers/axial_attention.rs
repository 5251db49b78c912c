//! Axial attention (the reference's `FoldAxially(local_attn_window_size, SelfAttention)`): the
//! sequence is folded into `W` strided sequences (sequence `c` holds positions `c, c + W,
//! c + 2W, …`), each attended by global linear heads of width `dim / heads`, then unfolded.
//!
//! Decoding keeps one self-attention state per strided sequence; position `p` advances the
//! state of sequence `p mod W`.

use candle_core::Tensor;

use super::heads::HeadLayout;
use super::self_attention::{self, SelfAttention};
use super::{Call, Layer, Mode, StackInputs, Step};
use crate::config::TransformerConfig;
use crate::error::Result;
use crate::graph::Grads;
use crate::params::Builder;

#[derive(Clone, Debug)]
pub(crate) struct AxialAttention {
    /// W: how many strided sequences.
    fold: usize,
    attention: SelfAttention,
}

/// One stream's state: one self-attention state per strided sequence.
#[derive(Clone, Debug)]
pub(crate) struct State {
    strided: Vec<self_attention::State>,
}

impl AxialAttention {
    pub fn new(b: &Builder, c: &TransformerConfig) -> Result<Self> {
        // `FoldAxially` adds one `fn.` level.
        let attention = SelfAttention::with_layout(&b.pp("fn"), c, Self::layout(c), c.causal, 1)?;
        Ok(Self { fold: c.local_attn_window_size, attention })
    }

    /// Global heads of width dim / heads (the reference passes no dim_head), no blind spot.
    fn layout(c: &TransformerConfig) -> HeadLayout {
        HeadLayout { heads: c.heads, dim_head: c.dim / c.heads, local_heads: 0, one_kv_head: c.one_kv_head }
    }

    /// The most bytes one stream's state holds: one self-attention state per strided sequence.
    pub fn max_state_bytes(c: &TransformerConfig) -> usize {
        c.local_attn_window_size * SelfAttention::max_state_bytes(Self::layout(c), c.local_attn_window_size, 1)
    }

    /// [b, n, d] as [b · W, n / W, d]: sequence c holds positions c, c + W, c + 2W, …
    fn fold(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let w = self.fold;
        Ok(x.reshape((b, n / w, w, d))?.transpose(1, 2)?.contiguous()?.reshape((b * w, n / w, d))?)
    }

    /// The inverse of [`AxialAttention::fold`].
    fn unfold(&self, x: &Tensor) -> Result<Tensor> {
        let (bw, m, d) = x.dims3()?;
        let w = self.fold;
        Ok(x.reshape((bw / w, w, m, d))?.transpose(1, 2)?.contiguous()?.reshape((bw / w, m * w, d))?)
    }

    /// The call of the folded sequences: the mask folded like them, no rotary positions.
    fn folded(&self, call: &Call) -> Result<Call> {
        let w = self.fold;
        let mask = match call.mask() {
            Some(m) => {
                let (b, n) = m.dims2()?;
                Some(m.reshape((b, n / w, w))?.transpose(1, 2)?.contiguous()?.reshape((b * w, n / w))?)
            }
            None => None,
        };
        Ok(Call { inputs: StackInputs { mask, ..StackInputs::default() }, ..call.clone() })
    }
}

impl Layer for AxialAttention {
    type Saved = self_attention::Saved;
    type State = State;
    const HAND_WRITTEN: bool = true;

    fn forward(&self, h: &Tensor, call: &Call, mode: Mode) -> Result<(Tensor, Option<Self::Saved>)> {
        let (y, saved) = self.attention.forward(&self.fold(h)?, &self.folded(call)?, mode)?;
        Ok((self.unfold(&y)?, saved))
    }

    fn backward(&self, saved: Self::Saved, h: &Tensor, dy: &Tensor, call: &Call, grads: &mut Grads) -> Result<Tensor> {
        let dh = self.attention.backward(saved, &self.fold(h)?, &self.fold(dy)?, &self.folded(call)?, grads)?;
        self.unfold(&dh)
    }

    fn prefill(&self, h: &Tensor, call: &Call, n: usize) -> Result<(Tensor, Vec<State>)> {
        let w = self.fold;
        // Strided sequence c holds the real positions c, c + W, … below n.
        let (y, states) = self.attention.prefill_rows(&self.fold(h)?, &self.folded(call)?, |row| (n + w - 1 - row % w) / w)?;
        let states = states.chunks(w).map(|strided| State { strided: strided.to_vec() }).collect();
        Ok((self.unfold(&y)?, states))
    }

    fn start(&self, call: &Call, rows: usize) -> Result<Vec<State>> {
        let strided = self.attention.start(call, self.fold)?;
        Ok(vec![State { strided }; rows])
    }

    fn step(&self, h: &Tensor, states: &mut [&mut State], step: &Step) -> Result<Tensor> {
        let w = self.fold;
        let mut rows: Vec<&mut [self_attention::State]> = states.iter_mut().map(|s| &mut s.strided[..]).collect();
        self.attention.step_rows(h, &mut rows, |position| position % w, &Step { rotary: None, ..*step })
    }

    fn state_bytes(state: &State) -> usize {
        state.strided.iter().map(SelfAttention::state_bytes).sum()
    }
}
