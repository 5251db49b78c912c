//! The stack of residual pairs and its coupling, written once for every way the stack runs
//! (through candle's graph, in training, over a prompt, and while decoding):
//!
//! - sequential: `x = x + f(x);  x = x + g(x)` for every pair (f, g);
//! - reversible (RevNet coupling, as in the Reformer): `x1 = x2 = x;  x1 = x1 + f(x2);
//!   x2 = x2 + g(x1)` for every pair, and the output `(x1 + x2) / 2`.
//!
//! In training the stack enters candle's graph as one node whose backward pass runs the
//! blocks' backward passes in reverse: a sequential stack from what each block kept, a
//! reversible one reconstructing each pair's inputs from its outputs (`x2 = y2 - g(y1)`,
//! `x1 = y1 - f(x2)`) and recomputing one block at a time, so that its memory is one block's
//! activations whatever the depth, or, when the pass keeps activations, from what each block
//! kept, skipping the recomputation.

use std::sync::Arc;

use candle_core::Tensor;

use crate::block::{AnyBlock, Backward, BlockState};
use crate::error::Result;
use crate::graph::{self, Grads};
use crate::layers::{Pair, StackInputs, Step};
use crate::pass::Pass;

/// One stream's decoding state in the stack: one state per block, in the blocks' order.
pub(crate) type RowStates = Vec<Box<dyn BlockState>>;

#[derive(Clone, Debug)]
pub(crate) struct Stack {
    pairs: Arc<Vec<Pair>>,
    reversible: bool,
    params: Vec<Tensor>,
}

/// The two residual streams (the same tensor twice in a sequential stack).
type Streams = (Tensor, Tensor);

impl Stack {
    pub fn new(pairs: Vec<Pair>, reversible: bool) -> Self {
        let params = pairs.iter().flat_map(|p| p.f.params().iter().chain(p.g.params())).cloned().collect();
        Self { pairs: Arc::new(pairs), reversible, params }
    }

    /// Every block, in order: f and g of each pair.
    pub fn blocks(&self) -> impl Iterator<Item = &dyn AnyBlock> {
        self.pairs.iter().flat_map(|p| [p.f.as_ref(), p.g.as_ref()])
    }

    /// Runs the pairs on `x`, each block `i` through `block(i, block, its input)`.
    fn couple(&self, x: &Tensor, mut block: impl FnMut(usize, &dyn AnyBlock, &Tensor) -> Result<Tensor>) -> Result<Streams> {
        let (mut x1, mut x2) = (x.clone(), x.clone());
        for (j, pair) in self.pairs.iter().enumerate() {
            let (f, g) = (pair.f.as_ref(), pair.g.as_ref());
            if self.reversible {
                x1 = (&x1 + block(2 * j, f, &x2)?)?;
                x2 = (&x2 + block(2 * j + 1, g, &x1)?)?;
            } else {
                x1 = (&x1 + block(2 * j, f, &x1)?)?;
                x1 = (&x1 + block(2 * j + 1, g, &x1)?)?;
            }
        }
        Ok(if self.reversible { (x1, x2) } else { (x1.clone(), x1) })
    }

    fn output(&self, (x1, x2): Streams) -> Result<Tensor> {
        Ok(if self.reversible { ((x1 + x2)? * 0.5)? } else { x1 })
    }

    /// The stack on an (already padded) input; with gradients when `x`, the context or (when
    /// `trainable`) the parameters need them.
    pub fn forward(&self, x: &Tensor, inputs: &StackInputs, pass: &Pass, trainable: bool) -> Result<Tensor> {
        let tracked = trainable || x.track_op() || inputs.context.as_ref().is_some_and(|c| c.track_op());
        if !tracked {
            return self.output(self.couple(x, |_, b, h| b.forward(h, inputs, pass))?);
        }
        let local = StackInputs { context: inputs.context.as_ref().map(|c| c.detach()), ..inputs.clone() };
        let (out, backward) = if pass.recomputes(self.reversible) {
            // Each block's result is detached: at most one block's activations are alive.
            let (y1, y2) = self.couple(&x.detach(), |_, b, h| Ok(b.forward(h, &local, pass)?.detach()))?;
            let out = self.output((y1.clone(), y2.clone()))?;
            let (stack, pass) = (self.clone(), *pass);
            let backward: graph::NodeBackward = Box::new(move |dy| stack.reversible_backward((y1, y2), dy, &local, &pass));
            (out, backward)
        } else {
            let mut recorded = Vec::with_capacity(2 * self.pairs.len());
            let streams = self.couple(&x.detach(), |_, b, h| {
                let (y, backward) = b.record(h, &local, pass)?;
                recorded.push(backward);
                Ok(y)
            })?;
            let reversible = self.reversible;
            let backward: graph::NodeBackward = Box::new(move |dy| kept_backward(recorded, reversible, dy));
            (self.output(streams)?, backward)
        };
        graph::attach(x, inputs.context.as_ref(), &self.params, out, backward)
    }

    /// The reversible stack's backward pass from its final streams and the output gradient.
    fn reversible_backward(&self, (mut y1, mut y2): Streams, dy: &Tensor, inputs: &StackInputs, pass: &Pass) -> Result<(Tensor, Grads)> {
        let mut grads = Grads::default();
        let half = (dy * 0.5)?;
        let (mut dy1, mut dy2) = (half.clone(), half);
        for pair in self.pairs.iter().rev() {
            let (gy, dg) = pair.g.vjp(&y1, &dy2, inputs, pass, &mut grads)?;
            let x2 = (&y2 - gy)?;
            dy1 = (dy1 + dg)?;
            let (fy, df) = pair.f.vjp(&x2, &dy1, inputs, pass, &mut grads)?;
            let x1 = (&y1 - fy)?;
            dy2 = (dy2 + df)?;
            (y1, y2) = (x1, x2);
        }
        // Both streams started as x.
        Ok(((dy1 + dy2)?, grads))
    }

    /// The stack over a prompt whose first `n` positions are real, and each row's state: per
    /// row, one state per block.
    pub fn prefill(&self, x: &Tensor, inputs: &StackInputs, n: usize) -> Result<(Tensor, Vec<RowStates>)> {
        let rows = x.dim(0)?;
        let mut states: Vec<RowStates> = (0..rows).map(|_| Vec::with_capacity(2 * self.pairs.len())).collect();
        let streams = self.couple(x, |_, b, h| {
            let (y, block_states) = b.prefill(h, inputs, n)?;
            states.iter_mut().zip(block_states).for_each(|(row, s)| row.push(s));
            Ok(y)
        })?;
        Ok((self.output(streams)?, states))
    }

    /// Each of `rows` rows' states before its first position: per row, one state per block.
    pub fn start(&self, inputs: &StackInputs, rows: usize) -> Result<Vec<RowStates>> {
        let mut states: Vec<RowStates> = (0..rows).map(|_| Vec::with_capacity(2 * self.pairs.len())).collect();
        for block in self.blocks() {
            states.iter_mut().zip(block.start(inputs, rows)?).for_each(|(row, s)| row.push(s));
        }
        Ok(states)
    }

    /// Advances every row by the new positions of `x` [rows, t, dim]; `states[r]` is row r's.
    pub fn step(&self, x: &Tensor, states: &mut [&mut RowStates], step: &Step) -> Result<Tensor> {
        let streams = self.couple(x, |i, b, h| {
            let mut own: Vec<&mut Box<dyn BlockState>> = states.iter_mut().map(|row| row.get_mut(i).ok_or_else(stale)).collect::<Result<_>>()?;
            // A step is never differentiated: what a block makes from trainable weights (its
            // norm's) carries no autograd graph into the residual stream.
            Ok(b.step(h, &mut own, step)?.detach())
        })?;
        self.output(streams)
    }
}

/// The stack's backward pass through the blocks' recorded backward passes, block `2j` being
/// pair j's f and `2j + 1` its g.
fn kept_backward(recorded: Vec<Backward>, reversible: bool, dy: &Tensor) -> Result<(Tensor, Grads)> {
    let mut grads = Grads::default();
    if !reversible {
        let mut dx = dy.clone();
        for backward in recorded.into_iter().rev() {
            dx = (&dx + backward(&dx, &mut grads)?)?;
        }
        return Ok((dx, grads));
    }
    // The coupling's chain rule: y1 = x1 + f(x2), y2 = x2 + g(y1), out = (y1 + y2) / 2.
    let half = (dy * 0.5)?;
    let (mut dy1, mut dy2) = (half.clone(), half);
    let mut blocks = recorded.into_iter().rev();
    while let (Some(g), Some(f)) = (blocks.next(), blocks.next()) {
        dy1 = (&dy1 + g(&dy2, &mut grads)?)?;
        dy2 = (&dy2 + f(&dy1, &mut grads)?)?;
    }
    Ok(((dy1 + dy2)?, grads))
}

fn stale() -> crate::Error {
    crate::Error::input("the decoding state does not belong to this model")
}
