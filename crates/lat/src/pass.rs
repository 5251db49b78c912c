//! What one forward pass needs beyond its inputs: whether dropout is on, and its seed.

use crate::rng::derive;

/// One forward pass of a model: [`Pass::eval`] for inference, [`Pass::train`] for a training
/// step. Gradients come from candle's own `backward()` on the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    dropout_seed: Option<u64>,
}

impl Pass {
    /// No dropout.
    pub fn eval() -> Self {
        Self::default()
    }

    /// Dropout on, with masks drawn from `seed` (the same seed gives the same masks).
    pub fn train(seed: u64) -> Self {
        Self { dropout_seed: Some(seed) }
    }

    /// Whether this is a training pass.
    pub fn is_training(&self) -> bool {
        self.dropout_seed.is_some()
    }

    /// The dropout seed of site `site` of layer pair `pair`, or None when dropout is off.
    pub(crate) fn dropout(&self, pair: usize, site: u64) -> Option<u64> {
        self.dropout_seed.map(|s| derive(derive(s, pair as u64), site))
    }
}
