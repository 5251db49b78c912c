//! Reversible residual stack (RevNet coupling, as in the Reformer):
//!
//! ```text
//! x1 = x2 = x;  for each pair: y1 = x1 + f(x2);  y2 = x2 + g(y1);  out = (x1 + x2) / 2
//! ```
//!
//! When gradients are needed, the forward pass keeps no activations: a custom op stands for the
//! whole stack, and its backward pass walks the pairs from the top, reconstructing each pair's
//! inputs (`x2 = y2 - g(y1)`, `x1 = y1 - f(x2)`) and taking that pair's vector-Jacobian
//! product on a small local graph. Parameter gradients go to the [`Pass`]; input gradients
//! (the stack input and, for cross-attention, the context) flow on through candle's graph.
//! Memory is that of one block's activations, whatever the depth.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor, Var, D};

use crate::attention::AttentionInputs;
use crate::error::Result;
use crate::layers::{Block, Pair};
use crate::pass::Pass;

/// Runs `pairs` reversibly on `x` [batch, n, dim] and returns the mean of the two halves.
pub(crate) fn forward(pairs: &Arc<Vec<Pair>>, x: &Tensor, inputs: &AttentionInputs, pass: &Pass, trainable: bool) -> Result<Tensor> {
    let context_tracked = inputs.context.as_ref().is_some_and(|c| c.track_op());
    let (y1, y2) = run(pairs, x, x, inputs, pass)?;
    let y = if trainable || x.track_op() || context_tracked {
        let stacked = Tensor::cat(&[&y1, &y2], D::Minus1)?;
        let op = Reversible { pairs: pairs.clone(), inputs: inputs.clone(), pass: pass.clone(), out: Mutex::new(Some(stacked)) };
        // The context rides along as the op's second input so that its gradient flows back
        // (to an encoder, say); without one, a scalar stands in.
        let context = match &inputs.context {
            Some(c) => c.clone(),
            None => Tensor::zeros((), x.dtype(), x.device())?,
        };
        x.apply_op2(&context, op)?
    } else {
        Tensor::cat(&[&y1, &y2], D::Minus1)?
    };
    let d = x.dim(D::Minus1)?;
    Ok(((y.narrow(D::Minus1, 0, d)? + y.narrow(D::Minus1, d, d)?)? * 0.5)?)
}

/// The coupled forward without graph: each step's result is detached, so at most one block's
/// activations are alive at a time.
fn run(pairs: &[Pair], x1: &Tensor, x2: &Tensor, inputs: &AttentionInputs, pass: &Pass) -> Result<(Tensor, Tensor)> {
    let (mut x1, mut x2) = (x1.detach(), x2.detach());
    let inputs = detached(inputs);
    for (j, pair) in pairs.iter().enumerate() {
        let y1 = (&x1 + pair.f.forward(&x2, &inputs, pass, j)?)?.detach();
        let y2 = (&x2 + pair.g.forward(&y1, &inputs, pass, j)?)?.detach();
        (x1, x2) = (y1, y2);
    }
    Ok((x1, x2))
}

fn detached(inputs: &AttentionInputs) -> AttentionInputs {
    AttentionInputs { context: inputs.context.as_ref().map(|c| c.detach()), ..inputs.clone() }
}

struct Reversible {
    pairs: Arc<Vec<Pair>>,
    inputs: AttentionInputs,
    pass: Pass,
    /// The already computed output, handed over once as the op's result.
    out: Mutex<Option<Tensor>>,
}

impl Reversible {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.out.lock().expect("reversible output lock").take().ok_or_else(|| candle_core::Error::Msg("reversible op applied twice".into()))
    }
}

/// The gradient `block` sends back to its input, and to the context when it reads one, for
/// output gradient `dy`; parameter gradients are deferred to the pass.
fn vjp(block: &Block, x: &Tensor, dy: &Tensor, inputs: &AttentionInputs, pass: &Pass, pair: usize, context: Option<&Var>) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let xv = Var::from_tensor(&x.detach())?;
    let mut local = detached(inputs);
    if let Some(c) = context {
        local.context = Some(c.as_tensor().clone());
    }
    let y = block.forward(xv.as_tensor(), &local, pass, pair)?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    for p in &block.params {
        if let Some(g) = grads.get(p) {
            pass.defer(p, g.clone())?;
        }
    }
    let dx = grads.get(xv.as_tensor()).cloned().map_or_else(|| xv.zeros_like(), Ok)?;
    let dcontext = context.and_then(|c| grads.get(c.as_tensor()).cloned());
    Ok((y.detach(), dx, dcontext))
}

impl CustomOp2 for Reversible {
    fn name(&self) -> &'static str {
        "reversible-stack"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("reversible stack: output is not on the CPU"),
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
            _ => candle_core::bail!("reversible stack: output is not on the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, context: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, context, res, grad).map_err(|e| candle_core::Error::Msg(format!("reversible backward: {e}")))
    }
}

impl Reversible {
    fn backward(&self, x: &Tensor, context: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let res = res.detach();
        let (mut y1, mut y2) = (res.narrow(D::Minus1, 0, d)?, res.narrow(D::Minus1, d, d)?);
        let (mut dy1, mut dy2) = (grad.narrow(D::Minus1, 0, d)?, grad.narrow(D::Minus1, d, d)?);
        let context = match &self.inputs.context {
            Some(_) => Some(Var::from_tensor(&context.detach())?),
            None => None,
        };
        let mut dcontext: Option<Tensor> = None;
        let mut add_context = |g: Option<Tensor>| -> Result<()> {
            if let Some(g) = g {
                dcontext = Some(match dcontext.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
            Ok(())
        };
        for (j, pair) in self.pairs.iter().enumerate().rev() {
            let (gy, dy1_from_g, dc) = vjp(&pair.g, &y1, &dy2, &self.inputs, &self.pass, j, context.as_ref())?;
            add_context(dc)?;
            let x2 = (&y2 - gy)?;
            dy1 = (dy1 + dy1_from_g)?;
            let (fx, dx2_from_f, dc) = vjp(&pair.f, &x2, &dy1, &self.inputs, &self.pass, j, context.as_ref())?;
            add_context(dc)?;
            let x1 = (&y1 - fx)?;
            dy2 = (dy2 + dx2_from_f)?;
            (y1, y2) = (x1, x2);
        }
        let dcontext = dcontext.filter(|_| self.inputs.context.is_some());
        Ok((Some((dy1 + dy2)?), dcontext))
    }
}
