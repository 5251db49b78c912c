//! The position-wise feed-forward layer: `w2(dropout(gelu(w1 x)))`, or with GLU
//! `w2(dropout(gelu(a) * v))` where `[a, v] = w1 x`.

use candle_core::{Tensor, D};

use super::{dropout, Linear};
use crate::error::Result;
use crate::kernels::gelu::bias_gelu;
use crate::params::Builder;
use crate::rng::derive;

#[derive(Clone, Debug)]
pub struct FeedForward {
    pub w1: Linear,
    pub w2: Linear,
    pub glu: bool,
    pub dropout: f64,
    /// Evaluated in this many pieces along the sequence (`Chunk` in the reference): the same
    /// result with a smaller peak of hidden activations.
    pub chunks: usize,
}

impl FeedForward {
    pub(crate) fn new(b: &Builder, dim: usize, mult: usize, glu: bool, dropout: f64, chunks: usize) -> Result<Self> {
        let hidden = dim * mult;
        // The reference builds its main feed-forward layers without GLU whatever ff_glu says;
        // its checkpoints are recognised by the shape of w1 and keep that layout.
        let glu = glu && b.pp("w1").loaded_shape("weight") != Some(vec![hidden, dim]);
        Ok(Self {
            w1: Linear::new(&b.pp("w1"), dim, hidden * if glu { 2 } else { 1 }, true)?,
            w2: Linear::new(&b.pp("w2"), hidden, dim, true)?,
            glu,
            dropout,
            chunks,
        })
    }

    /// `x`: [batch, n, dim].
    pub fn forward(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let n = x.dim(1)?;
        if self.chunks <= 1 || n <= 1 {
            return self.forward_chunk(x, seed);
        }
        // torch.chunk: pieces of ceil(n / chunks), possibly fewer of them.
        let size = n.div_ceil(self.chunks);
        let parts = (0..n)
            .step_by(size)
            .enumerate()
            .map(|(i, s)| self.forward_chunk(&x.narrow(1, s, size.min(n - s))?, seed.map(|sd| derive(sd, i as u64))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn forward_chunk(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let b1 = self.w1.bias.as_ref().expect("w1 has a bias");
        let pre = self.w1.matmul(x)?;
        let h = if self.glu {
            let half = pre.dim(D::Minus1)? / 2;
            let gate = bias_gelu(&pre.narrow(D::Minus1, 0, half)?, &b1.narrow(0, 0, half)?)?;
            let value = pre.narrow(D::Minus1, half, half)?.broadcast_add(&b1.narrow(0, half, half)?)?;
            (gate * value)?
        } else {
            bias_gelu(&pre, b1)?
        };
        self.w2.forward(&dropout(&h, self.dropout, seed)?)
    }
}
