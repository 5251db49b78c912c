//! The position-wise feed-forward layer: `w2(dropout(gelu(w1 x)))`, or with GLU
//! `w2(dropout(gelu(a) * v))` where `[a, v] = w1 x`.

use candle_core::{Tensor, D};

use super::{positional_mask, Linear};
use crate::error::Result;
use crate::kernels::gelu::bias_gelu;
use crate::params::Builder;
use crate::rng::derive;

/// At most this many positions (over the batch) per chunk of hidden activations.
pub const CHUNK_ROWS: usize = 2048;

#[derive(Clone, Debug)]
/// The reference's `FeedForward`, inside `Chunk`.
pub struct FeedForward {
    /// First layer: dim to 4 · dim (8 · dim with GLU).
    pub w1: Linear,
    /// Second layer: 4 · dim to dim.
    pub w2: Linear,
    /// Gated linear unit: `gelu(a) * v` of the two halves of w1's output.
    pub glu: bool,
    /// Dropout on the hidden activations.
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

    /// The (start, length) of each chunk of a sequence of `n` in a batch of `b`: `torch.chunk`'s
    /// pieces (ceil(n / ff_chunks), possibly fewer of them), further cut so that a chunk holds
    /// at most [`CHUNK_ROWS`] positions of the batch, which bounds the hidden activations alive
    /// at a time. The result does not depend on the chunking.
    pub fn chunk_ranges(&self, b: usize, n: usize) -> Vec<(usize, usize)> {
        let by_rows = (b * n).div_ceil(CHUNK_ROWS);
        let size = n.div_ceil(self.chunks.max(by_rows).max(1)).max(1);
        (0..n).step_by(size).map(|s| (s, size.min(n - s))).collect()
    }

    /// The dropout mask of the hidden activations `h` [batch, len, hidden] of the chunk at
    /// `start` of a sequence of `n`: drawn by position, so the same whatever the chunking.
    pub fn chunk_mask(&self, h: &Tensor, start: usize, n: usize, seed: Option<u64>) -> Result<Option<Tensor>> {
        let (b, len, w) = h.dims3()?;
        let Some(seed) = seed.filter(|_| self.dropout > 0.0) else { return Ok(None) };
        let index = |bi: usize, t: usize| ((bi * n + start + t) * w) as u64;
        Ok(Some(positional_mask(b, len, w, self.dropout, &|bi, t| derive(seed, index(bi, t)), h)?))
    }

    /// `x`: [batch, n, dim].
    pub fn forward(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let ranges = self.chunk_ranges(b, n);
        if ranges.len() == 1 {
            return self.forward_chunk(x, 0, n, seed);
        }
        let parts = ranges.into_iter().map(|(s, len)| self.forward_chunk(&x.narrow(1, s, len)?, s, n, seed)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn forward_chunk(&self, x: &Tensor, start: usize, n: usize, seed: Option<u64>) -> Result<Tensor> {
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
        let h = match self.chunk_mask(&h, start, n, seed)? {
            Some(m) => (h * m)?,
            None => h,
        };
        self.w2.forward(&h)
    }
}
