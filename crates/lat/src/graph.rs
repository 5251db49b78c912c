//! How the stack, which runs outside candle's graph, enters it: as one node from its input (and
//! context) and its parameters to its output, whose backward pass runs the blocks' backward
//! passes. Every parameter's gradient then reaches candle's own `backward()`, so the model
//! trains from any candle program (`loss.backward()`, `candle_nn::Optimizer::backward_step`).
//!
//! Candle's custom ops take at most three inputs, so the parameters join the node through a
//! tree of "anchors": nodes that compute a zero scalar from their inputs and whose backward
//! pass hands each parameter the gradient the stack's backward pass left for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, TensorId};

use crate::error::Result;

/// Gradients a backward pass produces besides its input's: the parameters', by tensor, and
/// the context's.
#[derive(Default)]
pub(crate) struct Grads {
    params: HashMap<TensorId, Tensor>,
    context: Option<Tensor>,
}

impl Grads {
    /// Adds `g` to the gradient of the parameter `param`.
    pub fn param(&mut self, param: &Tensor, g: Tensor) -> Result<()> {
        let total = match self.params.remove(&param.id()) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        self.params.insert(param.id(), total);
        Ok(())
    }

    /// The gradient of `param` so far.
    #[cfg(test)]
    pub fn get(&self, param: &Tensor) -> Option<&Tensor> {
        self.params.get(&param.id())
    }

    /// The context's gradient so far.
    #[cfg(test)]
    pub fn context_grad(&self) -> Option<&Tensor> {
        self.context.as_ref()
    }

    /// Adds `g` to the gradient of the context.
    pub fn context(&mut self, g: Tensor) -> Result<()> {
        self.context = Some(match self.context.take() {
            Some(acc) => (acc + g)?,
            None => g,
        });
        Ok(())
    }
}

/// The backward pass of a node: from the output gradient to the input gradient and the rest.
pub(crate) type NodeBackward = Box<dyn FnOnce(&Tensor) -> Result<(Tensor, Grads)> + Send>;

/// Puts `out`, computed from `x` (and `context`) and `params` outside candle's graph, into it.
pub(crate) fn attach(x: &Tensor, context: Option<&Tensor>, params: &[Tensor], out: Tensor, backward: NodeBackward) -> Result<Tensor> {
    let slot: Slot = Arc::default();
    let anchor = match anchors(params, &slot)? {
        Some(a) => a,
        None => Tensor::zeros((), x.dtype(), x.device())?,
    };
    // Without a context a scalar stands in.
    let second = match context {
        Some(c) => c.clone(),
        None => Tensor::zeros((), x.dtype(), x.device())?,
    };
    let node = Node { out: Mutex::new(Some(out)), backward: Mutex::new(Some(backward)), has_context: context.is_some(), slot };
    Ok(x.apply_op3(&second, &anchor, node)?)
}

/// Parameter gradients waiting for their anchors.
type Slot = Arc<Mutex<HashMap<TensorId, Tensor>>>;

/// A balanced tree of anchors over `params`, so that the graph stays shallow at any depth.
fn anchors(params: &[Tensor], slot: &Slot) -> Result<Option<Tensor>> {
    Ok(match params {
        [] => None,
        [p] => Some(p.apply_op1(Leaf(slot.clone()))?),
        _ => {
            let (left, right) = params.split_at(params.len() / 2);
            let (l, r) = (anchors(left, slot)?.expect("nonempty"), anchors(right, slot)?.expect("nonempty"));
            Some(l.apply_op2(&r, Join)?)
        }
    })
}

struct Node {
    out: Mutex<Option<Tensor>>,
    backward: Mutex<Option<NodeBackward>>,
    has_context: bool,
    slot: Slot,
}

impl Node {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.out.lock().expect("node output lock").take().ok_or_else(|| candle_core::Error::Msg("graph node applied twice".into()))
    }
}

fn storage_of(t: &Tensor) -> candle_core::Result<Storage> {
    let (storage, layout) = t.storage_and_layout();
    Ok(match &*storage {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        _ => candle_core::bail!("the stack's output is on an unsupported device"),
    })
}

impl CustomOp3 for Node {
    fn name(&self) -> &'static str {
        "stack"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        match storage_of(&y)? {
            Storage::Cpu(s) => Ok((s, y.shape().clone())),
            _ => candle_core::bail!("stack: the output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        match storage_of(&y)? {
            Storage::Cuda(s) => Ok((s, y.shape().clone())),
            _ => candle_core::bail!("stack: the output is not on the GPU"),
        }
    }

    fn bwd(&self, _x: &Tensor, context: &Tensor, anchor: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = self.backward.lock().expect("node backward lock").take().ok_or_else(|| candle_core::Error::Msg("the stack's backward pass ran twice".into()))?;
        let (dx, grads) = backward(&grad.detach()).map_err(|e| candle_core::Error::Msg(format!("the stack's backward pass: {e}")))?;
        self.slot.lock().expect("gradient slot lock").extend(grads.params);
        let dcontext = grads.context.filter(|_| self.has_context).map(|g| g.to_dtype(context.dtype())).transpose()?;
        Ok((Some(dx), dcontext, Some(anchor.zeros_like()?)))
    }
}

/// A zero scalar of `dtype` on the CPU.
fn cpu_zero(dtype: DType) -> candle_core::Result<CpuStorage> {
    candle_core::cpu_backend::CpuDevice.zeros_impl(&Shape::from(()), dtype)
}

/// A zero scalar of `dtype` on the GPU of `storage`.
#[cfg(feature = "cuda")]
fn cuda_zero(storage: &candle_core::CudaStorage, dtype: DType) -> candle_core::Result<candle_core::CudaStorage> {
    storage.device().zeros_impl(&Shape::from(()), dtype)
}

/// An anchor on one parameter.
struct Leaf(Slot);

impl CustomOp1 for Leaf {
    fn name(&self) -> &'static str {
        "parameter-anchor"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((cpu_zero(s.dtype())?, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda_zero(s, s.dtype())?, Shape::from(())))
    }

    fn bwd(&self, param: &Tensor, _res: &Tensor, _grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.0.lock().expect("gradient slot lock").remove(&param.id()))
    }
}

/// An anchor on two anchors.
struct Join;

impl CustomOp2 for Join {
    fn name(&self) -> &'static str {
        "anchor-join"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((cpu_zero(s.dtype())?, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda_zero(s, s.dtype())?, Shape::from(())))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, _grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(a.zeros_like()?), Some(b.zeros_like()?)))
    }
}
