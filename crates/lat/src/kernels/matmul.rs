//! The layers' matrix products on the CPU (projections, feed-forward, and their backward
//! passes): `gemm`'s kernels, called as candle's `matmul` calls them, but into a fresh output
//! that is never cleared first, and with the bias (where there is one) written into the
//! output before the product is added to it. candle's `matmul` zero-fills each fresh output
//! (32 MiB for one feed-forward product at 4 k tokens of the seed model) and a bias then takes
//! a pass and a buffer of its own. f32 and f64 on the CPU, unless `LAT_KERNELS=reference` (or
//! `LAT_MATMUL=candle`, to compare the two) asks for candle's products; everything else goes to
//! candle's.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Elem, Mat, SharedOut};

/// `a · b` for 2-D tensors, differentiable like candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if takes(&[a, b]) {
        a.apply_op2(b, Product)
    } else {
        a.matmul(b)
    }
}

/// `a · b + bias`, `bias` [n] added to every row, differentiable.
pub fn matmul_bias(a: &Tensor, b: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if takes(&[a, b, bias]) && bias.dims() == [b.dim(1)?] {
        a.apply_op3(b, bias, Product)
    } else {
        a.matmul(b)?.broadcast_add(bias)
    }
}

/// Whether the tensors go through [`Product`]: 2-D matrices (and a bias) of one float type on
/// the CPU.
fn takes(ts: &[&Tensor]) -> bool {
    static CANDLE: OnceLock<bool> = OnceLock::new();
    let candle = *CANDLE.get_or_init(|| std::env::var("LAT_MATMUL").is_ok_and(|v| v == "candle"));
    let dtype = ts[0].dtype();
    !candle && super::use_fused(ts[0]) && ts.iter().all(|t| t.dtype() == dtype && t.device().is_cpu() && t.rank() <= 2) && ts[..2].iter().all(|t| t.rank() == 2)
}

struct Product;

impl Product {
    fn forward(sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout, bias: Option<(&CpuStorage, &Layout)>) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((m, k), (kb, n)) = (la.shape().dims2()?, lb.shape().dims2()?);
        if k != kb || bias.is_some_and(|(_, l)| l.dims() != [n]) {
            candle_core::bail!("matmul: shapes {:?} and {:?} do not multiply", la.dims(), lb.dims());
        }
        type Operand<'a> = (&'a CpuStorage, &'a Layout);
        fn typed<T: Elem>((m, n, k): (usize, usize, usize), a: Operand, b: Operand, bias: Option<Operand>) -> candle_core::Result<Vec<T>> {
            let bias = bias.map(|(s, l)| super::slice::<T>(s, l)).transpose()?;
            Ok(product(m, n, k, view(a.0, a.1)?, view(b.0, b.1)?, bias))
        }
        let out = match sa {
            CpuStorage::F32(_) => CpuStorage::F32(typed((m, n, k), (sa, la), (sb, lb), bias)?),
            CpuStorage::F64(_) => CpuStorage::F64(typed((m, n, k), (sa, la), (sb, lb), bias)?),
            _ => candle_core::bail!("matmul: f32 or f64 only"),
        };
        Ok((out, Shape::from((m, n))))
    }

    fn backward(a: &Tensor, b: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((matmul(g, &b.t()?)?, matmul(&a.t()?, g)?))
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(&self, sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::forward(sa, la, sb, lb, None)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = Self::backward(a, b, g)?;
        Ok((Some(da), Some(db)))
    }
}

impl CustomOp3 for Product {
    fn name(&self) -> &'static str {
        "matmul-bias"
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(&self, sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout, sc: &CpuStorage, lc: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::forward(sa, la, sb, lb, Some((sc, lc)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _bias: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = Self::backward(a, b, g)?;
        Ok((Some(da), Some(db), Some(g.sum(0)?)))
    }
}

/// The strided matrix a 2-D layout describes.
fn view<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Mat<'a, T>> {
    let (stride, start) = (l.stride(), l.start_offset());
    Ok(Mat { data: &s.as_slice::<T>()?[start..], rs: stride[0], cs: stride[1] })
}

/// Rows per task of the bias fill: a task writes at least 256 KiB.
fn fill_rows<T>(n: usize) -> usize {
    (256 * 1024 / (n * std::mem::size_of::<T>()).max(1)).max(1)
}

/// A fresh row-major `a (m x k) · b (k x n)`, plus `bias` in every row, on the threads of the
/// current rayon pool.
pub(crate) fn product<T: Elem>(m: usize, n: usize, k: usize, a: Mat<T>, b: Mat<T>, bias: Option<&[T]>) -> Vec<T> {
    let mut c = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return c;
    }
    let out = SharedOut::uninit(c.spare_capacity_mut());
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "matmul: a bias per column");
        // In parallel: the fill takes the fresh pages' faults, which one thread would serialise.
        let rows = fill_rows::<T>(n);
        (0..m.div_ceil(rows)).into_par_iter().for_each(|t| {
            for r in t * rows..((t + 1) * rows).min(m) {
                // SAFETY: row `r` lies inside the m x n output and only this task writes it.
                unsafe { out.write(r * n, bias) };
            }
        });
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the fresh output has room for m x n and aliases nothing; without a bias gemm
    // writes every element without reading it, with one it reads the bias rows just written.
    unsafe {
        super::gemm_into(m, n, k, out.at(0), n, bias.is_some(), a, b, T::ONE, parallelism);
        c.set_len(m * n);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::uniform_at;

    /// The plain product the kernel is checked against, accumulated in f64.
    fn reference(m: usize, n: usize, k: usize, a: Mat<f32>, b: Mat<f32>, bias: Option<&[f32]>) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64).sum();
                c[i * n + j] = (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        c
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| uniform_at(seed, i as u64) * 2.0 - 1.0).collect()
    }

    /// Shapes around gemm's blocking and the bias fill's tasks, both operand layouts, with
    /// and without a bias, into outputs allocated where earlier outputs left other values.
    #[test]
    fn matches_the_plain_product() {
        let shapes = [(1, 1, 1), (5, 15, 3), (6, 16, 256), (7, 17, 257), (145, 33, 300), (300, 50, 513), (13, 200, 40), (4000, 70, 20)];
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            let seed = s as u64 * 10;
            let (a_rows, a_cols) = (random(m * k, seed), random(m * k, seed + 1));
            let (b_rows, b_cols) = (random(k * n, seed + 2), random(k * n, seed + 3));
            let bias = random(n, seed + 4);
            let layouts = [(Mat::rows(&a_rows, k), Mat::rows(&b_rows, n)), (Mat::rows(&a_cols, m).t(), Mat::rows(&b_cols, k).t())];
            for (a, b) in layouts {
                for bias in [None, Some(bias.as_slice())] {
                    drop(vec![f32::NAN; m * n]);
                    let (fast, plain) = (product(m, n, k, a, b, bias), reference(m, n, k, a, b, bias));
                    let tol = 1e-5 * (k as f32).sqrt();
                    for (i, (x, y)) in fast.iter().zip(&plain).enumerate() {
                        assert!((x - y).abs() <= tol, "{m}x{n}x{k} at {i}: {x} vs {y}");
                    }
                }
            }
        }
        assert!(product::<f32>(3, 4, 0, Mat::rows(&[], 0), Mat::rows(&[], 4), None).iter().all(|&v| v == 0.0));
        assert_eq!(product::<f32>(2, 3, 0, Mat::rows(&[], 0), Mat::rows(&[], 3), Some(&[1.0, 2.0, 3.0])), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        assert!(product::<f32>(0, 3, 2, Mat::rows(&[], 2), Mat::rows(&[0.0; 6], 3), None).is_empty());
    }

    /// The tensor ops forward and backward against candle's, on a transposed operand as the
    /// layers pass their weights, in f32 and f64; other tensors go to candle's.
    #[test]
    fn tensor_ops_match_candles() -> candle_core::Result<()> {
        let (m, n, k) = (150, 40, 70);
        let dev = candle_core::Device::Cpu;
        for dtype in [candle_core::DType::F32, candle_core::DType::F64] {
            let var = |len: usize, seed: u64, shape: &[usize]| -> candle_core::Result<candle_core::Var> {
                candle_core::Var::from_tensor(&Tensor::from_vec(random(len, seed), shape, &dev)?.to_dtype(dtype)?)
            };
            let (x, w, c) = (var(m * k, 1, &[m, k])?, var(n * k, 2, &[n, k])?, var(n, 4, &[n])?);
            let g = Tensor::from_vec(random(m * n, 3), (m, n), &dev)?.to_dtype(dtype)?;
            let pairs = [
                (x.apply_op2(&w.t()?, Product)?, x.matmul(&w.t()?)?),
                (x.apply_op3(&w.t()?, &c, Product)?, x.matmul(&w.t()?)?.broadcast_add(&c)?),
                (matmul_bias(&x, &w.t()?, &c)?, x.matmul(&w.t()?)?.broadcast_add(&c)?),
            ];
            let gap = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> { a.sub(b)?.abs()?.max_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>() };
            for (ours, theirs) in pairs {
                assert!(gap(&ours, &theirs)? < 1e-4);
                let (go, gt) = ((&ours * &g)?.sum_all()?.backward()?, (&theirs * &g)?.sum_all()?.backward()?);
                for v in [&x, &w, &c] {
                    match (go.get(v), gt.get(v)) {
                        (Some(o), Some(t)) => assert!(gap(o, t)? < 1e-3),
                        (o, t) => assert_eq!(o.is_some(), t.is_some()),
                    }
                }
            }
        }
        // Batched (3-D) products are candle's.
        let a = Tensor::from_vec(random(24, 5), (2, 3, 4), &dev)?;
        let b = Tensor::from_vec(random(40, 6), (2, 4, 5), &dev)?;
        assert_eq!(matmul(&a, &b)?.to_vec3::<f32>()?, a.matmul(&b)?.to_vec3::<f32>()?);
        Ok(())
    }
}
