//! Exact (erf) GELU fused with the bias add of the linear layer before it.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{read, slice, tensor, vectorized, with_float, Elem};

/// `gelu(x + bias)` with the exact GELU `0.5 z (1 + erf(z / sqrt 2))`; `bias` spans the last
/// dimension of `x`.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if super::use_fused(x) {
        x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu)
    } else {
        reference(x, bias)
    }
}

/// The fused forward without graph, for hand-written backward passes.
pub(crate) fn forward_detached(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&bias.contiguous()?, &BiasGelu)
}

/// The fused backward: (dx, dbias).
pub(crate) fn backward(x: &Tensor, bias: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (x, b) = (x.contiguous()?, bias.contiguous()?);
    match BiasGelu.bwd(&x, &b, &x, dy)? {
        (Some(dx), Some(db)) => Ok((dx, db)),
        _ => candle_core::bail!("bias-gelu: incomplete backward"),
    }
}

/// Plain tensor-op version. (Written with `erf` rather than candle's `gelu_erf`, whose
/// backward uses a six-digit constant.)
pub fn reference(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let z = x.broadcast_add(bias)?;
    (&z * 0.5)? * ((&z * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?
}

struct BiasGelu;

const CHUNK: usize = 1 << 14;

vectorized! {
    /// `y = gelu(x + b)` for rows of x as long as b.
    pub(crate) fn gelu_rows<T: Elem>(y: &mut [T], x: &[T], b: &[T]) {
        let d = b.len();
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            for i in 0..d {
                yr[i] = gelu(xr[i] + b[i]);
            }
        }
    }
}

#[inline(always)]
fn gelu<T: Elem>(z: T) -> T {
    T::of(0.5) * z * (T::ONE + (z * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

#[inline]
fn gelu_grad<T: Elem>(z: T) -> T {
    let cdf = T::of(0.5) * (T::ONE + (z * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (T::of(-0.5) * z * z).exp() * T::of(0.398_942_280_401_432_7);
    cdf + z * pdf
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&0);
        if bl.dims() != [d] {
            candle_core::bail!("bias-gelu: bias must be [{d}], got {:?}", bl.dims());
        }
        with_float!(super::dtype_of(xs), self.name(), T => {
            let (x, b) = (slice::<T>(xs, xl)?, slice::<T>(bs, bl)?);
            let mut y = vec![T::ZERO; x.len()];
            let chunk = CHUNK.div_ceil(d.max(1)) * d.max(1);
            y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(yc, xc)| gelu_rows(yc, xc, b));
            Ok((super::storage::<T>(y), xl.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let d = b.elem_count();
        with_float!(x.dtype(), self.name(), T => {
            let (dx, db) = read::<T, _>(&[x, b, &dy], |s| {
                let (x, b, g) = (s[0], s[1], s[2]);
                let mut dx = vec![T::ZERO; x.len()];
                let chunk = CHUNK.div_ceil(d.max(1)) * d.max(1);
                let db = dx
                    .par_chunks_mut(chunk)
                    .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                    .fold(|| vec![T::ZERO; d], |mut db, (dxc, (xc, gc))| {
                        for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                            for i in 0..d {
                                dxr[i] = gr[i] * gelu_grad(xr[i] + b[i]);
                                db[i] += dxr[i];
                            }
                        }
                        db
                    })
                    .reduce(|| vec![T::ZERO; d], |mut a, c| {
                        a.iter_mut().zip(&c).for_each(|(u, &v)| *u += v);
                        a
                    });
                (dx, db)
            })?;
            Ok((Some(tensor(dx, x.dims())?), Some(tensor(db, b.dims())?)))
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
        let (x, b) = (v(37 * 70, 11), v(70, 12));
        let run = || {
            let mut y = vec![0f32; x.len()];
            gelu_rows(&mut y, &x, &b);
            y
        };
        assert_eq!(run(), plain(run));
    }

    #[test]
    fn fused_matches_reference_forward_and_backward() {
        for dtype in [DType::F32, DType::F64] {
            let x = randn(&[4, 7, 33], 2.0, dtype, 1);
            let b = randn(&[33], 1.0, dtype, 2);
            let fused = bias_gelu(&x, &b).unwrap();
            let plain = reference(&x, &b).unwrap();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
            assert!(rel_err(&fused, &plain) < tol);
            let gf = probe(&fused, 3).backward().unwrap();
            let gp = probe(&plain, 3).backward().unwrap();
            assert!(rel_err(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < tol * 10.0);
            assert!(rel_err(gf.get(&b).unwrap(), gp.get(&b).unwrap()) < tol * 10.0);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = randn(&[3, 10], 2.0, DType::F64, 4);
        let b = randn(&[10], 1.0, DType::F64, 5);
        let f = || probe(&bias_gelu(&x, &b).unwrap(), 6).to_scalar::<f64>().unwrap();
        let g = probe(&bias_gelu(&x, &b).unwrap(), 6).backward().unwrap();
        check_fd(&x, g.get(&x).unwrap(), &f, 12, 1e-6);
        check_fd(&b, g.get(&b).unwrap(), &f, 6, 1e-6);
    }
}
