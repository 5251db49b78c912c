//! What one forward pass needs beyond its inputs: whether dropout is on (and its seed), and
//! where reversible layers leave the parameter gradients that their recomputing backward pass
//! produces outside candle's graph.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

use crate::error::Result;
use crate::rng::derive;

/// One forward pass of a model. Use [`Pass::eval`] for inference and [`Pass::train`] for a
/// training step, then [`Pass::backward`] for the gradients.
#[derive(Clone, Debug, Default)]
pub struct Pass {
    dropout_seed: Option<u64>,
    deferred: Arc<Mutex<HashMap<TensorId, (Tensor, Tensor)>>>,
}

impl Pass {
    /// No dropout.
    pub fn eval() -> Self {
        Self::default()
    }

    /// Dropout on, with masks drawn from `seed` (the same seed gives the same masks).
    pub fn train(seed: u64) -> Self {
        Self { dropout_seed: Some(seed), ..Self::default() }
    }

    /// Whether this is a training pass.
    pub fn is_training(&self) -> bool {
        self.dropout_seed.is_some()
    }

    /// The dropout seed of site `site` of layer pair `pair`, or None when dropout is off.
    pub(crate) fn dropout(&self, pair: usize, site: u64) -> Option<u64> {
        self.dropout_seed.map(|s| derive(derive(s, pair as u64), site))
    }

    /// Gradients of `loss` with respect to every variable that contributed to it, including the
    /// parameters of reversible layers.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        for (_, (param, g)) in self.deferred.lock().expect("gradient store poisoned").drain() {
            let total = match grads.remove(&param) {
                Some(other) => (other + g)?,
                None => g,
            };
            grads.insert(&param, total);
        }
        Ok(grads)
    }

    /// The deferred gradient of `param` so far.
    #[cfg(test)]
    pub(crate) fn deferred(&self, param: &Tensor) -> Option<Tensor> {
        self.deferred.lock().expect("gradient store poisoned").get(&param.id()).map(|(_, g)| g.clone())
    }

    /// Adds `g` to the deferred gradient of `param`.
    pub(crate) fn defer(&self, param: &Tensor, g: Tensor) -> Result<()> {
        let mut map = self.deferred.lock().expect("gradient store poisoned");
        match map.remove(&param.id()) {
            Some((p, acc)) => map.insert(param.id(), (p, (acc + g)?)),
            None => map.insert(param.id(), (param.clone(), g)),
        };
        Ok(())
    }
}
