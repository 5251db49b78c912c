//! How gradients flow through the stack. The blocks run forward without candle's graph; the
//! graph gets one op standing for each span, whose backward pass takes the blocks'
//! hand-written backward passes ([`crate::vjp`]). Parameter gradients go to the [`Pass`]; the
//! input gradient (and, for cross-attention, the context gradient) flows on through candle's
//! graph.
//!
//! - Reversible stacks (RevNet coupling, as in the Reformer) keep nothing but their output:
//!   `x1 = x2 = x;  y1 = x1 + f(x2);  y2 = x2 + g(y1);  out = (y1 + y2) / 2`, and the backward
//!   pass reconstructs each pair's inputs from its outputs (`x2 = y2 - g(y1)`,
//!   `x1 = y1 - f(x2)`), recomputing one block at a time. Memory is one block's activations,
//!   whatever the depth.
//! - Sequential stacks get one op per residual block (`x + block(x)`) that keeps the
//!   activations its backward pass needs: no recomputation, memory growing with depth.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor, Var};

use crate::attention::AttentionInputs;
use crate::error::Result;
use crate::kernels;
use crate::layers::{Block, Pair};
use crate::pass::Pass;

/// The backward pass of a recomputed span: (input, output, output gradient, context variable)
/// to (input gradient, context gradient).
type Backward = dyn Fn(&Tensor, &Tensor, &Tensor, Option<&Var>) -> Result<(Tensor, Option<Tensor>)> + Send + Sync;

/// A graph node whose output was computed without graph.
struct Precomputed {
    out: Mutex<Option<Tensor>>,
    has_context: bool,
    backward: Box<Backward>,
}

/// Puts `out`, computed from `x` (and `context`) without graph, into candle's graph.
fn precomputed(x: &Tensor, context: Option<&Tensor>, out: Tensor, backward: Box<Backward>) -> Result<Tensor> {
    // The context rides along as the op's second input so that its gradient flows back (to an
    // encoder, say); without one, a scalar stands in.
    let second = match context {
        Some(c) => c.clone(),
        None => Tensor::zeros((), x.dtype(), x.device())?,
    };
    let op = Precomputed { out: Mutex::new(Some(out)), has_context: context.is_some(), backward };
    Ok(x.apply_op2(&second, op)?)
}

impl Precomputed {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.out.lock().expect("precomputed output lock").take().ok_or_else(|| candle_core::Error::Msg("precomputed op applied twice".into()))
    }
}

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        "recomputed-span"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("recomputed span: output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("recomputed span: output is not on the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, context: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let run = || -> Result<(Option<Tensor>, Option<Tensor>)> {
            let cv = if self.has_context { Some(Var::from_tensor(&context.detach())?) } else { None };
            let (dx, dc) = (self.backward)(&x.detach(), &res.detach(), &grad.detach(), cv.as_ref())?;
            Ok((Some(dx), dc.filter(|_| self.has_context)))
        };
        run().map_err(|e| candle_core::Error::Msg(format!("recomputing backward pass: {e}")))
    }
}

fn tracked(x: &Tensor, inputs: &AttentionInputs, trainable: bool) -> bool {
    trainable || x.track_op() || inputs.context.as_ref().is_some_and(|c| c.track_op())
}

fn detached(inputs: &AttentionInputs) -> AttentionInputs {
    AttentionInputs { context: inputs.context.as_ref().map(|c| c.detach()), ..inputs.clone() }
}

/// Adds an optional gradient to an optional sum.
fn accumulate(acc: Option<Tensor>, g: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (acc, g) {
        (Some(a), Some(g)) => Some((a + g)?),
        (a, g) => a.or(g),
    })
}

/// Runs `pairs` reversibly on `x` [batch, n, dim] and returns the mean of the two halves.
pub(crate) fn reversible(pairs: &Arc<Vec<Pair>>, x: &Tensor, inputs: &AttentionInputs, pass: &Pass, trainable: bool) -> Result<Tensor> {
    let local = detached(inputs);
    let (mut x1, mut x2) = (x.detach(), x.detach());
    for (j, pair) in pairs.iter().enumerate() {
        // Each step's result is detached: at most one block's activations are alive at a time.
        let y1 = (&x1 + pair.f.forward(&x2, &local, pass, j)?)?.detach();
        let y2 = (&x2 + pair.g.forward(&y1, &local, pass, j)?)?.detach();
        (x1, x2) = (y1, y2);
    }
    let mean = ((&x1 + &x2)? * 0.5)?;
    if !tracked(x, inputs, trainable) {
        return Ok(mean);
    }
    // The graph gets the mean; the backward pass starts from the two halves, kept here.
    let (pairs, local, pass) = (pairs.clone(), local.clone(), pass.clone());
    let backward = move |_x: &Tensor, _mean: &Tensor, grad: &Tensor, context: Option<&Var>| -> Result<(Tensor, Option<Tensor>)> {
        let (mut y1, mut y2) = (x1.clone(), x2.clone());
        let half = (grad * 0.5)?;
        let (mut dy1, mut dy2) = (half.clone(), half);
        let mut dcontext = None;
        for (j, pair) in pairs.iter().enumerate().rev() {
            let g = pair.g.vjp(&y1, &dy2, &local, &pass, j, context)?;
            dcontext = accumulate(dcontext, g.dcontext)?;
            let x2 = (&y2 - g.y)?;
            dy1 = (dy1 + g.dx)?;
            let f = pair.f.vjp(&x2, &dy1, &local, &pass, j, context)?;
            dcontext = accumulate(dcontext, f.dcontext)?;
            let x1 = (&y1 - f.y)?;
            dy2 = (dy2 + f.dx)?;
            (y1, y2) = (x1, x2);
        }
        // Both halves started as x.
        Ok(((dy1 + dy2)?, dcontext))
    };
    precomputed(x, inputs.context.as_ref(), mean, Box::new(backward))
}

/// `x + block(x)`. With gradients and fused kernels, the block keeps its activations for its
/// hand-written backward pass; elsewhere candle's autograd differentiates it.
pub(crate) fn residual(block: &Block, x: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, trainable: bool) -> Result<Tensor> {
    if !tracked(x, inputs, trainable) || !kernels::use_fused(x) || !block.hand_written() {
        return Ok((x + block.forward(x, inputs, pass, pair)?)?);
    }
    let local = detached(inputs);
    let (y, saved) = block.forward_saved(&x.detach(), &local, pass, pair, local.context.as_ref())?;
    let out = (x.detach() + y)?;
    let saved = Mutex::new(Some(saved));
    let (block, pass) = (block.clone(), pass.clone());
    let backward = move |_x: &Tensor, _res: &Tensor, grad: &Tensor, _context: Option<&Var>| -> Result<(Tensor, Option<Tensor>)> {
        let saved = saved.lock().expect("saved activations lock").take().ok_or_else(|| crate::Error::input("a block's backward pass ran twice"))?;
        let (dx, dcontext) = block.backward_saved(saved, grad, &local, &pass)?;
        Ok(((grad + dx)?, dcontext))
    };
    precomputed(x, inputs.context.as_ref(), out, Box::new(backward))
}
