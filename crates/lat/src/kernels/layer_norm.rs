//! Layer normalisation over the last dimension, with affine weight and bias.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{read, slice, sum_lanes, tensor, vectorized, with_float, Elem};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension of `x`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::use_fused(x) {
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps })
    } else {
        reference(x, weight, bias, eps)
    }
}

/// The fused forward without graph, for hand-written backward passes.
pub(crate) fn forward_detached(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &LayerNorm { eps })
}

/// The fused backward: (dx, dweight, dbias).
pub(crate) fn backward(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match (LayerNorm { eps }).bwd(&x, &w, &w, &x, dy)? {
        (Some(dx), Some(dw), Some(db)) => Ok((dx, dw, db)),
        _ => candle_core::bail!("layer-norm: incomplete backward"),
    }
}

/// Plain tensor-op version.
pub fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(weight)?.broadcast_add(bias)
}

struct LayerNorm {
    eps: f64,
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// The row's mean and 1 / sqrt(var + eps).
#[inline(always)]
fn stats<T: Elem>(row: &[T], eps: f64) -> (T, T) {
    let d = T::of(row.len() as f64);
    let mean = sum_lanes(row, row, |v, _| v) / d;
    let var = sum_lanes(row, row, |v, _| (v - mean) * (v - mean)) / d;
    (mean, T::ONE / (var + T::of(eps)).sqrt())
}

fn forward<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::ZERO; x.len()];
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(yc, xc)| normalize_rows(yc, xc, w, b, eps));
    y
}

vectorized! {
    /// `y = (x - mean) / std · w + b` for rows of x as long as w.
    fn normalize_rows<T: Elem>(y: &mut [T], x: &[T], w: &[T], b: &[T], eps: f64) {
        let d = w.len();
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            let (mean, rstd) = stats(xr, eps);
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
}

/// Returns (dx, dweight, dbias).
fn backward_rows<T: Elem>(x: &[T], w: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len();
    let mut dx = vec![T::ZERO; x.len()];
    let chunk = rows_per_task(d) * d;
    let zeros = || (vec![T::ZERO; d], vec![T::ZERO; d]);
    let (dw, db) = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .fold(zeros, |(mut dw, mut db), (dxc, (xc, gc))| {
            backward_part(dxc, xc, gc, w, &mut dw, &mut db, eps);
            (dw, db)
        })
        .reduce(zeros, |(mut a, mut b), (c, e)| {
            a.iter_mut().zip(&c).for_each(|(u, &v)| *u += v);
            b.iter_mut().zip(&e).for_each(|(u, &v)| *u += v);
            (a, b)
        });
    (dx, dw, db)
}

vectorized! {
    /// The rows of one task of [`backward_rows`]: their dx, and their sums into dw and db.
    fn backward_part<T: Elem>(dx: &mut [T], x: &[T], dy: &[T], w: &[T], dw: &mut [T], db: &mut [T], eps: f64) {
        let d = w.len();
        let inv_d = T::ONE / T::of(d as f64);
        for ((dxr, xr), gr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
            let (mean, rstd) = stats(xr, eps);
            // dxr holds g = dy · w, then dx.
            for i in 0..d {
                dxr[i] = gr[i] * w[i];
                let xhat = (xr[i] - mean) * rstd;
                dw[i] += gr[i] * xhat;
                db[i] += gr[i];
            }
            let sum_g = sum_lanes(dxr, xr, |g, _| g);
            let sum_gx = sum_lanes(dxr, xr, |g, x| g * ((x - mean) * rstd));
            for i in 0..d {
                let xhat = (xr[i] - mean) * rstd;
                dxr[i] = rstd * (dxr[i] - (sum_g + xhat * sum_gx) * inv_d);
            }
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&0);
        if wl.dims() != [d] || bl.dims() != [d] {
            candle_core::bail!("layer-norm: weight and bias must be [{d}], got {:?} and {:?}", wl.dims(), bl.dims());
        }
        with_float!(super::dtype_of(xs), self.name(), T => {
            let y = forward::<T>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?, self.eps);
            Ok((super::storage::<T>(y), xl.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        with_float!(x.dtype(), self.name(), T => {
            let (dx, dw, db) = read::<T, _>(&[x, w, &dy], |s| backward_rows(s[0], s[1], s[2], self.eps))?;
            Ok((Some(tensor(dx, x.dims())?), Some(tensor(dw, w.dims())?), Some(tensor(db, w.dims())?)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::DType;

    #[test]
    fn the_vector_form_gives_the_same_bits() {
        let v = |n: usize, s: u64| randn(&[n], 3.0, DType::F32, s).as_tensor().to_vec1::<f32>().unwrap();
        let (x, w, b) = (v(37 * 70, 11), v(70, 12), v(70, 13));
        let run = || {
            let mut y = vec![0f32; x.len()];
            normalize_rows(&mut y, &x, &w, &b, 1e-5);
            y
        };
        assert_eq!(run(), plain(run));
        let dy = v(x.len(), 14);
        let back = || {
            let (mut dx, mut dw, mut db) = (vec![0f32; x.len()], vec![0f32; 70], vec![0f32; 70]);
            backward_part(&mut dx, &x, &dy, &w, &mut dw, &mut db, 1e-5);
            (dx, dw, db)
        };
        assert_eq!(back(), plain(back));
    }

    #[test]
    fn fused_matches_reference_forward_and_backward() {
        for dtype in [DType::F32, DType::F64] {
            let x = randn(&[3, 5, 24], 2.0, dtype, 1);
            let w = randn(&[24], 1.0, dtype, 2);
            let b = randn(&[24], 1.0, dtype, 3);
            let fused = layer_norm(&x, &w, &b, 1e-5).unwrap();
            let plain = reference(&x, &w, &b, 1e-5).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            assert!(rel_err(&fused, &plain) < tol);
            let gf = probe(&fused, 9).backward().unwrap();
            let gp = probe(&plain, 9).backward().unwrap();
            for v in [&x, &w, &b] {
                let e = rel_err(gf.get(v).unwrap(), gp.get(v).unwrap());
                assert!(e < tol * 10.0, "{dtype:?}: gradient error {e}");
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = randn(&[2, 3, 8], 1.5, DType::F64, 4);
        let w = randn(&[8], 1.0, DType::F64, 5);
        let b = randn(&[8], 1.0, DType::F64, 6);
        let f = || probe(&layer_norm(&x, &w, &b, 1e-5).unwrap(), 7).to_scalar::<f64>().unwrap();
        let g = probe(&layer_norm(&x, &w, &b, 1e-5).unwrap(), 7).backward().unwrap();
        check_fd(&x, g.get(&x).unwrap(), &f, 12, 1e-5);
        check_fd(&w, g.get(&w).unwrap(), &f, 8, 1e-5);
    }
}
