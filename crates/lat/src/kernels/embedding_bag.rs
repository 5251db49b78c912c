//! Weighted sums of table rows (`nn.EmbeddingBag(mode='sum', per_sample_weights=…)`):
//! `out[r] = Σ_s weights[r, s] · table[index[r, s]]`, without materialising the gathered rows
//! (for product-key memories: 128 rows of the table per token).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{read, slice, tensor, with_float, Elem};

/// `weights` [rows, slots], `table` [entries, dim], `index` (rows · slots entries, each below
/// `entries`) → [rows, dim].
pub fn embedding_bag(weights: &Tensor, table: &Tensor, index: &[u32]) -> Result<Tensor> {
    let (rows, slots) = weights.dims2()?;
    let (entries, _) = table.dims2()?;
    if index.len() != rows * slots || index.iter().any(|&i| i as usize >= entries) {
        candle_core::bail!("embedding bag: {} indices (each below {entries}) needed for [{rows}, {slots}] weights", rows * slots);
    }
    if super::use_fused(weights) {
        weights.contiguous()?.apply_op2(&table.contiguous()?, EmbeddingBag { index: index.to_vec() })
    } else {
        reference(weights, table, index)
    }
}

/// Plain version: gather the rows, weight them, sum.
pub fn reference(weights: &Tensor, table: &Tensor, index: &[u32]) -> Result<Tensor> {
    let (rows, slots) = weights.dims2()?;
    let d = table.dim(1)?;
    let idx = Tensor::from_slice(index, index.len(), weights.device())?;
    let gathered = table.index_select(&idx, 0)?.reshape((rows, slots, d))?;
    gathered.broadcast_mul(&weights.unsqueeze(D::Minus1)?)?.sum(1)
}

struct EmbeddingBag {
    index: Vec<u32>,
}

impl CustomOp2 for EmbeddingBag {
    fn name(&self) -> &'static str {
        "embedding-bag"
    }

    fn cpu_fwd(&self, ws: &CpuStorage, wl: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, slots) = wl.shape().dims2()?;
        let (_, d) = tl.shape().dims2()?;
        with_float!(super::dtype_of(ws), self.name(), T => {
            let (w, t) = (slice::<T>(ws, wl)?, slice::<T>(ts, tl)?);
            let mut out = vec![T::ZERO; rows * d];
            out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
                for s in 0..slots {
                    let (wt, row) = (w[r * slots + s], self.index[r * slots + s] as usize);
                    o.iter_mut().zip(&t[row * d..(row + 1) * d]).for_each(|(a, &b)| *a += wt * b);
                }
            });
            Ok((super::storage::<T>(out), Shape::from((rows, d))))
        })
    }

    fn bwd(&self, weights: &Tensor, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, slots) = weights.dims2()?;
        let (entries, d) = table.dims2()?;
        let grad = grad.contiguous()?;
        with_float!(weights.dtype(), self.name(), T => {
            let (dw, dt) = read::<T, _>(&[weights, table, &grad], |s| {
                let (w, t, g) = (s[0], s[1], s[2]);
                let mut dw = vec![T::ZERO; rows * slots];
                dw.par_chunks_mut(slots).enumerate().for_each(|(r, o)| {
                    let gr = &g[r * d..(r + 1) * d];
                    for (sl, v) in o.iter_mut().enumerate() {
                        let row = self.index[r * slots + sl] as usize;
                        *v = gr.iter().zip(&t[row * d..(row + 1) * d]).map(|(&a, &b)| a * b).sum();
                    }
                });
                // Rows are shared between tokens: accumulate serially.
                let mut dt = vec![T::ZERO; entries * d];
                for r in 0..rows {
                    let gr = &g[r * d..(r + 1) * d];
                    for sl in 0..slots {
                        let (wt, row) = (w[r * slots + sl], self.index[r * slots + sl] as usize);
                        dt[row * d..(row + 1) * d].iter_mut().zip(gr).for_each(|(a, &b)| *a += wt * b);
                    }
                }
                (dw, dt)
            })?;
            Ok((Some(tensor(dw, weights.dims())?), Some(tensor(dt, table.dims())?)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::DType;

    #[test]
    fn fused_matches_reference() {
        for dtype in [DType::F32, DType::F64] {
            let w = randn(&[5, 6], 1.0, dtype, 1);
            let t = randn(&[9, 4], 1.0, dtype, 2);
            let index: Vec<u32> = (0..30).map(|i| (i * 7 % 9) as u32).collect();
            let fused = embedding_bag(&w, &t, &index).unwrap();
            let plain = reference(&w, &t, &index).unwrap();
            assert!(rel_err(&fused, &plain) < 1e-6);
            let gf = probe(&fused, 3).backward().unwrap();
            let gp = probe(&plain, 3).backward().unwrap();
            assert!(rel_err(gf.get(&w).unwrap(), gp.get(&w).unwrap()) < 1e-6);
            assert!(rel_err(gf.get(&t).unwrap(), gp.get(&t).unwrap()) < 1e-6);
        }
        let w = randn(&[1, 2], 1.0, DType::F32, 1);
        let t = randn(&[3, 4], 1.0, DType::F32, 2);
        assert!(embedding_bag(&w, &t, &[0, 3]).is_err());
    }
}
