//! Which key/value head each query head reads. Normally every head has its own; with
//! `one_kv_head` (the reference's releases before 0.17) the local heads share one and the
//! global heads another.

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::Linear;
use crate::params::Builder;

/// The head layout of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeadLayout {
    pub heads: usize,
    pub dim_head: usize,
    /// How many of the heads (the first ones) are local.
    pub local_heads: usize,
    pub one_kv_head: bool,
}

impl HeadLayout {
    /// Width of the queries of every head.
    pub fn inner(&self) -> usize {
        self.heads * self.dim_head
    }

    /// The reference's projections of an attention layer on inputs of width `dim`: `to_q`,
    /// `to_k`, `to_v` (no bias) and `to_out` (with bias).
    pub fn projections(&self, b: &Builder, dim: usize) -> Result<[Linear; 4]> {
        let kv = self.kv_heads() * self.dim_head;
        Ok([
            Linear::new(&b.pp("to_q"), dim, self.inner(), false)?,
            Linear::new(&b.pp("to_k"), dim, kv, false)?,
            Linear::new(&b.pp("to_v"), dim, kv, false)?,
            Linear::new(&b.pp("to_out"), self.inner(), dim, true)?,
        ])
    }

    /// How many key/value heads the layer has.
    pub fn kv_heads(&self) -> usize {
        if self.one_kv_head {
            (self.local_heads > 0) as usize + (self.local_heads < self.heads) as usize
        } else {
            self.heads
        }
    }

    /// The key/value head query head `h` reads.
    pub fn kv_of(&self, h: usize) -> usize {
        match self.one_kv_head {
            true => (self.local_heads > 0 && h >= self.local_heads) as usize,
            false => h,
        }
    }

    /// The query heads of each key/value head, as (first, count), in order.
    pub fn kv_groups(&self) -> Vec<(usize, usize)> {
        (0..self.kv_heads())
            .map(|g| {
                let heads: Vec<usize> = (0..self.heads).filter(|&h| self.kv_of(h) == g).collect();
                (heads[0], heads.len())
            })
            .collect()
    }

    /// Keys or values [.., kv_heads · dim_head] as [.., heads, dim_head]: each query head's own
    /// (a view), or with shared heads each query head's shared one.
    pub fn expand(&self, t: &Tensor) -> Result<Tensor> {
        let mut shape = t.dims().to_vec();
        shape.pop();
        let rank = shape.len();
        let heads = t.reshape([shape, vec![self.kv_heads(), self.dim_head]].concat())?;
        if !self.one_kv_head {
            return Ok(heads);
        }
        let of: Vec<u32> = (0..self.heads).map(|h| self.kv_of(h) as u32).collect();
        Ok(heads.index_select(&Tensor::from_vec(of, self.heads, t.device())?, rank)?)
    }

    /// The backward pass of [`HeadLayout::expand`]: a shared head's gradient is the sum over
    /// the heads that read it. `dt` is [.., heads, dim_head]; returns [.., kv_heads · dim_head].
    pub fn reduce(&self, dt: &Tensor) -> Result<Tensor> {
        let rank = dt.rank() - 2;
        if !self.one_kv_head {
            return Ok(dt.flatten_from(rank)?);
        }
        let groups = self.kv_groups().into_iter().map(|(first, count)| dt.narrow(rank, first, count)?.sum_keepdim(rank)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&groups, rank)?.flatten_from(rank)?)
    }
}
