//! Per-row cross-entropy of logits against target ids, fused with its softmax backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{read, slice, tensor, with_float, Elem};

/// Target id that contributes no loss and no gradient.
pub const IGNORE: u32 = u32::MAX;

/// Negative log-likelihood of each row of `logits` [rows, classes] at `targets[row]`
/// (0 where the target is [`IGNORE`]). Targets must be below the number of classes.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, classes) = logits.dims2()?;
    if targets.len() != rows {
        candle_core::bail!("cross entropy: {} targets for {rows} rows", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t != IGNORE && t as usize >= classes) {
        candle_core::bail!("cross entropy: target {t} is not below the number of classes {classes}");
    }
    if super::use_fused(logits) {
        logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.to_vec() })
    } else {
        reference(logits, targets)
    }
}

/// Plain version: log-softmax and a gather.
pub fn reference(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let keep: Vec<f32> = targets.iter().map(|&t| (t != IGNORE) as u8 as f32).collect();
    let ids: Vec<u32> = targets.iter().map(|&t| if t == IGNORE { 0 } else { t }).collect();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (n, 1), logits.device())?;
    let keep = Tensor::from_vec(keep, n, logits.device())?.to_dtype(logits.dtype())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&ids, 1)?.squeeze(1)?.neg()? * keep
}

struct CrossEntropy {
    targets: Vec<u32>,
}

fn log_sum_exp<T: Elem>(row: &[T]) -> T {
    let mx = row.iter().fold(T::MASK, |a, &b| a.maxv(b));
    mx + row.iter().map(|&x| (x - mx).exp()).sum::<T>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, classes) = l.shape().dims2()?;
        with_float!(super::dtype_of(s), self.name(), T => {
            let x = slice::<T>(s, l)?;
            let loss: Vec<T> = (0..rows)
                .into_par_iter()
                .map(|r| {
                    let t = self.targets[r];
                    if t == IGNORE {
                        return T::ZERO;
                    }
                    let row = &x[r * classes..(r + 1) * classes];
                    log_sum_exp(row) - row[t as usize]
                })
                .collect();
            Ok((super::storage::<T>(loss), Shape::from(rows)))
        })
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, classes) = logits.dims2()?;
        let grad = grad.contiguous()?;
        with_float!(logits.dtype(), self.name(), T => {
            let dx = read::<T, _>(&[logits, &grad], |s| {
                let mut dx = vec![T::ZERO; s[0].len()];
                dx.par_chunks_mut(classes).enumerate().for_each(|(r, d)| {
                    let t = self.targets[r];
                    if t == IGNORE {
                        return;
                    }
                    let row = &s[0][r * classes..(r + 1) * classes];
                    let lse = log_sum_exp(row);
                    let g = s[1][r];
                    for (o, &x) in d.iter_mut().zip(row) {
                        *o = g * (x - lse).exp();
                    }
                    d[t as usize] -= g;
                });
                dx
            })?;
            Ok(Some(tensor(dx, logits.dims())?))
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
            let x = randn(&[6, 11], 3.0, dtype, 1);
            let targets = [0, 10, IGNORE, 3, 3, 7];
            let fused = cross_entropy_rows(&x, &targets).unwrap();
            let plain = reference(&x, &targets).unwrap();
            assert!(rel_err(&fused, &plain) < 1e-6);
            let gf = probe(&fused, 2).backward().unwrap();
            let gp = probe(&plain, 2).backward().unwrap();
            assert!(rel_err(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-6);
        }
    }

    #[test]
    fn out_of_range_targets_are_an_error() {
        let x = randn(&[2, 4], 1.0, DType::F32, 1);
        assert!(cross_entropy_rows(&x, &[0, 4]).is_err());
        assert!(cross_entropy_rows(&x, &[0]).is_err());
    }
}
