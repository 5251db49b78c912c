//! What one forward pass needs beyond its inputs: whether dropout is on, and its seed, and
//! whether a reversible stack keeps its activations for the backward pass.

use crate::rng::derive;

/// One forward pass of a model: [`Pass::eval`] for inference, [`Pass::train`] for a training
/// step. Gradients come from candle's own `backward()` on the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    dropout_seed: Option<u64>,
    keep_activations: bool,
}

impl Pass {
    /// No dropout.
    pub fn eval() -> Self {
        Self::default()
    }

    /// Dropout on, with masks drawn from `seed` (the same seed gives the same masks).
    pub fn train(seed: u64) -> Self {
        Self { dropout_seed: Some(seed), keep_activations: false }
    }

    /// Whether a reversible stack keeps every block's activations for the backward pass
    /// (`true`) or recomputes each block there from the stack's outputs (`false`, the default
    /// and the reference's way). Keeping them skips the recomputation, a quarter of a training
    /// step's work, for a sequential stack's memory; the gradients are the same up to float
    /// rounding. Sequential stacks always keep them.
    pub fn keep_activations(self, keep: bool) -> Self {
        Self { keep_activations: keep, ..self }
    }

    /// Whether a stack (reversible or not) recomputes each block in this pass's backward pass
    /// (see [`Pass::keep_activations`]).
    pub fn recomputes(&self, reversible: bool) -> bool {
        recomputes(reversible, self.keep_activations)
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

/// The rule of [`Pass::recomputes`], for what plans or counts a pass before there is one: a
/// reversible stack recomputes its blocks unless it keeps their activations.
pub fn recomputes(reversible: bool, keep_activations: bool) -> bool {
    reversible && !keep_activations
}
