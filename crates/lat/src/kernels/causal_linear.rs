//! Causal linear attention (Katharopoulos et al. with the reference's feature maps and
//! blind-spot buckets), in chunked form.
//!
//! For query `i` with `q̂ = softmax(q_i) / sqrt(e)` and `k̂_j = exp(k_j)`:
//!
//! ```text
//! out_i = Σ_{j ∈ V(i)} (q̂_i · k̂_j) v_j / max(Σ_{j ∈ V(i)} q̂_i · k̂_j, 1e-3)
//! V(i)  = { j ≤ i }                         bucket = 1
//!       = { j : j / bucket < i / bucket }   bucket > 1 (whole earlier buckets only)
//! ```
//!
//! The fused kernel walks the sequence in chunks of at most 64 positions (a multiple of the
//! bucket), carrying `S = Σ k̂ vᵀ` and `z = Σ k̂` across chunks: O(n·e²) time, O(n·e) memory, and
//! only two numbers per position (the query's scale and its denominator) kept for the backward
//! pass, which recomputes the states. Every exponential is taken relative to a running maximum
//! of the keys (never below 0), and each query works at the scale of the largest key it sees,
//! with the clamp rescaled to match: the result is the same as the reference's wherever that is
//! finite, and stays finite and accurate where the reference overflows.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{exp_f32, gemm, grads_by_task, outputs_by_task, prefetch_lines, slice, softmax_f32, softmax_rows, softmax_rows_backward, task_saved, vectorized, with_float, Elem, Heads, LineVec, Mat};

/// The reference's clamp on the denominator (0.19.1).
pub const EPS: f64 = 1e-3;

/// Causal linear attention. `q`, `k`: [batch, n, heads, e]; `v`: [batch, n, heads, ev];
/// `mask`: [batch, n], nonzero = keep. `n` must be a multiple of `bucket`.
pub fn causal_linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, bucket: usize) -> Result<Tensor> {
    let (b, n, h, ev) = v.dims4()?;
    if bucket == 0 || n % bucket != 0 {
        candle_core::bail!("causal linear attention: length {n} is not a multiple of the bucket size {bucket}");
    }
    let e = q.dim(3)?;
    let on_gpu = super::use_gpu(q) && (super::gpu::Causal { b, n, h, e, ev, bucket }).supported();
    if super::use_fused(q) || on_gpu {
        let keep = mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
        let op = CausalLinear { bucket, keep };
        let flat = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
        flat.narrow(0, 0, b * n * h * ev)?.reshape((b, n, h, ev))
    } else {
        reference(q, k, v, mask, bucket)
    }
}

/// Whether query `i` sees key `j` (positions relative to a bucket-aligned origin).
#[inline]
fn visible(i: usize, j: usize, bucket: usize) -> bool {
    if bucket == 1 {
        j <= i
    } else {
        j / bucket < i / bucket
    }
}

/// Plain version: the quadratic form above with an explicit visibility matrix.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, bucket: usize) -> Result<Tensor> {
    let (b, n, _, e) = q.dims4()?;
    let q = q.transpose(1, 2)?.contiguous()?;
    let qh = (candle_nn::ops::softmax(&q, D::Minus1)? * (e as f64).powf(-0.5))?;
    let mut kh = k.transpose(1, 2)?.exp()?;
    let mut v = v.transpose(1, 2)?;
    if let Some(m) = mask {
        let keep = m.to_dtype(q.dtype())?.reshape((b, 1, n, 1))?;
        kh = kh.broadcast_mul(&keep)?;
        v = v.broadcast_mul(&keep)?;
    }
    let vis: Vec<f32> = (0..n * n).map(|x| visible(x / n, x % n, bucket) as u8 as f32).collect();
    let vis = Tensor::from_vec(vis, (n, n), q.device())?.to_dtype(q.dtype())?;
    let a = qh.matmul(&kh.contiguous()?.t()?)?.broadcast_mul(&vis)?;
    let num = a.matmul(&v.contiguous()?)?;
    let den = a.sum_keepdim(D::Minus1)?.maximum(EPS)?;
    num.broadcast_div(&den)?.transpose(1, 2)
}

struct CausalLinear {
    bucket: usize,
    keep: Option<Vec<u8>>,
}

/// Chunk length: a multiple of the bucket, about 64 positions.
fn chunk_len(bucket: usize) -> usize {
    if bucket >= 64 {
        bucket
    } else {
        bucket * (64 / bucket)
    }
}

/// Above this spread of scales inside one chunk, pair weights are exponentiated one by one.
const SPREAD: f64 = 60.0;

/// One (batch, head) task's inputs as contiguous rows, with the scales that keep every
/// exponential in range: `p[j]`, the running maximum of the kept keys up to `j` (never below 0),
/// and `s[i]`, the largest key query `i` sees. Key `j` is stored as `exp(k_j - p[j])`; query `i`
/// works at scale `exp(-s[i])`; a visible pair is reweighted by `exp(p[j] - s[i]) <= 1`.
pub(crate) struct Task<'a, T> {
    qh: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    keep: Option<&'a [u8]>,
    p: Vec<T>,
    s: Vec<T>,
    n: usize,
    e: usize,
    ev: usize,
    bucket: usize,
}

impl<'a, T: Elem> Task<'a, T> {
    #[allow(clippy::too_many_arguments)]
    fn load(q: &[T], k: &[T], v: &[T], qs: Heads, vs: Heads, t: usize, bucket: usize, keep: Option<&'a [u8]>) -> Self {
        let (n, e, ev) = (qs.n, qs.e, vs.e);
        let mut qq = vec![T::ZERO; n * e];
        let mut kk = vec![T::ZERO; n * e];
        let mut vv = vec![T::ZERO; n * ev];
        qs.gather(q, t, &mut qq);
        qs.gather(k, t, &mut kk);
        vs.gather(v, t, &mut vv);
        Self::new(qq, kk, vv, keep.map(|m| &m[(t / qs.h) * n..(t / qs.h + 1) * n]), e, ev, bucket)
    }

    /// A task from the raw rows of one head (q and k: n x e, v: n x ev) and its row of the mask.
    pub(crate) fn new(mut qh: Vec<T>, kk: Vec<T>, mut vv: Vec<T>, keep: Option<&'a [u8]>, e: usize, ev: usize, bucket: usize) -> Self {
        let n = kk.len() / e.max(1);
        softmax_rows(&mut qh, e, T::of((e as f64).powf(-0.5)));
        let kept = |j: usize| keep.is_none_or(|m| m[j] != 0);
        let mut p = vec![T::ZERO; n];
        let mut run = T::ZERO;
        for j in 0..n {
            if kept(j) {
                run = kk[j * e..(j + 1) * e].iter().fold(run, |a, &b| a.maxv(b));
            } else {
                vv[j * ev..(j + 1) * ev].fill(T::ZERO);
            }
            p[j] = run;
        }
        let s = (0..n)
            .map(|i| match bucket {
                1 => p[i],
                _ if i < bucket => T::ZERO,
                _ => p[i / bucket * bucket - 1],
            })
            .collect();
        Self { qh, k: kk, v: vv, keep, p, s, n, e, ev, bucket }
    }

    fn kept(&self, j: usize) -> bool {
        self.keep.is_none_or(|m| m[j] != 0)
    }

    /// Whether queries see keys of their own chunk (not when a chunk is a single bucket).
    fn intra(&self) -> bool {
        self.bucket < chunk_len(self.bucket)
    }

    /// The clamp of the denominator at query `i`'s scale.
    fn floor(&self, i: usize) -> T {
        (T::of(EPS) * (-self.s[i]).exp()).maxv(T::MIN_POSITIVE)
    }

    /// kt[j] = exp(k_j - p[j]) for rows [s0, s0 + c), zero for masked keys.
    fn exp_keys(&self, s0: usize, c: usize, kt: &mut [T]) {
        let e = self.e;
        for j in 0..c {
            let dst = &mut kt[j * e..(j + 1) * e];
            if self.kept(s0 + j) {
                let pj = self.p[s0 + j];
                for (d, &x) in dst.iter_mut().zip(&self.k[(s0 + j) * e..(s0 + j + 1) * e]) {
                    *d = (x - pj).exp();
                }
            } else {
                dst.fill(T::ZERO);
            }
        }
    }

    /// Rescales kt rows from their own scale p[j] to the chunk's final scale m.
    fn to_scale(&self, s0: usize, c: usize, m: T, kt: &mut [T]) {
        for j in 0..c {
            let f = (self.p[s0 + j] - m).exp();
            kt[j * self.e..(j + 1) * self.e].iter_mut().for_each(|x| *x *= f);
        }
    }

    /// w[i][j] = exp(p[j] - s[i]) on visible pairs of the chunk, 0 elsewhere (row stride cmax).
    fn weights(&self, s0: usize, c: usize, w: &mut [T], cmax: usize) {
        let lo = self.s[s0];
        let factored = (self.p[s0 + c - 1] - lo) <= T::of(SPREAD);
        let u: Vec<T> = (0..c).map(|j| (self.p[s0 + j] - lo).exp()).collect();
        for i in 0..c {
            let vi = (lo - self.s[s0 + i]).exp();
            for j in 0..c {
                w[i * cmax + j] = match (visible(i, j, self.bucket), factored) {
                    (false, _) => T::ZERO,
                    (true, true) => u[j] * vi,
                    (true, false) => (self.p[s0 + j] - self.s[s0 + i]).exp(),
                };
            }
        }
    }

    /// Folds the chunk's keys `kt` (exponentiated, scaled in place to the chunk's last
    /// position) and values `vc` into the running sums `s_state` (e x ev) and `z` (e), first
    /// moving them from scale `m_prev` to that position's; returns the new scale.
    #[allow(clippy::too_many_arguments)]
    fn fold_chunk(&self, s0: usize, c: usize, m_prev: T, kt: &mut [T], vc: &[T], s_state: &mut [T], z: &mut [T]) -> T {
        let (e, ev) = (self.e, self.ev);
        let m = self.p[s0 + c - 1];
        let f = (m_prev - m).exp();
        s_state.iter_mut().chain(z.iter_mut()).for_each(|x| *x *= f);
        self.to_scale(s0, c, m, kt);
        gemm(e, ev, c, s_state, ev, true, Mat::rows(kt, e).t(), Mat::rows(vc, ev), T::ONE);
        for j in 0..c {
            z.iter_mut().zip(&kt[j * e..(j + 1) * e]).for_each(|(a, &b)| *a += b);
        }
        m
    }

    /// a = (q̂ ktᵀ) ∘ w over the chunk (row stride cmax).
    fn scores(&self, s0: usize, c: usize, kt: &[T], w: &[T], a: &mut [T], cmax: usize) {
        let e = self.e;
        gemm(c, c, e, a, cmax, false, Mat::rows(&self.qh[s0 * e..(s0 + c) * e], e), Mat::rows(kt, e).t(), T::ONE);
        for i in 0..c {
            for j in 0..c {
                a[i * cmax + j] *= w[i * cmax + j];
            }
        }
    }

    /// Writes out (n x ev) and stats (n x 2: the query scale s and the unclamped denominator).
    pub(crate) fn forward(&self, out: &mut [T], stats: &mut [T]) {
        let (n, e, ev) = (self.n, self.e, self.ev);
        let cmax = chunk_len(self.bucket);
        let mut s_state = vec![T::ZERO; e * ev];
        let mut z = vec![T::ZERO; e];
        let mut m_prev = T::ZERO;
        let mut kt = vec![T::ZERO; cmax * e];
        let mut w = vec![T::ZERO; cmax * cmax];
        let mut a = vec![T::ZERO; cmax * cmax];
        let mut den = vec![T::ZERO; cmax];
        for s0 in (0..n).step_by(cmax) {
            let c = cmax.min(n - s0);
            self.exp_keys(s0, c, &mut kt);
            let qc = &self.qh[s0 * e..(s0 + c) * e];
            let vc = &self.v[s0 * ev..(s0 + c) * ev];
            let oc = &mut out[s0 * ev..(s0 + c) * ev];
            gemm(c, ev, e, oc, ev, false, Mat::rows(qc, e), Mat::rows(&s_state, ev), T::ONE);
            for i in 0..c {
                let f = (m_prev - self.s[s0 + i]).exp();
                den[i] = f * qc[i * e..(i + 1) * e].iter().zip(&z).map(|(&x, &y)| x * y).sum::<T>();
                oc[i * ev..(i + 1) * ev].iter_mut().for_each(|x| *x *= f);
            }
            if self.intra() {
                self.weights(s0, c, &mut w, cmax);
                self.scores(s0, c, &kt, &w, &mut a, cmax);
                for i in 0..c {
                    den[i] += a[i * cmax..i * cmax + c].iter().copied().sum::<T>();
                }
                gemm(c, ev, c, oc, ev, true, Mat { data: &a, rs: cmax, cs: 1 }, Mat::rows(vc, ev), T::ONE);
            }
            for i in 0..c {
                let inv = T::ONE / den[i].maxv(self.floor(s0 + i));
                oc[i * ev..(i + 1) * ev].iter_mut().for_each(|x| *x *= inv);
                stats[(s0 + i) * 2] = self.s[s0 + i];
                stats[(s0 + i) * 2 + 1] = den[i];
            }
            m_prev = self.fold_chunk(s0, c, m_prev, &mut kt, vc, &mut s_state, &mut z);
        }
    }

    /// Gradients with respect to q (before the feature map), k and v.
    pub(crate) fn backward(&self, g: &[T], out: &[T], stats: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (n, e, ev) = (self.n, self.e, self.ev);
        let cmax = chunk_len(self.bucket);
        // Gradients with respect to the numerator (per output row) and the denominator, both at
        // the query's scale.
        let mut gn = vec![T::ZERO; n * ev];
        let mut gd = vec![T::ZERO; n];
        for i in 0..n {
            let den = stats[i * 2 + 1];
            let floor = self.floor(i);
            let dp = den.maxv(floor);
            let (gi, oi) = (&g[i * ev..(i + 1) * ev], &out[i * ev..(i + 1) * ev]);
            gn[i * ev..(i + 1) * ev].iter_mut().zip(gi).for_each(|(x, &y)| *x = y / dp);
            if den > floor {
                gd[i] = -gi.iter().zip(oi).map(|(&x, &y)| x * y).sum::<T>() / dp;
            }
        }
        let mut dq = vec![T::ZERO; n * e];
        let mut dk = vec![T::ZERO; n * e];
        let mut dv = vec![T::ZERO; n * ev];
        let mut kt = vec![T::ZERO; cmax * e];
        let mut w = vec![T::ZERO; cmax * cmax];
        let mut a = vec![T::ZERO; cmax * cmax];
        let mut da = vec![T::ZERO; cmax * cmax];
        let mut dkt = vec![T::ZERO; cmax * e];

        // Forward scan: query gradients, and everything that stays inside one chunk.
        let mut s_state = vec![T::ZERO; e * ev];
        let mut z = vec![T::ZERO; e];
        let mut m_prev = T::ZERO;
        for s0 in (0..n).step_by(cmax) {
            let c = cmax.min(n - s0);
            self.exp_keys(s0, c, &mut kt);
            let (qc, vc) = (&self.qh[s0 * e..(s0 + c) * e], &self.v[s0 * ev..(s0 + c) * ev]);
            let (gnc, gdc) = (&gn[s0 * ev..(s0 + c) * ev], &gd[s0..s0 + c]);
            let dqc = &mut dq[s0 * e..(s0 + c) * e];
            gemm(c, e, ev, dqc, e, false, Mat::rows(gnc, ev), Mat::rows(&s_state, ev).t(), T::ONE);
            for i in 0..c {
                let f = (m_prev - self.s[s0 + i]).exp();
                dqc[i * e..(i + 1) * e].iter_mut().zip(&z).for_each(|(x, &y)| *x = (*x + gdc[i] * y) * f);
            }
            if self.intra() {
                self.weights(s0, c, &mut w, cmax);
                self.scores(s0, c, &kt, &w, &mut a, cmax);
                gemm(c, c, ev, &mut da, cmax, false, Mat::rows(gnc, ev), Mat::rows(vc, ev).t(), T::ONE);
                for i in 0..c {
                    for j in 0..c {
                        da[i * cmax + j] = (da[i * cmax + j] + gdc[i]) * w[i * cmax + j];
                    }
                }
                let (a_m, da_m) = (Mat { data: &a, rs: cmax, cs: 1 }, Mat { data: &da, rs: cmax, cs: 1 });
                gemm(c, e, c, dqc, e, true, da_m, Mat::rows(&kt, e), T::ONE);
                gemm(c, ev, c, &mut dv[s0 * ev..(s0 + c) * ev], ev, true, a_m.t(), Mat::rows(gnc, ev), T::ONE);
                gemm(c, e, c, &mut dkt, e, false, da_m.t(), Mat::rows(qc, e), T::ONE);
                for (x, (&y, &k)) in dk[s0 * e..(s0 + c) * e].iter_mut().zip(dkt.iter().zip(&kt[..c * e])) {
                    *x += y * k;
                }
            }
            m_prev = self.fold_chunk(s0, c, m_prev, &mut kt, vc, &mut s_state, &mut z);
        }

        // Reverse scan: key and value gradients from the queries of later chunks, carried as
        // R = Σ exp(m - s_i) q̂_i gn_iᵀ and r = Σ exp(m - s_i) gd_i q̂_i at the scale m of the
        // chunk being visited.
        let mut r_state = vec![T::ZERO; e * ev];
        let mut r = vec![T::ZERO; e];
        let mut gs = vec![T::ZERO; cmax * ev];
        let starts: Vec<usize> = (0..n).step_by(cmax).collect();
        for &s0 in starts.iter().rev() {
            let c = cmax.min(n - s0);
            let m = self.p[s0 + c - 1];
            self.exp_keys(s0, c, &mut kt);
            self.to_scale(s0, c, m, &mut kt);
            let (qc, vc) = (&self.qh[s0 * e..(s0 + c) * e], &self.v[s0 * ev..(s0 + c) * ev]);
            gemm(c, ev, e, &mut dv[s0 * ev..(s0 + c) * ev], ev, true, Mat::rows(&kt, e), Mat::rows(&r_state, ev), T::ONE);
            gemm(c, e, ev, &mut dkt, e, false, Mat::rows(vc, ev), Mat::rows(&r_state, ev).t(), T::ONE);
            for j in 0..c {
                let row = &mut dk[(s0 + j) * e..(s0 + j + 1) * e];
                for d in 0..e {
                    row[d] += (dkt[j * e + d] + r[d]) * kt[j * e + d];
                }
            }
            // Move to the scale of the previous chunk, adding this chunk's queries.
            let m_before = if s0 == 0 { T::ZERO } else { self.p[s0 - 1] };
            let f = (m_before - m).exp();
            r_state.iter_mut().chain(r.iter_mut()).for_each(|x| *x *= f);
            for i in 0..c {
                let fi = (m_before - self.s[s0 + i]).exp();
                let gi = &gn[(s0 + i) * ev..(s0 + i + 1) * ev];
                gs[i * ev..(i + 1) * ev].iter_mut().zip(gi).for_each(|(x, &y)| *x = y * fi);
                let gdi = gd[s0 + i] * fi;
                r.iter_mut().zip(&qc[i * e..(i + 1) * e]).for_each(|(x, &y)| *x += gdi * y);
            }
            gemm(e, ev, c, &mut r_state, ev, true, Mat::rows(qc, e).t(), Mat::rows(&gs, ev), T::ONE);
        }
        // Masked values were zeroed before use: their gradient is zero.
        if let Some(keep) = self.keep {
            for (j, &kj) in keep.iter().enumerate() {
                if kj == 0 {
                    dv[j * ev..(j + 1) * ev].fill(T::ZERO);
                }
            }
        }
        softmax_rows_backward(&self.qh, &mut dq, e, T::of((e as f64).powf(-0.5)));
        (dq, dk, dv)
    }
}

impl CausalLinear {
    fn shapes(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<(Heads, Heads)> {
        let (qs, ks, vs) = (Heads::of(ql.dims(), "q")?, Heads::of(kl.dims(), "k")?, Heads::of(vl.dims(), "v")?);
        if ql.dims() != kl.dims() || (vs.b, vs.n, vs.h) != (qs.b, qs.n, qs.h) {
            candle_core::bail!("causal linear attention: shapes {:?} {:?} {:?} do not agree", ql.dims(), kl.dims(), vl.dims());
        }
        if let Some(m) = &self.keep {
            if m.len() != qs.b * qs.n {
                candle_core::bail!("causal linear attention: mask has {} entries, expected {}", m.len(), qs.b * qs.n);
            }
        }
        let _ = ks;
        Ok((qs, vs))
    }

    #[cfg(feature = "cuda")]
    fn gpu_dims(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<super::gpu::Causal> {
        let (qs, vs) = self.shapes(ql, kl, vl)?;
        Ok(super::gpu::Causal { b: qs.b, n: qs.n, h: qs.h, e: qs.e, ev: vs.e, bucket: self.bucket })
    }
}

impl CustomOp3 for CausalLinear {
    fn name(&self) -> &'static str {
        "causal-linear-attention"
    }

    fn cpu_fwd(&self, qs_: &CpuStorage, ql: &Layout, ks_: &CpuStorage, kl: &Layout, vs_: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (qs, vs) = self.shapes(ql, kl, vl)?;
        with_float!(super::dtype_of(qs_), self.name(), T => {
            let (q, k, v) = (slice::<T>(qs_, ql)?, slice::<T>(ks_, kl)?, slice::<T>(vs_, vl)?);
            // Each task's output, then two statistics of each of its rows.
            let flat = outputs_by_task(vs, qs.n * 2, |t, stats| {
                let mut out = vec![T::ZERO; vs.n * vs.e];
                Task::load(q, k, v, qs, vs, t, self.bucket, self.keep.as_deref()).forward(&mut out, stats);
                out
            });
            let len = flat.len();
            Ok((super::storage::<T>(flat), Shape::from(len)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, q: &candle_core::CudaStorage, ql: &Layout, k: &candle_core::CudaStorage, kl: &Layout, v: &candle_core::CudaStorage, vl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.gpu_dims(ql, kl, vl)?;
        super::gpu::cuda::forward(self.name(), [(q, ql), (k, kl), (v, vl)], self.keep.as_deref(), |gpu, elem, [q, k, v, keep]| dims.forward(gpu, elem, q, k, v, keep))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let dims = self.gpu_dims(q.layout(), k.layout(), v.layout())?;
            return super::gpu::cuda::backward(self.name(), [q, k, v], &[res, grad], self.keep.as_deref(), |gpu, elem, [q, k, v, keep], x| dims.backward(gpu, elem, q, k, v, keep, x[0], x[1]));
        }
        let (qs, vs) = self.shapes(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        with_float!(q.dtype(), self.name(), T => grads_by_task::<T>([q, k, v], [qs, qs, vs], &[res, &grad], |s, t| {
            let (g, out, stats) = task_saved(s[4], s[3], vs, qs.n * 2, t);
            Task::load(s[0], s[1], s[2], qs, vs, t, self.bucket, self.keep.as_deref()).backward(&g, &out, stats)
        }))
    }
}

/// The recurrent form of causal linear attention for one (batch row, head): the running sums
/// `S = Σ exp(k - m) vᵀ` and `z = Σ exp(k - m)` over the keys folded so far, at the scale `m`
/// of their largest value (never below 0), plus the keys of the current incomplete bucket,
/// which are folded in only once the bucket is complete. Each step costs O(e·ev) whatever the
/// length of the context, with the same numerics as the chunked kernel.
#[derive(Clone, Debug)]
pub struct LinearState {
    e: usize,
    ev: usize,
    bucket: usize,
    /// [e, ev], each row starting a cache line where ev is a multiple of 16.
    s: LineVec<f32>,
    z: Vec<f32>,
    m: f32,
    pending_k: Vec<f32>,
    pending_v: Vec<f32>,
}

impl LinearState {
    /// An empty state for heads of width `e`, values of width `ev` and blind-spot `bucket`.
    pub fn new(e: usize, ev: usize, bucket: usize) -> Self {
        let bucket = bucket.max(1);
        // The pending keys of a bucket never need more room than this.
        let (pending_k, pending_v) = if bucket == 1 { (vec![], vec![]) } else { (Vec::with_capacity(bucket * e), Vec::with_capacity(bucket * ev)) };
        Self { e, ev, bucket, s: LineVec::zeroed(e * ev), z: vec![0.0; e], m: 0.0, pending_k, pending_v }
    }

    /// The most bytes a state holds: the sums, and the keys and values of an incomplete bucket.
    pub fn max_bytes(e: usize, ev: usize, bucket: usize) -> usize {
        let pending = if bucket > 1 { bucket * (e + ev) } else { 0 };
        (e * ev + e + pending) * 4
    }

    /// The state after the keys `k` (n x e) and values `v` (n x ev) of a prompt: complete
    /// buckets folded in one pass, the rest pending.
    pub fn from_prefix(k: &[f32], v: &[f32], e: usize, ev: usize, bucket: usize) -> Self {
        let mut st = Self::new(e, ev, bucket);
        let n = k.len() / e.max(1);
        let full = if st.bucket == 1 { n } else { n / st.bucket * st.bucket };
        st.m = k[..full * e].iter().fold(0f32, |a, &b| a.max(b));
        let kt: Vec<f32> = k[..full * e].iter().map(|&x| (x - st.m).exp()).collect();
        gemm(e, ev, full, &mut st.s, ev, false, Mat::rows(&kt, e).t(), Mat::rows(&v[..full * ev], ev), 1.0);
        for row in kt.chunks(e.max(1)) {
            st.z.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
        }
        st.pending_k.extend_from_slice(&k[full * e..]);
        st.pending_v.extend_from_slice(&v[full * ev..]);
        st
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.s.capacity() + self.z.capacity() + self.pending_k.capacity() + self.pending_v.capacity()) * 4
    }

    fn fold(&mut self, k: &[f32], v: &[f32]) {
        fold(self, k, v);
    }

    fn query(&self, queries: &[f32], out: &mut [f32]) {
        for (q, o) in queries.chunks(self.e).zip(out.chunks_mut(self.ev)) {
            query_one(self, q, o);
        }
    }

    /// Attends from one new position with the queries `queries` (one row of e per head that
    /// shares this state), key `k` and value `v`; writes one output row per query.
    pub fn step(&mut self, queries: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        if self.bucket == 1 {
            self.fold(k, v);
            self.query(queries, out);
        } else {
            self.query(queries, out);
            self.pending_k.extend_from_slice(k);
            self.pending_v.extend_from_slice(v);
            if self.pending_k.len() == self.bucket * self.e {
                let (mut pk, mut pv) = (std::mem::take(&mut self.pending_k), std::mem::take(&mut self.pending_v));
                for (kr, vr) in pk.chunks(self.e).zip(pv.chunks(self.ev)) {
                    self.fold(kr, vr);
                }
                // The buffers keep their room for the next bucket.
                pk.clear();
                pv.clear();
                (self.pending_k, self.pending_v) = (pk, pv);
            }
        }
    }
}

vectorized! {
    /// Folds one key and value into the running sums.
    fn fold(st: &mut LinearState, k: &[f32], v: &[f32]) {
        let mk = k.iter().fold(st.m, |a, &b| a.max(b));
        if mk > st.m {
            let f = exp_f32(st.m - mk);
            st.s.iter_mut().chain(st.z.iter_mut()).for_each(|x| *x *= f);
            st.m = mk;
        }
        // The key's weights first, in one vector pass.
        let mut w = vec![0f32; k.len()];
        for (w, &kd) in w.iter_mut().zip(k) {
            *w = exp_f32(kd - st.m);
        }
        for (d, &w) in w.iter().enumerate() {
            st.z[d] += w;
            st.s[d * st.ev..(d + 1) * st.ev].iter_mut().zip(v).for_each(|(a, &b)| *a += w * b);
        }
    }
}

/// Rows of the sums a query asks for ahead of reading them.
const AHEAD: usize = 16;

vectorized! {
    /// One query against the running sums.
    fn query_one(st: &LinearState, q: &[f32], out: &mut [f32]) {
        let mut qh = q.to_vec();
        softmax_f32(&mut qh, (st.e as f32).powf(-0.5));
        out.fill(0.0);
        let mut den = 0.0;
        for (d, &qd) in qh.iter().enumerate() {
            prefetch_lines(&st.s, (d + AHEAD) * st.ev, st.ev);
            den += qd * st.z[d];
            out.iter_mut().zip(&st.s[d * st.ev..(d + 1) * st.ev]).for_each(|(o, &x)| *o += qd * x);
        }
        let floor = ((EPS as f32) * (-st.m).exp()).max(f32::MIN_POSITIVE);
        let inv = 1.0 / den.max(floor);
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    fn mask(b: usize, n: usize) -> Tensor {
        let m: Vec<u8> = (0..b * n).map(|i| (i % 7 != 3 && i % n < n - 2) as u8).collect();
        Tensor::from_vec(m, (b, n), &Device::Cpu).unwrap()
    }

    fn compare(bucket: usize, n: usize, masked: bool, dtype: DType, kscale: f64) {
        let (b, h, e, ev) = (2, 3, 8, 6);
        let q = randn(&[b, n, h, e], 1.0, dtype, 1);
        let k = randn(&[b, n, h, e], kscale, dtype, 2);
        let v = randn(&[b, n, h, ev], 1.0, dtype, 3);
        let m = masked.then(|| mask(b, n));
        let fused = causal_linear_attention(&q, &k, &v, m.as_ref(), bucket).unwrap();
        let plain = reference(&q, &k, &v, m.as_ref(), bucket).unwrap();
        let tol = if dtype == DType::F32 { 2e-5 } else { 1e-11 };
        let err = rel_err(&fused, &plain);
        assert!(err < tol, "bucket {bucket} n {n} masked {masked}: forward error {err}");
        let gf = probe(&fused, 4).backward().unwrap();
        let gp = probe(&plain, 4).backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let err = rel_err(gf.get(x).unwrap(), gp.get(x).unwrap());
            assert!(err < tol * 20.0, "bucket {bucket} n {n} masked {masked}: d{name} error {err}");
        }
    }

    #[test]
    fn fused_matches_reference() {
        for dtype in [DType::F32, DType::F64] {
            for (bucket, n) in [(1, 5), (1, 130), (4, 136), (8, 64), (64, 192), (96, 192), (3, 129)] {
                compare(bucket, n, false, dtype, 1.0);
                compare(bucket, n, true, dtype, 1.0);
            }
        }
    }

    #[test]
    fn large_keys_rescale_without_changing_results() {
        // Keys up to about 40 make exp(k) about 1e17: finite in f64, so the plain version is a
        // fair judge there, while the running maximum rescales several times along the sequence.
        compare(1, 200, true, DType::F64, 12.0);
        compare(4, 200, false, DType::F64, 12.0);
    }

    #[test]
    fn huge_keys_stay_finite() {
        let (b, n, h, e) = (1, 256, 2, 8);
        let q = randn(&[b, n, h, e], 1.0, DType::F32, 1);
        let k = (randn(&[b, n, h, e], 1.0, DType::F32, 2).as_tensor() * 300.0).unwrap();
        let v = randn(&[b, n, h, e], 1.0, DType::F32, 3);
        let out = causal_linear_attention(&q, &k, &v, None, 1).unwrap();
        assert!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
        let g = probe(&out, 5).backward().unwrap();
        for x in [q.as_tensor(), &v] {
            assert!(g.get(x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
        }
    }

    /// The f32 kernel against the f64 plain version, where f64 does not overflow.
    fn against_f64(k: &Tensor, bucket: usize) {
        let (b, n, h, e) = k.dims4().unwrap();
        let q = randn(&[b, n, h, e], 1.0, DType::F64, 1);
        let v = randn(&[b, n, h, e], 1.0, DType::F64, 3);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let fused = causal_linear_attention(&f32s(&q), &f32s(k), &f32s(&v), None, bucket).unwrap();
        let plain = reference(&q, k, &v, None, bucket).unwrap();
        let err = rel_err(&fused, &plain);
        assert!(err < 1e-5, "bucket {bucket}: error {err}");
    }

    #[test]
    fn keys_beyond_f32_exp_range_give_the_exact_result() {
        for bucket in [1, 4] {
            // exp(150) overflows f32 (the reference gives inf/NaN) but not f64.
            let k = (randn(&[1, 136, 2, 8], 1.0, DType::F64, 2).as_tensor() + 150.0).unwrap();
            against_f64(&k, bucket);
            // One huge key in the middle of a chunk must not wash out the queries before it.
            let mut kv = randn(&[1, 136, 2, 8], 1.0, DType::F64, 2).flatten_all().unwrap().to_vec1::<f64>().unwrap();
            kv[(10 * 2) * 8 + 3] = 150.0;
            kv[(70 * 2 + 1) * 8 + 5] = 110.0;
            against_f64(&Tensor::from_vec(kv, (1, 136, 2, 8), &Device::Cpu).unwrap(), bucket);
        }
    }

    #[test]
    fn recurrent_form_matches_the_parallel_form() {
        for bucket in [1, 3] {
            let (n, e) = (70, 8);
            let q = randn(&[1, n, 1, e], 1.0, DType::F32, 41);
            let k = randn(&[1, n, 1, e], 3.0, DType::F32, 42);
            let v = randn(&[1, n, 1, e], 1.0, DType::F32, 43);
            let n_full = n / bucket * bucket;
            let full = causal_linear_attention(&q.narrow(1, 0, n_full).unwrap(), &k.narrow(1, 0, n_full).unwrap(), &v.narrow(1, 0, n_full).unwrap(), None, bucket).unwrap();
            let full = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (qv, kv, vv) = [&q, &k, &v].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).into();
            // Prefill the first 20 positions, then step.
            let p = 20;
            let mut st = LinearState::from_prefix(&kv[..p * e], &vv[..p * e], e, e, bucket);
            let mut out = vec![0f32; e];
            for i in p..n_full {
                st.step(&qv[i * e..(i + 1) * e], &kv[i * e..(i + 1) * e], &vv[i * e..(i + 1) * e], &mut out);
                for d in 0..e {
                    assert!((out[d] - full[i * e + d]).abs() < 1e-5, "bucket {bucket} position {i}: {} vs {}", out[d], full[i * e + d]);
                }
            }
        }
    }

    #[test]
    fn decoding_steps_give_the_same_bits_in_either_instruction_set() {
        let (n, e) = (90, 64);
        let [q, k, v] = [1, 2, 3].map(|s| randn(&[n * e], 2.0, DType::F32, 60 + s).as_tensor().to_vec1::<f32>().unwrap());
        let run = || {
            let mut st = LinearState::from_prefix(&k[..10 * e], &v[..10 * e], e, e, 4);
            let mut outs = vec![0f32; n * e];
            for i in 10..n {
                let at = i * e..(i + 1) * e;
                st.step(&q[at.clone()], &k[at.clone()], &v[at.clone()], &mut outs[at]);
            }
            outs
        };
        assert_eq!(run(), plain(run));
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for bucket in [1, 4] {
            let (b, n, h, e) = (1, 12, 2, 4);
            let q = randn(&[b, n, h, e], 1.0, DType::F64, 11);
            let k = randn(&[b, n, h, e], 1.0, DType::F64, 12);
            let v = randn(&[b, n, h, e], 1.0, DType::F64, 13);
            let m = mask(b, n);
            let run = || causal_linear_attention(&q, &k, &v, Some(&m), bucket).unwrap();
            let g = probe(&run(), 14).backward().unwrap();
            let f = || probe(&run(), 14).to_scalar::<f64>().unwrap();
            for x in [&q, &k, &v] {
                check_fd(x, g.get(x).unwrap(), &f, 10, 1e-6);
            }
        }
    }
}
