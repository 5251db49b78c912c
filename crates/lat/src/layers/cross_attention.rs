//! Cross-attention (the reference's `SelfAttention` with `receives_context = True`): queries
//! from the input, keys and values from the context, every head global and non-causal linear
//! attention, no positions.
//!
//! The context is fixed while a decoder generates, so its whole contribution is, per head,
//! `softmax_positions(k)ᵀ v`: decoding keeps that `e x e` summary and each step is one query
//! against it.

use candle_core::Tensor;

use super::heads::HeadLayout;
use super::{project_out, project_out_backward, Call, Layer, Mode, Step, SITE_OUT};
use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::graph::Grads;
use crate::kernels::linear::{self as kernel, ContextSummary};
use crate::nn::Linear;
use crate::params::Builder;

#[derive(Clone, Debug)]
pub(crate) struct CrossAttention {
    pub layout: HeadLayout,
    /// Dropout after the output projection (`attn_layer_dropout`).
    pub dropout: f64,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

pub(crate) struct Saved {
    context: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: Tensor,
    out_mask: Option<Tensor>,
}

/// One stream's state: the context summary of each key/value head.
#[derive(Clone, Debug)]
pub(crate) struct State {
    pub summaries: Vec<ContextSummary>,
}

impl CrossAttention {
    fn layout(c: &TransformerConfig) -> HeadLayout {
        HeadLayout { heads: c.heads, dim_head: c.dim_head(), local_heads: 0, one_kv_head: c.one_kv_head }
    }

    /// The most bytes one stream's state holds: a context summary per key/value head.
    pub fn max_state_bytes(c: &TransformerConfig) -> usize {
        let l = Self::layout(c);
        l.kv_heads() * l.dim_head * l.dim_head * 4
    }

    pub fn new(b: &Builder, c: &TransformerConfig) -> Result<Self> {
        let layout = Self::layout(c);
        let [to_q, to_k, to_v, to_out] = layout.projections(b, c.dim)?;
        Ok(Self { layout, dropout: c.attn_layer_dropout, to_q, to_k, to_v, to_out })
    }

    /// [.., heads · dim_head] as [.., heads, dim_head].
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let (b, m, _) = t.dims3()?;
        Ok(t.reshape((b, m, self.layout.heads, self.layout.dim_head))?)
    }
}

impl Layer for CrossAttention {
    type Saved = Saved;
    type State = State;
    const HAND_WRITTEN: bool = true;

    fn forward(&self, h: &Tensor, call: &Call, mode: Mode) -> Result<(Tensor, Option<Saved>)> {
        let context = call.context()?;
        let l = &self.layout;
        let q = self.split(&self.to_q.apply(h, mode)?)?;
        let k = l.expand(&self.to_k.apply(context, mode)?)?;
        let v = l.expand(&self.to_v.apply(context, mode)?)?;
        let mask = call.inputs.context_mask.as_ref();
        let att = match mode {
            Mode::Graph | Mode::Decode => kernel::linear_attention(&q, &k, &v, mask)?,
            Mode::Record => kernel::forward_detached(&q, &k, &v, mask)?,
        }
        .flatten_from(2)?;
        let (y, out_mask) = project_out(&self.to_out, &att, self.dropout, call.dropout_seed(SITE_OUT), mode)?;
        let saved = (mode == Mode::Record).then(|| Saved { context: context.clone(), q, k, v, att, out_mask });
        Ok((y, saved))
    }

    fn backward(&self, s: Saved, h: &Tensor, dy: &Tensor, call: &Call, grads: &mut Grads) -> Result<Tensor> {
        let l = &self.layout;
        let datt = project_out_backward(&self.to_out, &s.att, s.out_mask.as_ref(), dy, grads)?;
        let (dq, dk, dv) = kernel::backward(&s.q, &s.k, &s.v, &self.split(&datt)?, call.inputs.context_mask.as_ref())?;
        let dcontext = (self.to_k.backward(&s.context, &l.reduce(&dk)?, grads)? + self.to_v.backward(&s.context, &l.reduce(&dv)?, grads)?)?;
        grads.context(dcontext)?;
        self.to_q.backward(h, &dq.flatten_from(2)?, grads)
    }

    fn prefill(&self, h: &Tensor, call: &Call, _n: usize) -> Result<(Tensor, Vec<State>)> {
        Ok((self.forward(h, call, Mode::Graph)?.0, self.start(call, h.dim(0)?)?))
    }

    /// The state holds only the context's summaries: it is the same at every position.
    fn start(&self, call: &Call, rows: usize) -> Result<Vec<State>> {
        let context = call.context_for(rows)?;
        let l = &self.layout;
        let (k, v) = (self.to_k.forward(context)?, self.to_v.forward(context)?);
        let (b, m, _) = k.dims3()?;
        let host = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>();
        let (k, v) = (host(&k)?, host(&v)?);
        let keep = match &call.inputs.context_mask {
            Some(mask) => Some(mask.to_dtype(candle_core::DType::U8)?.to_vec2::<u8>()?),
            None => None,
        };
        let dh = l.dim_head;
        let states = (0..b)
            .map(|r| {
                let head = |t: &[Vec<f32>], g: usize| -> Vec<f32> { t.iter().flat_map(|p| p[g * dh..(g + 1) * dh].iter().copied()).collect() };
                let summaries = (0..l.kv_heads()).map(|g| ContextSummary::new(&head(&k[r], g), &head(&v[r], g), keep.as_ref().map(|k| &k[r][..m]), dh, dh)).collect();
                State { summaries }
            })
            .collect();
        Ok(states)
    }

    fn step(&self, h: &Tensor, states: &mut [&mut State], _step: &Step) -> Result<Tensor> {
        let l = &self.layout;
        let (b, t, _) = h.dims3()?;
        let (dh, width) = (l.dim_head, l.inner());
        let q = self.to_q.apply(h, Mode::Decode)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; b * t * width];
        for (r, state) in states.iter().enumerate() {
            for i in 0..t {
                let at = (r * t + i) * width;
                for (g, (first, count)) in l.kv_groups().into_iter().enumerate() {
                    let heads = at + first * dh..at + (first + count) * dh;
                    state.summaries.get(g).ok_or_else(|| Error::input("the decoding state does not belong to this model"))?.query(&q[heads.clone()], &mut out[heads]);
                }
            }
        }
        let merged = Tensor::from_vec(out, (b, t, width), h.device())?.to_dtype(h.dtype())?;
        self.to_out.apply(&merged, Mode::Decode)
    }

    fn state_bytes(state: &State) -> usize {
        state.summaries.iter().map(ContextSummary::bytes).sum()
    }
}
