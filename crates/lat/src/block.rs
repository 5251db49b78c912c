//! A block: one layer behind its pre-norm and token shift, `layer(shift(norm(x)))` (the
//! reference's `PreNorm(dim, PreShiftTokens(shifts, layer))`), and every way to run it: through
//! candle's graph, recorded for its backward pass, forward and backward at once, and while
//! decoding. The residual around it belongs to the stack (`crate::stack`).
//!
//! Recording uses the layer's hand-written backward pass on the fused kernels; for layers
//! without one, and where the fused kernels do not run (other devices, `LAT_KERNELS=reference`),
//! candle's autograd differentiates the block on a graph of its own. Tests check that the two
//! agree.

use std::any::Any;
use std::fmt;

use candle_core::{Tensor, Var};

use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::graph::Grads;
use crate::kernels::{self, layer_norm};
use crate::layers::feed_forward::FeedForward;
use crate::layers::{Call, Layer, Mode, Span, StackInputs, Step};
use crate::nn::shift::Shift;
use crate::nn::LayerNorm;
use crate::params::Builder;
use crate::pass::Pass;

/// The backward pass of a recorded block: from the output gradient to the input gradient,
/// with the parameter (and context) gradients into `grads`.
pub(crate) type Backward = Box<dyn FnOnce(&Tensor, &mut Grads) -> Result<Tensor> + Send>;

/// A block of any layer kind, as the stack sees it. `x` is the block's input [batch, n, dim]
/// and every output has its shape.
pub(crate) trait AnyBlock: fmt::Debug + Send + Sync {
    /// Through candle's graph.
    fn forward(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<Tensor>;

    /// Outside candle's graph: the output and its backward pass, which owns what it needs.
    fn record(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<(Tensor, Backward)>;

    /// The output and the input gradient for `dy` at once (reversible stacks recompute each
    /// block just before its backward pass): a position-wise layer goes piece by piece, so that
    /// the hidden activations of only one piece are alive.
    fn vjp(&self, x: &Tensor, dy: &Tensor, inputs: &StackInputs, pass: &Pass, grads: &mut Grads) -> Result<(Tensor, Tensor)>;

    /// The output over a prompt whose first `n` positions are real, and each row's state.
    fn prefill(&self, x: &Tensor, inputs: &StackInputs, n: usize) -> Result<(Tensor, Vec<Box<dyn BlockState>>)>;

    /// Each of `rows` rows' state before its first position.
    fn start(&self, inputs: &StackInputs, rows: usize) -> Result<Vec<Box<dyn BlockState>>>;

    /// Advances each row's state by the new positions of `x` [rows, t, dim].
    fn step(&self, x: &Tensor, states: &mut [&mut Box<dyn BlockState>], step: &Step) -> Result<Tensor>;

    /// The block's trainable tensors.
    fn params(&self) -> &[Tensor];
}

/// A span's call, the layer's output on it and what its backward pass keeps.
type SpanRun<S> = (Call, Tensor, Option<S>);

/// One decoding stream's state of one block, of whatever layer kind.
pub(crate) trait BlockState: fmt::Debug + Send + Sync {
    fn clone_box(&self) -> Box<dyn BlockState>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn bytes(&self) -> usize;
}

impl Clone for Box<dyn BlockState> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// A block's state for a layer of kind `L`.
#[derive(Clone, Debug)]
struct RowState<L: Layer> {
    /// The previous position's normalised input [1, 1, dim], for token shifting.
    shift_prev: Option<Tensor>,
    layer: L::State,
}

impl<L: Layer> BlockState for RowState<L> {
    fn clone_box(&self) -> Box<dyn BlockState> {
        Box::new(self.clone())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn bytes(&self) -> usize {
        self.shift_prev.as_ref().map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes()) + L::state_bytes(&self.layer)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Block<L> {
    norm: LayerNorm,
    shift: Option<Shift>,
    /// `ff_chunks`, for position-wise layers.
    chunks: usize,
    /// The block's pair (dropout streams depend on it).
    pair: usize,
    layer: L,
    params: Vec<Tensor>,
}

impl<L: Layer> Block<L> {
    /// The block of pair `pair` named under `b`, with the layer `make` builds.
    pub fn boxed(b: &Builder, c: &TransformerConfig, pair: usize, shift: Option<Shift>, make: impl FnOnce(&Builder) -> Result<L>) -> Result<Box<dyn AnyBlock>> {
        let mark = b.mark();
        let norm = LayerNorm::new(&b.pp("norm"), c.dim)?;
        // PreShiftTokens adds one `fn.` level between the norm and the layer.
        let inner = if shift.is_some() { b.pp("fn").pp("fn") } else { b.pp("fn") };
        let layer = make(&inner)?;
        Ok(Box::new(Self { norm, shift, chunks: c.ff_chunks, pair, layer, params: b.since(mark) }))
    }

    fn call(&self, inputs: &StackInputs, pass: &Pass, span: Span) -> Call {
        Call { inputs: inputs.clone(), pass: *pass, pair: self.pair, span }
    }

    /// The spans the layer runs on: pieces of the sequence for position-wise layers.
    fn spans(&self, h: &Tensor) -> Result<Vec<Span>> {
        let (b, n, _) = h.dims3()?;
        Ok(match L::POSITION_WISE {
            true => FeedForward::pieces(self.chunks, b, n).into_iter().map(|(start, len)| Span { start, len, total: n }).collect(),
            false => vec![Span { start: 0, len: n, total: n }],
        })
    }

    /// The layer on each span of `h`, lazily: a caller that finishes with a span before taking
    /// the next keeps the activations of only one span alive.
    fn run<'a>(&'a self, h: &'a Tensor, inputs: &'a StackInputs, pass: &'a Pass, mode: Mode) -> Result<impl Iterator<Item = Result<SpanRun<L::Saved>>> + 'a> {
        let whole = h.dim(1)?;
        Ok(self.spans(h)?.into_iter().map(move |span| {
            let call = self.call(inputs, pass, span);
            let piece = if span.len == whole { h.clone() } else { h.narrow(1, span.start, span.len)? };
            let (y, saved) = self.layer.forward(&piece, &call, mode)?;
            Ok((call, y, saved))
        }))
    }

    /// The normalised, shifted input, through candle's graph.
    fn normed(&self, x: &Tensor, inputs: &StackInputs) -> Result<Tensor> {
        let h = self.norm.forward(x)?;
        match &self.shift {
            Some(s) => s.forward(&h, inputs.mask.as_ref()),
            None => Ok(h),
        }
    }

    /// The same outside the graph, on the fused norm.
    fn normed_detached(&self, x: &Tensor, inputs: &StackInputs) -> Result<Tensor> {
        let h = layer_norm::forward_detached(x, &self.norm.weight.detach(), &self.norm.bias.detach(), 1e-5)?;
        match &self.shift {
            Some(s) => s.forward(&h, inputs.mask.as_ref()),
            None => Ok(h),
        }
    }

    /// Back through the shift and the norm.
    fn normed_backward(&self, x: &Tensor, dh: &Tensor, inputs: &StackInputs, grads: &mut Grads) -> Result<Tensor> {
        let dh = match &self.shift {
            Some(s) => s.backward(dh, inputs.mask.as_ref())?,
            None => dh.clone(),
        };
        let (dx, dw, db) = layer_norm::backward(x, &self.norm.weight.detach(), &dh, 1e-5)?;
        grads.param(&self.norm.weight, dw)?;
        grads.param(&self.norm.bias, db)?;
        Ok(dx)
    }

    /// Whether the layer's hand-written backward pass runs for `x`.
    fn hand_written(x: &Tensor) -> bool {
        L::HAND_WRITTEN && kernels::use_fused(x)
    }

    /// Records the block on a graph of its own and differentiates it with candle's autograd.
    fn record_by_autograd(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<(Tensor, Backward)> {
        let xv = Var::from_tensor(&x.detach())?;
        let context = inputs.context.as_ref().map(|c| Var::from_tensor(&c.detach())).transpose()?;
        let local = StackInputs { context: context.as_ref().map(|c| c.as_tensor().clone()), ..inputs.clone() };
        let y = self.forward(xv.as_tensor(), &local, pass)?;
        let params = self.params.clone();
        let out = y.detach();
        let backward = move |dy: &Tensor, grads: &mut Grads| -> Result<Tensor> {
            let store = (&y * dy)?.sum_all()?.backward()?;
            for p in &params {
                if let Some(g) = store.get(p) {
                    grads.param(p, g.clone())?;
                }
            }
            if let Some(g) = context.as_ref().and_then(|c| store.get(c.as_tensor())) {
                grads.context(g.clone())?;
            }
            store.get(xv.as_tensor()).cloned().map_or_else(|| Ok(xv.zeros_like()?), Ok)
        };
        Ok((out, Box::new(backward)))
    }

    /// Finds this block's state among a row's.
    fn own(state: &mut Box<dyn BlockState>) -> Result<&mut RowState<L>> {
        state.as_any_mut().downcast_mut::<RowState<L>>().ok_or_else(|| Error::input("the decoding state does not belong to this model"))
    }
}

/// Concatenates pieces along the sequence (no copy for one piece).
fn joined(mut pieces: Vec<Tensor>) -> Result<Tensor> {
    Ok(if pieces.len() == 1 { pieces.pop().expect("one piece") } else { Tensor::cat(&pieces, 1)? })
}

impl<L: Layer> AnyBlock for Block<L> {
    fn forward(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<Tensor> {
        let h = self.normed(x, inputs)?;
        let pieces = self.run(&h, inputs, pass, Mode::Graph)?.map(|r| r.map(|(_, y, _)| y)).collect::<Result<_>>()?;
        joined(pieces)
    }

    fn record(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<(Tensor, Backward)> {
        if !Self::hand_written(x) {
            return self.record_by_autograd(x, inputs, pass);
        }
        let x = x.detach();
        let h = self.normed_detached(&x, inputs)?;
        let (mut ys, mut saved) = (vec![], vec![]);
        for piece in self.run(&h, inputs, pass, Mode::Record)? {
            let (call, y, s) = piece?;
            ys.push(y);
            saved.push((call, s.ok_or_else(|| Error::input("a hand-written layer kept nothing for its backward pass"))?));
        }
        let (block, inputs) = (self.clone(), inputs.clone());
        let backward = move |dy: &Tensor, grads: &mut Grads| -> Result<Tensor> {
            let mut dhs = Vec::with_capacity(saved.len());
            for (call, s) in saved {
                let Span { start, len, .. } = call.span;
                dhs.push(block.layer.backward(s, &h.narrow(1, start, len)?, &dy.narrow(1, start, len)?, &call, grads)?);
            }
            block.normed_backward(&x, &joined(dhs)?, &inputs, grads)
        };
        Ok((joined(ys)?, Box::new(backward)))
    }

    fn vjp(&self, x: &Tensor, dy: &Tensor, inputs: &StackInputs, pass: &Pass, grads: &mut Grads) -> Result<(Tensor, Tensor)> {
        if !Self::hand_written(x) {
            let (y, backward) = self.record_by_autograd(x, inputs, pass)?;
            return Ok((y, backward(dy, grads)?));
        }
        let x = x.detach();
        let h = self.normed_detached(&x, inputs)?;
        let (mut ys, mut dhs) = (vec![], vec![]);
        for piece in self.run(&h, inputs, pass, Mode::Record)? {
            let (call, y, s) = piece?;
            let s = s.ok_or_else(|| Error::input("a hand-written layer kept nothing for its backward pass"))?;
            let Span { start, len, .. } = call.span;
            dhs.push(self.layer.backward(s, &h.narrow(1, start, len)?, &dy.narrow(1, start, len)?, &call, grads)?);
            ys.push(y);
        }
        Ok((joined(ys)?, self.normed_backward(&x, &joined(dhs)?, inputs, grads)?))
    }

    fn prefill(&self, x: &Tensor, inputs: &StackInputs, n: usize) -> Result<(Tensor, Vec<Box<dyn BlockState>>)> {
        let h = self.norm.forward(x)?;
        let shift_prev = self.shift.as_ref().map(|_| h.narrow(1, n - 1, 1)).transpose()?;
        let h = match &self.shift {
            Some(s) => s.forward(&h, inputs.mask.as_ref())?,
            None => h,
        };
        let call = self.call(inputs, &Pass::eval(), Span { start: 0, len: h.dim(1)?, total: h.dim(1)? });
        let (y, layer_states) = self.layer.prefill(&h, &call, n)?;
        let states = layer_states
            .into_iter()
            .enumerate()
            // A copy: a view would keep the whole prompt's activations alive with the state.
            .map(|(r, layer)| Ok(Box::new(RowState::<L> { shift_prev: shift_prev.as_ref().map(|p| p.narrow(0, r, 1)?.copy()).transpose()?, layer }) as Box<dyn BlockState>))
            .collect::<Result<_>>()?;
        Ok((y, states))
    }

    fn start(&self, inputs: &StackInputs, rows: usize) -> Result<Vec<Box<dyn BlockState>>> {
        let call = self.call(inputs, &Pass::eval(), Span { start: 0, len: 0, total: 0 });
        let w = &self.norm.weight;
        // Token shifting shifts zeros in before the first position, as the parallel form pads.
        let shift_prev = self.shift.as_ref().map(|_| Tensor::zeros((1, 1, w.dim(0)?), w.dtype(), w.device())).transpose()?;
        let states = self.layer.start(&call, rows)?.into_iter().map(|layer| Box::new(RowState::<L> { shift_prev: shift_prev.clone(), layer }) as Box<dyn BlockState>);
        Ok(states.collect())
    }

    fn step(&self, x: &Tensor, states: &mut [&mut Box<dyn BlockState>], step: &Step) -> Result<Tensor> {
        let mut own = states.iter_mut().map(|s| Self::own(s)).collect::<Result<Vec<_>>>()?;
        let mut h = self.norm.forward(x)?;
        if let Some(shift) = &self.shift {
            let prev = own.iter().map(|s| s.shift_prev.clone().ok_or_else(|| Error::input("the decoding state lacks the previous position"))).collect::<Result<Vec<_>>>()?;
            let t = h.dim(1)?;
            for (r, s) in own.iter_mut().enumerate() {
                s.shift_prev = Some(h.narrow(0, r, 1)?.narrow(1, t - 1, 1)?.copy()?);
            }
            h = shift.step(&h, &Tensor::cat(&prev, 0)?)?;
        }
        let mut layer_states: Vec<&mut L::State> = own.iter_mut().map(|s| &mut s.layer).collect();
        self.layer.step(&h, &mut layer_states, step)
    }

    fn params(&self) -> &[Tensor] {
        &self.params
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor, Var};

    use crate::config::{LocalHeads, TransformerConfig};
    use crate::graph::Grads;
    use crate::kernels::rotary::RotaryTable;
    use crate::kernels::testing::{randn, rel_err};
    use crate::layers::StackInputs;
    use crate::model::LinearAttentionTransformer;
    use crate::pass::Pass;

    /// Hand-written and autograd backward passes agree on every block of the stack.
    fn compare(name: &str, c: &TransformerConfig, rotary: bool) {
        let (b, n, m) = (2, 16, 6);
        let model = LinearAttentionTransformer::new(c, 3, &Device::Cpu, DType::F64).unwrap();
        let x = randn(&[b, n, c.dim], 1.0, DType::F64, 1);
        let dy = randn(&[b, n, c.dim], 1.0, DType::F64, 2);
        let mask = Tensor::from_vec((0..b * n).map(|i| (i % 5 != 3 && i % n < n - 2) as u8).collect::<Vec<_>>(), (b, n), &Device::Cpu).unwrap();
        let context = Var::from_tensor(&randn(&[b, m, c.dim], 1.0, DType::F64, 4)).unwrap();
        let context_mask = Tensor::from_vec((0..b * m).map(|i| (i % 4 != 1) as u8).collect::<Vec<_>>(), (b, m), &Device::Cpu).unwrap();
        let inputs = StackInputs {
            mask: Some(mask),
            rotary: rotary.then(|| (Arc::new(RotaryTable::new(c.dim_head(), 64)), 2)),
            context: c.receives_context.then(|| context.as_tensor().clone()),
            context_mask: c.receives_context.then_some(context_mask),
        };
        for (i, block) in model.stack.blocks().enumerate() {
            let (j, half) = (i / 2, if i % 2 == 0 { "f" } else { "g" });
            let pass = Pass::train(9);
            let mut manual = Grads::default();
            let (y, dx) = block.vjp(&x, &dy, &inputs, &pass, &mut manual).unwrap();
            // The same contract through candle's autograd.
            let xv = Var::from_tensor(&x.detach()).unwrap();
            let local = StackInputs { context: inputs.context.as_ref().map(|_| context.as_tensor().clone()), ..inputs.clone() };
            let auto_y = block.forward(xv.as_tensor(), &local, &pass).unwrap();
            let auto = (&auto_y * dy.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            let at = format!("{name}: pair {j} {half}");
            assert!(rel_err(&y, &auto_y) < 1e-12, "{at}: output");
            let auto_dx = auto.get(xv.as_tensor()).unwrap();
            assert!(rel_err(&dx, auto_dx) < 1e-10, "{at}: dx {}", rel_err(&dx, auto_dx));
            match (manual.context_grad(), inputs.context.as_ref().and_then(|_| auto.get(context.as_tensor()))) {
                (Some(a), Some(b)) => assert!(rel_err(a, b) < 1e-10, "{at}: dcontext"),
                (None, None) => {}
                _ => panic!("{at}: context gradient present in only one"),
            }
            for p in block.params() {
                let (g1, g2) = (manual.get(p).expect("manual gradient"), auto.get(p).expect("autograd gradient"));
                assert!(rel_err(g1, g2) < 1e-10, "{at}: parameter gradient {}", rel_err(g1, g2));
            }
        }
    }

    #[test]
    fn hand_written_backward_matches_autograd() {
        let mut c = TransformerConfig::new(24, 2, 64);
        c.heads = 3;
        c.dim_head = Some(8);
        c.local_attn_window_size = 8;
        for causal in [true, false] {
            c.causal = causal;
            c.n_local_attn_heads = LocalHeads::Uniform(1);
            c.blindspot_size = if causal { 4 } else { 1 };
            compare("mixed heads", &c, false);
            compare("mixed heads, rotary", &c, true);
            let mut d = c.clone();
            d.shift_tokens = true;
            d.ff_glu = true;
            d.ff_chunks = 3;
            d.ff_dropout = 0.2;
            d.attn_dropout = 0.3;
            d.attn_layer_dropout = 0.1;
            compare("shift, glu, chunks, dropout", &d, false);
            let mut e = c.clone();
            e.n_local_attn_heads = LocalHeads::Uniform(0);
            e.receives_context = true;
            compare("global heads with cross-attention", &e, false);
            let mut a = c.clone();
            a.n_local_attn_heads = LocalHeads::Uniform(0);
            a.attend_axially = true;
            compare("axial attention", &a, false);
        }
    }
}
