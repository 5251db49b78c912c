//! Non-causal linear attention (Shen et al., "Efficient Attention"):
//!
//! ```text
//! q̂ = softmax(q over features) / sqrt(e)     k̂ = softmax(k over positions)
//! out = q̂ (k̂ᵀ v)
//! ```
//!
//! Masked keys are filled with the most negative float before the softmax and masked values
//! with zero, as in the reference. Keys and values may come from a context of another length.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{gemm, grads_by_task, outputs_by_task, slice, softmax_rows, softmax_rows_backward, with_float, Elem, Heads, Mat};

/// `q`: [batch, n, heads, e]; `k`: [batch, m, heads, e]; `v`: [batch, m, heads, ev];
/// `kv_mask`: [batch, m], nonzero = keep. Returns [batch, n, heads, ev].
pub fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, kv_mask: Option<&Tensor>) -> Result<Tensor> {
    let ((b, n, h, e), (m, ev)) = (q.dims4()?, (k.dim(1)?, v.dim(3)?));
    let on_gpu = super::use_gpu(q) && (super::gpu::Linear { b, n, m, h, e, ev }).supported();
    if super::use_fused(q) || on_gpu {
        let keep = kv_mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Linear { keep })
    } else {
        reference(q, k, v, kv_mask)
    }
}

/// The fused forward without graph, for hand-written backward passes.
pub(crate) fn forward_detached(q: &Tensor, k: &Tensor, v: &Tensor, kv_mask: Option<&Tensor>) -> Result<Tensor> {
    let keep = kv_mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Linear { keep })
}

/// The fused backward: (dq, dk, dv).
pub(crate) fn backward(q: &Tensor, k: &Tensor, v: &Tensor, dout: &Tensor, kv_mask: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    let keep = kv_mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    match (Linear { keep }).bwd(&q, &k, &v, dout, dout)? {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => candle_core::bail!("linear attention: incomplete backward"),
    }
}

/// Plain tensor-op version.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, kv_mask: Option<&Tensor>) -> Result<Tensor> {
    let e = q.dim(3)?;
    let q = q.transpose(1, 2)?.contiguous()?;
    let mut k = k.transpose(1, 2)?.contiguous()?;
    let mut v = v.transpose(1, 2)?.contiguous()?;
    if let Some(m) = kv_mask {
        let (b, len) = m.dims2()?;
        let keep = m.to_dtype(DType::U8)?.reshape((b, 1, len, 1))?;
        let fill = super::most_negative(q.dtype(), q.device())?;
        k = keep.broadcast_as(k.shape())?.where_cond(&k, &fill.broadcast_as(k.shape())?)?;
        v = v.broadcast_mul(&keep.to_dtype(v.dtype())?)?;
    }
    let qh = (candle_nn::ops::softmax(&q, D::Minus1)? * (e as f64).powf(-0.5))?;
    let kh = candle_nn::ops::softmax(&k, 2)?;
    let context = kh.t()?.matmul(&v)?;
    qh.matmul(&context)?.transpose(1, 2)
}

struct Linear {
    keep: Option<Vec<u8>>,
}

pub(crate) struct Task<T> {
    qh: Vec<T>,
    kh: Vec<T>,
    v: Vec<T>,
    context: Vec<T>,
    e: usize,
    ev: usize,
}

impl<T: Elem> Task<T> {
    #[allow(clippy::too_many_arguments)]
    fn load(q: &[T], k: &[T], v: &[T], qs: Heads, ks: Heads, vs: Heads, t: usize, keep: Option<&[u8]>) -> Self {
        let (e, ev, m) = (qs.e, vs.e, ks.n);
        let mut qh = vec![T::ZERO; qs.n * e];
        let mut kh = vec![T::ZERO; m * e];
        let mut vv = vec![T::ZERO; m * ev];
        qs.gather(q, t, &mut qh);
        ks.gather(k, t, &mut kh);
        vs.gather(v, t, &mut vv);
        Self::new(qh, kh, vv, keep.map(|mk| &mk[(t / qs.h) * m..(t / qs.h + 1) * m]), e, ev)
    }

    /// A task from the raw rows of one head (q: n x e, k: m x e, v: m x ev) and its key mask.
    pub(crate) fn new(mut qh: Vec<T>, mut kh: Vec<T>, mut vv: Vec<T>, keep: Option<&[u8]>, e: usize, ev: usize) -> Self {
        softmax_rows(&mut qh, e, T::of((e as f64).powf(-0.5)));
        let m = kh.len() / e.max(1);
        if let Some(mk) = keep {
            for (j, &kj) in mk.iter().enumerate() {
                if kj == 0 {
                    kh[j * e..(j + 1) * e].fill(T::MASK);
                    vv[j * ev..(j + 1) * ev].fill(T::ZERO);
                }
            }
        }
        // Softmax of each feature column over the positions.
        let mut mx = vec![T::MASK; e];
        for row in kh.chunks(e) {
            mx.iter_mut().zip(row).for_each(|(a, &b)| *a = a.maxv(b));
        }
        let mut sum = vec![T::ZERO; e];
        for row in kh.chunks_mut(e) {
            for ((x, &mv), s) in row.iter_mut().zip(&mx).zip(sum.iter_mut()) {
                *x = (*x - mv).exp();
                *s += *x;
            }
        }
        for row in kh.chunks_mut(e) {
            row.iter_mut().zip(&sum).for_each(|(x, &s)| *x /= s);
        }
        let mut context = vec![T::ZERO; e * ev];
        gemm(e, ev, m, &mut context, ev, false, Mat::rows(&kh, e).t(), Mat::rows(&vv, ev), T::ONE);
        Self { qh, kh, v: vv, context, e, ev }
    }

    /// The output rows (n x ev).
    pub(crate) fn forward(&self) -> Vec<T> {
        let n = self.qh.len() / self.e.max(1);
        let mut o = vec![T::ZERO; n * self.ev];
        gemm(n, self.ev, self.e, &mut o, self.ev, false, Mat::rows(&self.qh, self.e), Mat::rows(&self.context, self.ev), T::ONE);
        o
    }

    /// Gradients of the raw q, k and v for output gradient `g` (n x ev); masked keys get none.
    pub(crate) fn backward(&self, g: &[T], keep: Option<&[u8]>) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (e, ev) = (self.e, self.ev);
        let (n, m) = (self.qh.len() / e.max(1), self.kh.len() / e.max(1));
        let mut dcontext = vec![T::ZERO; e * ev];
        gemm(e, ev, n, &mut dcontext, ev, false, Mat::rows(&self.qh, e).t(), Mat::rows(g, ev), T::ONE);
        let mut gq = vec![T::ZERO; n * e];
        gemm(n, e, ev, &mut gq, e, false, Mat::rows(g, ev), Mat::rows(&self.context, ev).t(), T::ONE);
        softmax_rows_backward(&self.qh, &mut gq, e, T::of((e as f64).powf(-0.5)));
        let mut gv = vec![T::ZERO; m * ev];
        gemm(m, ev, e, &mut gv, ev, false, Mat::rows(&self.kh, e), Mat::rows(&dcontext, ev), T::ONE);
        let mut gk = vec![T::ZERO; m * e];
        gemm(m, e, ev, &mut gk, e, false, Mat::rows(&self.v, ev), Mat::rows(&dcontext, ev).t(), T::ONE);
        // Column-softmax backward over the positions.
        let mut dots = vec![T::ZERO; e];
        for (kr, gr) in self.kh.chunks(e).zip(gk.chunks(e)) {
            dots.iter_mut().zip(kr.iter().zip(gr)).for_each(|(d, (&a, &b))| *d += a * b);
        }
        for (kr, gr) in self.kh.chunks(e).zip(gk.chunks_mut(e)) {
            for ((g, &p), &d) in gr.iter_mut().zip(kr).zip(&dots) {
                *g = p * (*g - d);
            }
        }
        if let Some(mk) = keep {
            for (j, &kj) in mk.iter().enumerate() {
                if kj == 0 {
                    gk[j * e..(j + 1) * e].fill(T::ZERO);
                    gv[j * ev..(j + 1) * ev].fill(T::ZERO);
                }
            }
        }
        (gq, gk, gv)
    }
}

/// The recurrent form of non-causal linear attention over a fixed context, for one (batch row,
/// key/value head): the context's whole contribution is `softmax_positions(k)ᵀ v`, an e x ev
/// summary, so a decoder's cross-attention costs O(e·ev) per query whatever the context's
/// length.
#[derive(Clone, Debug)]
pub struct ContextSummary {
    e: usize,
    ev: usize,
    context: Vec<f32>,
}

impl ContextSummary {
    /// The summary of keys `k` (m x e) and values `v` (m x ev); `keep` (m, nonzero = keep)
    /// leaves masked positions out.
    pub fn new(k: &[f32], v: &[f32], keep: Option<&[u8]>, e: usize, ev: usize) -> Self {
        Self { e, ev, context: Task::new(vec![], k.to_vec(), v.to_vec(), keep, e, ev).context }
    }

    /// One output row (ev) per query row (e) of `queries`.
    pub fn query(&self, queries: &[f32], out: &mut [f32]) {
        let mut qh = queries.to_vec();
        softmax_rows(&mut qh, self.e, (self.e as f32).powf(-0.5));
        let n = qh.len() / self.e.max(1);
        out.fill(0.0);
        gemm(n, self.ev, self.e, out, self.ev, false, Mat::rows(&qh, self.e), Mat::rows(&self.context, self.ev), 1.0);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.context.len() * 4
    }
}

impl Linear {
    fn shapes(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<(Heads, Heads, Heads)> {
        let (qs, ks, vs) = (Heads::of(ql.dims(), "q")?, Heads::of(kl.dims(), "k")?, Heads::of(vl.dims(), "v")?);
        if (ks.b, ks.h, ks.e) != (qs.b, qs.h, qs.e) || (vs.b, vs.n, vs.h) != (ks.b, ks.n, ks.h) {
            candle_core::bail!("linear attention: shapes {:?} {:?} {:?} do not agree", ql.dims(), kl.dims(), vl.dims());
        }
        if let Some(m) = &self.keep {
            if m.len() != ks.b * ks.n {
                candle_core::bail!("linear attention: mask has {} entries, expected {}", m.len(), ks.b * ks.n);
            }
        }
        Ok((qs, ks, vs))
    }

    #[cfg(feature = "cuda")]
    fn gpu_dims(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<super::gpu::Linear> {
        let (qs, ks, vs) = self.shapes(ql, kl, vl)?;
        Ok(super::gpu::Linear { b: qs.b, n: qs.n, m: ks.n, h: qs.h, e: qs.e, ev: vs.e })
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear-attention"
    }

    fn cpu_fwd(&self, qs_: &CpuStorage, ql: &Layout, ks_: &CpuStorage, kl: &Layout, vs_: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (qs, ks, vs) = self.shapes(ql, kl, vl)?;
        let os = Heads { n: qs.n, e: vs.e, stride: qs.h * vs.e, ..qs };
        with_float!(super::dtype_of(qs_), self.name(), T => {
            let (q, k, v) = (slice::<T>(qs_, ql)?, slice::<T>(ks_, kl)?, slice::<T>(vs_, vl)?);
            let out = outputs_by_task(os, 0, |t, _| Task::load(q, k, v, qs, ks, vs, t, self.keep.as_deref()).forward());
            Ok((super::storage::<T>(out), Shape::from((os.b, os.n, os.h, os.e))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, q: &candle_core::CudaStorage, ql: &Layout, k: &candle_core::CudaStorage, kl: &Layout, v: &candle_core::CudaStorage, vl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.gpu_dims(ql, kl, vl)?;
        let (out, _) = super::gpu::cuda::forward(self.name(), [(q, ql), (k, kl), (v, vl)], self.keep.as_deref(), |gpu, elem, [q, k, v, keep]| d.forward(gpu, elem, q, k, v, keep))?;
        Ok((out, Shape::from((d.b, d.n, d.h, d.ev))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let dims = self.gpu_dims(q.layout(), k.layout(), v.layout())?;
            return super::gpu::cuda::backward(self.name(), [q, k, v], &[grad], self.keep.as_deref(), |gpu, elem, [q, k, v, keep], x| dims.backward(gpu, elem, q, k, v, keep, x[0]));
        }
        let (qs, ks, vs) = self.shapes(q.layout(), k.layout(), v.layout())?;
        let os = Heads { n: qs.n, e: vs.e, stride: qs.h * vs.e, ..qs };
        let grad = grad.contiguous()?;
        let (ev, m) = (vs.e, ks.n);
        with_float!(q.dtype(), self.name(), T => grads_by_task::<T>([q, k, v], [qs, ks, vs], &[&grad], |s, t| {
            let keep = self.keep.as_deref().map(|mk| &mk[(t / qs.h) * m..(t / qs.h + 1) * m]);
            let mut g = vec![T::ZERO; os.n * ev];
            os.gather(s[3], t, &mut g);
            Task::load(s[0], s[1], s[2], qs, ks, vs, t, self.keep.as_deref()).backward(&g, keep)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    fn run_case(n: usize, m: usize, mask: Option<Vec<u8>>, dtype: DType) {
        let (b, h, e, ev) = (2, 3, 8, 5);
        let q = randn(&[b, n, h, e], 1.0, dtype, 1);
        let k = randn(&[b, m, h, e], 2.0, dtype, 2);
        let v = randn(&[b, m, h, ev], 1.0, dtype, 3);
        let mask = mask.map(|mk| Tensor::from_vec(mk, (b, m), &Device::Cpu).unwrap());
        let fused = linear_attention(&q, &k, &v, mask.as_ref()).unwrap();
        let plain = reference(&q, &k, &v, mask.as_ref()).unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        assert!(rel_err(&fused, &plain) < tol, "forward {}", rel_err(&fused, &plain));
        let gf = probe(&fused, 4).backward().unwrap();
        let gp = probe(&plain, 4).backward().unwrap();
        for x in [&q, &k, &v] {
            let err = rel_err(gf.get(x).unwrap(), gp.get(x).unwrap());
            assert!(err < tol * 20.0, "gradient {err}");
        }
    }

    #[test]
    fn fused_matches_reference() {
        for dtype in [DType::F32, DType::F64] {
            run_case(9, 9, None, dtype);
            run_case(7, 13, None, dtype);
            run_case(10, 10, Some((0..20).map(|i| (i % 4 != 1) as u8).collect()), dtype);
            // One batch row entirely masked: uniform key weights over zeroed values.
            run_case(6, 6, Some((0..12).map(|i| (i < 6) as u8).collect()), dtype);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (b, n, h, e) = (1, 6, 2, 4);
        let q = randn(&[b, n, h, e], 1.0, DType::F64, 21);
        let k = randn(&[b, n, h, e], 1.0, DType::F64, 22);
        let v = randn(&[b, n, h, e], 1.0, DType::F64, 23);
        let mask = Tensor::from_vec(vec![1u8, 1, 0, 1, 1, 0], (1, n), &Device::Cpu).unwrap();
        let run = || linear_attention(&q, &k, &v, Some(&mask)).unwrap();
        let g = probe(&run(), 24).backward().unwrap();
        let f = || probe(&run(), 24).to_scalar::<f64>().unwrap();
        for x in [&q, &k, &v] {
            check_fd(x, g.get(x).unwrap(), &f, 10, 1e-6);
        }
    }

    #[test]
    fn context_summary_answers_like_the_full_attention() {
        let (n, m, e, ev) = (5, 9, 8, 6);
        let q = randn(&[1, n, 1, e], 1.0, DType::F32, 31);
        let k = randn(&[1, m, 1, e], 2.0, DType::F32, 32);
        let v = randn(&[1, m, 1, ev], 1.0, DType::F32, 33);
        let keep: Vec<u8> = (0..m).map(|j| (j % 3 != 1) as u8).collect();
        let mask = Tensor::from_vec(keep.clone(), (1, m), &Device::Cpu).unwrap();
        let plain = reference(&q, &k, &v, Some(&mask)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rows = |t: &candle_core::Var| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let summary = ContextSummary::new(&rows(&k), &rows(&v), Some(&keep), e, ev);
        let mut out = vec![0f32; n * ev];
        summary.query(&rows(&q), &mut out);
        let worst = out.iter().zip(&plain).fold(0f32, |w, (a, b)| w.max((a - b).abs()));
        assert!(worst < 1e-5, "max abs difference {worst}");
    }
}
