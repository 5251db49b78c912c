//! Product-key memory (Lample et al. 2019) as the reference builds it (`PKM(dim)`: 4 heads,
//! 128 keys per half, top 32), replacing the feed-forward layer of the layers in `pkm_layers`.
//!
//! Each head splits its query into two halves, scores each against its 128 sub-keys, keeps the
//! top 32 of each, scores the 32 × 32 combinations as sums, keeps the top 32 of those, and returns
//! the softmax-weighted sum of the chosen rows of a 16 384-row value table, summed over heads.
//!
//! Two query norms exist, as the reference's dependency versions differ (SPEC §2, §13):
//! `LayerNorm(128)` per half and head (product-key-memory 0.3.0, and fresh models here), and
//! `BatchNorm1d(1024)` over the whole query (0.1.10, the 2021 set), recognised when loading by its
//! `norm.fn.running_mean`. The batch-norm variant normalises with the running statistics in
//! evaluation and with the batch's statistics in training; it does not update the running
//! statistics.

use candle_core::{DType, Tensor, D};

use super::{Call, Layer, Mode, Step};
use crate::error::Result;
use crate::graph::Grads;
use crate::kernels::embedding_bag::embedding_bag;
use crate::nn::{LayerNorm, Linear};
use crate::params::{Builder, Init};

const HEADS: usize = 4;
const NUM_KEYS: usize = 128;
const TOP_K: usize = 32;
const DIM_HEAD: usize = 128;

/// How the queries are normalised.
#[derive(Clone, Debug)]
pub(crate) enum QueryNorm {
    /// `LayerNorm(128)` of each half and head (product-key-memory 0.3.0).
    Layer(LayerNorm),
    /// `BatchNorm1d(1024)` of the whole query (product-key-memory 0.1.10).
    Batch {
        /// Scale, [1024].
        weight: Tensor,
        /// Shift, [1024].
        bias: Tensor,
        /// Running mean, [1024].
        running_mean: Tensor,
        /// Running variance, [1024].
        running_var: Tensor,
    },
}

/// The reference's `PKM(dim)`.
#[derive(Clone, Debug)]
pub(crate) struct ProductKeyMemory {
    /// Query projection, dim to 1024, no bias.
    pub to_queries: Linear,
    /// Query normalisation.
    pub norm: QueryNorm,
    /// [heads, num_keys, 2, dim_head].
    pub keys: Tensor,
    /// [num_keys², dim].
    pub values: Tensor,
}

/// The indices of the `k` largest values of `row`, largest first (lower index first on ties).
fn top_k(row: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

impl ProductKeyMemory {
    pub(crate) fn new(b: &Builder, dim: usize) -> Result<Self> {
        let to_queries = Linear::new(&b.pp("to_queries"), dim, 2 * HEADS * DIM_HEAD, false)?;
        let nb = b.pp("norm");
        let norm = if nb.pp("fn").loaded_shape("running_mean").is_some() {
            let f = nb.pp("fn");
            let width = 2 * HEADS * DIM_HEAD;
            f.loaded_raw("num_batches_tracked")?;
            QueryNorm::Batch {
                weight: f.get("weight", &[width], Init::Ones)?,
                bias: f.get("bias", &[width], Init::Zeros)?,
                running_mean: f.loaded_buffer("running_mean", &[width])?,
                running_var: f.loaded_buffer("running_var", &[width])?,
            }
        } else {
            QueryNorm::Layer(LayerNorm::new(&nb, DIM_HEAD)?)
        };
        Ok(Self {
            to_queries,
            norm,
            keys: b.get("keys", &[HEADS, NUM_KEYS, 2, DIM_HEAD], Init::Normal(1.0 / (DIM_HEAD as f64).sqrt()))?,
            values: b.pp("values").get("weight", &[NUM_KEYS * NUM_KEYS, dim], Init::Normal(1.0 / (dim as f64).sqrt()))?,
        })
    }

    /// `x` [batch, n, dim] → [batch, n, dim]. `training` selects batch statistics for the
    /// batch-norm variant.
    fn memory(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let (b, t, dim) = x.dims3()?;
        let bt = b * t;
        let q = self.to_queries.matmul(x)?.reshape((bt, 2 * HEADS * DIM_HEAD))?;
        let q = match &self.norm {
            QueryNorm::Layer(ln) => ln.forward(&q.reshape((bt, 2, HEADS, DIM_HEAD))?)?,
            QueryNorm::Batch { weight, bias, running_mean, running_var } => {
                let (mean, var) = if training {
                    let mean = q.mean_keepdim(0)?;
                    let var = q.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
                    (mean, var)
                } else {
                    (running_mean.unsqueeze(0)?, running_var.unsqueeze(0)?)
                };
                let normed = q.broadcast_sub(&mean)?.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                normed.broadcast_mul(weight)?.broadcast_add(bias)?.reshape((bt, 2, HEADS, DIM_HEAD))?
            }
        };
        // Scores of every sub-key: [heads, 2, bt, num_keys].
        let q = q.permute((2, 1, 0, 3))?.contiguous()?;
        let keys = self.keys.permute((0, 2, 1, 3))?.contiguous()?;
        let dots = q.matmul(&keys.t()?)?;
        let host = dots.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let top: Vec<u32> = host.chunks(NUM_KEYS).flat_map(|row| top_k(row, TOP_K)).collect();
        let top_t = Tensor::from_slice(&top, (HEADS, 2, bt, TOP_K), x.device())?;
        let scores = dots.gather(&top_t, D::Minus1)?;
        let (sx, sy) = (scores.narrow(1, 0, 1)?.squeeze(1)?, scores.narrow(1, 1, 1)?.squeeze(1)?);
        // Every pair (a, c) of the two halves' top keys: [heads, bt, 32 · 32], a-major.
        let all = sx.unsqueeze(3)?.broadcast_add(&sy.unsqueeze(2)?)?.reshape((HEADS, bt, TOP_K * TOP_K))?;
        let all_host = all.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut chosen = Vec::with_capacity(HEADS * bt * TOP_K);
        let mut memory = vec![0u32; bt * HEADS * TOP_K];
        for (row, candidates) in all_host.chunks(TOP_K * TOP_K).enumerate() {
            let (h, r) = (row / bt, row % bt);
            for (j, c) in top_k(candidates, TOP_K).into_iter().enumerate() {
                chosen.push(c);
                let (a, cc) = (c as usize / TOP_K, c as usize % TOP_K);
                let base = ((h * 2) * bt + r) * TOP_K;
                memory[(r * HEADS + h) * TOP_K + j] = top[base + a] * NUM_KEYS as u32 + top[base + bt * TOP_K + cc];
            }
        }
        let chosen = Tensor::from_vec(chosen, (HEADS, bt, TOP_K), x.device())?;
        let weights = candle_nn::ops::softmax(&all.gather(&chosen, D::Minus1)?, D::Minus1)?;
        // Per token, heads then their 32 memories, as the reference's '(b t) (h k)'.
        let weights = weights.permute((1, 0, 2))?.contiguous()?.reshape((bt, HEADS * TOP_K))?;
        Ok(embedding_bag(&weights, &self.values, &memory)?.reshape((b, t, dim))?)
    }
}

impl Layer for ProductKeyMemory {
    type Saved = std::convert::Infallible;
    type State = ();
    const HAND_WRITTEN: bool = false;

    fn forward(&self, h: &Tensor, call: &Call, _mode: Mode) -> Result<(Tensor, Option<Self::Saved>)> {
        Ok((self.memory(h, call.pass.is_training())?, None))
    }

    fn backward(&self, saved: Self::Saved, _h: &Tensor, _dy: &Tensor, _call: &Call, _grads: &mut Grads) -> Result<Tensor> {
        match saved {}
    }

    fn prefill(&self, h: &Tensor, _call: &Call, _n: usize) -> Result<(Tensor, Vec<()>)> {
        Ok((self.memory(h, false)?, vec![(); h.dim(0)?]))
    }

    fn start(&self, _call: &Call, rows: usize) -> Result<Vec<()>> {
        Ok(vec![(); rows])
    }

    fn step(&self, h: &Tensor, _states: &mut [&mut ()], _step: &Step) -> Result<Tensor> {
        // Row by row: a row's result must not depend on the others in the batch.
        let rows = (0..h.dim(0)?).map(|r| self.memory(&h.narrow(0, r, 1)?, false)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_is_sorted_and_stable() {
        assert_eq!(top_k(&[0.5, 3.0, 1.0, 3.0, -1.0], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[2.0, 1.0], 2), vec![0, 1]);
    }
}
