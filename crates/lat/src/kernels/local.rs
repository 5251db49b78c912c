//! Local windowed softmax attention, with the semantics of the `local-attention` package as the
//! reference uses it: the sequence is cut into windows of `W` positions; a query in window `w`
//! attends to the keys of windows `w-1, w` (causal, and only up to itself) or `w-1, w, w+1`
//! (non-causal). Window slots outside the sequence hold key = value = -1 and are always masked;
//! masked keys get the most negative float. A query whose every slot is masked therefore gets
//! uniform weights over all slots, pad slots included, exactly as the reference computes it.
//!
//! The fused kernel works window by window on the contiguous rows of the neighbouring windows
//! (no padded copies), keeps the log-sum-exp of each row, and recomputes the probabilities in the
//! backward pass.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{gemm, grads_by_task, outputs_by_task, prefetch_lines, slice, softmax_f32, task_saved, vectorized, with_float, Elem, Heads, LineVec, Mat};
use crate::rng::uniform_at;

/// Dropout on the attention probabilities: probability `p`, masks drawn from stream `seed`.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    /// Probability of dropping.
    pub p: f64,
    /// Stream the masks are drawn from.
    pub seed: u64,
}

/// Window geometry shared by both implementations.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// Positions per window.
    pub size: usize,
    /// Causal: a query sees its own window up to itself and the previous window.
    pub causal: bool,
}

impl Windows {
    fn look_forward(&self) -> usize {
        if self.causal {
            0
        } else {
            1
        }
    }

    /// Key slots per query: look-back window, own window, look-forward window.
    pub fn slots(&self) -> usize {
        (2 + self.look_forward()) * self.size
    }

    /// Position of slot 0 for window `w` (negative in the first window).
    fn first(&self, w: usize) -> isize {
        (w as isize - 1) * self.size as isize
    }

    /// The in-sequence key range [lo, hi) of window `w` for a sequence of `n`.
    fn keys(&self, w: usize, n: usize) -> (usize, usize) {
        let lo = self.first(w).max(0) as usize;
        let hi = ((w + 1 + self.look_forward()) * self.size).min(n);
        (lo, hi)
    }
}

/// `q`, `k`, `v`: [batch, n, heads, e] with `n` a multiple of the window; `mask`: [batch, n].
pub fn local_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, windows: Windows, dropout: Option<Dropout>) -> Result<Tensor> {
    let (b, n, h, e) = q.dims4()?;
    if windows.size == 0 || n % windows.size != 0 {
        candle_core::bail!("local attention: length {n} is not a multiple of the window {}", windows.size);
    }
    let dims = super::gpu::Local { b, n, h, e, window: windows.size, causal: windows.causal, dropout: dropout.is_some() };
    if super::use_fused(q) || (super::use_gpu(q) && dims.supported()) {
        let keep = mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
        let op = Local { params: LocalParams { windows, dropout }, keep };
        let flat = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
        flat.narrow(0, 0, b * n * h * e)?.reshape((b, n, h, e))
    } else {
        reference(q, k, v, mask, windows, dropout)
    }
}

/// Dropout keep-factor for (task, query, slot): 0 or 1 / (1 - p).
#[inline]
fn drop_factor<T: Elem>(d: Option<Dropout>, t: usize, n: usize, i: usize, slots: usize, slot: usize) -> T {
    match d {
        None => T::ONE,
        Some(d) => {
            let index = ((t * n + i) * slots + slot) as u64;
            if (uniform_at(d.seed, index) as f64) < d.p {
                T::ZERO
            } else {
                T::of(1.0 / (1.0 - d.p))
            }
        }
    }
}

/// Plain version: materialises the look-around key/value windows, as the reference does.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, windows: Windows, dropout: Option<Dropout>) -> Result<Tensor> {
    let (b, n, h, e) = q.dims4()?;
    let (w, slots, nw) = (windows.size, windows.slots(), n / windows.size);
    let dev = q.device();
    let merge = |t: &Tensor| t.transpose(1, 2)?.contiguous()?.reshape((b * h, n, e));
    let (q, k, v) = (merge(q)?, merge(k)?, merge(v)?);
    let pad = |t: &Tensor| -> Result<Tensor> {
        let fill = Tensor::full(-1f32, (b * h, w, e), dev)?.to_dtype(t.dtype())?;
        let back = Tensor::full(-1f32, (b * h, windows.look_forward() * w, e), dev)?.to_dtype(t.dtype())?;
        Tensor::cat(&[&fill, t, &back], 1)
    };
    let (kp, vp) = (pad(&k)?, pad(&v)?);
    let around = |t: &Tensor| -> Result<Tensor> {
        let ws: Vec<Tensor> = (0..nw).map(|i| t.narrow(1, i * w, slots)).collect::<Result<_>>()?;
        Tensor::stack(&ws, 1)
    };
    let (bk, bv) = (around(&kp)?.contiguous()?, around(&vp)?.contiguous()?);
    let bq = (q.reshape((b * h, nw, w, e))? * (e as f64).powf(-0.5))?;
    let sim = bq.matmul(&bk.transpose(2, 3)?.contiguous()?)?;
    let keep: Option<Vec<u8>> = mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
    let mut visible = vec![0u8; b * h * nw * w * slots];
    let mut factors = vec![1f64; b * h * nw * w * slots];
    for t in 0..b * h {
        for i in 0..n {
            for s in 0..slots {
                let j = windows.first(i / w) + s as isize;
                let real = j >= 0 && (j as usize) < n;
                let ok = real && keep.as_ref().is_none_or(|m| m[(t / h) * n + j as usize] != 0) && (!windows.causal || j as usize <= i);
                visible[(t * n + i) * slots + s] = ok as u8;
                factors[(t * n + i) * slots + s] = drop_factor::<f64>(dropout, t, n, i, slots, s);
            }
        }
    }
    let shape = (b * h, nw, w, slots);
    let visible = Tensor::from_vec(visible, shape, dev)?;
    let fill = super::most_negative(sim.dtype(), dev)?.broadcast_as(shape)?;
    let sim = visible.where_cond(&sim, &fill)?;
    let attn = candle_nn::ops::softmax(&sim, D::Minus1)?;
    let attn = (attn * Tensor::from_vec(factors, shape, dev)?.to_dtype(q.dtype())?)?;
    let out = attn.matmul(&bv)?.reshape((b, h, n, e))?;
    out.transpose(1, 2)
}

/// What a local-attention task needs besides its rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalParams {
    pub windows: Windows,
    pub dropout: Option<Dropout>,
}

struct Local {
    params: LocalParams,
    keep: Option<Vec<u8>>,
}

/// Marks a row whose every slot is masked (uniform weights) in the saved log-sum-exp.
fn all_masked<T: Elem>(lse: T) -> bool {
    lse == T::of(f64::NEG_INFINITY)
}

pub(crate) struct Task<'a, T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    keep: Option<&'a [u8]>,
    t: usize,
    n: usize,
    e: usize,
    op: LocalParams,
}

impl<'a, T: Elem> Task<'a, T> {
    fn load(op: &'a Local, q: &[T], k: &[T], v: &[T], hs: Heads, t: usize) -> Self {
        let (n, e) = (hs.n, hs.e);
        let mut qq = vec![T::ZERO; n * e];
        let mut kk = vec![T::ZERO; n * e];
        let mut vv = vec![T::ZERO; n * e];
        hs.gather(q, t, &mut qq);
        hs.gather(k, t, &mut kk);
        hs.gather(v, t, &mut vv);
        let keep = op.keep.as_deref().map(|m| &m[(t / hs.h) * n..(t / hs.h + 1) * n]);
        Self::new(op.params, qq, kk, vv, keep, t, e)
    }

    /// A task from the raw rows of one head (n x e each) and its row of the mask; `t` numbers
    /// the task's dropout stream.
    pub(crate) fn new(op: LocalParams, mut q: Vec<T>, k: Vec<T>, v: Vec<T>, keep: Option<&'a [u8]>, t: usize, e: usize) -> Self {
        let scale = T::of((e as f64).powf(-0.5));
        q.iter_mut().for_each(|x| *x *= scale);
        Self { n: k.len() / e.max(1), q, k, v, keep, t, e, op }
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        self.keep.is_none_or(|m| m[j] != 0) && (!self.op.windows.causal || j <= i)
    }

    fn factor(&self, i: usize, w: usize, j: isize) -> T {
        let slot = (j - self.op.windows.first(w)) as usize;
        drop_factor(self.op.dropout, self.t, self.n, i, self.op.windows.slots(), slot)
    }

    /// Scores of window `w` into `s` (row stride = key count); returns the key range.
    fn scores(&self, w: usize, s: &mut [T]) -> (usize, usize) {
        let (ws, e) = (self.op.windows.size, self.e);
        let (lo, hi) = self.op.windows.keys(w, self.n);
        let i0 = w * ws;
        gemm(ws, hi - lo, e, s, hi - lo, false, Mat::rows(&self.q[i0 * e..(i0 + ws) * e], e), Mat::rows(&self.k[lo * e..hi * e], e).t(), T::ONE);
        (lo, hi)
    }

    /// Output of a row whose slots are all masked: the dropout-weighted mean over every slot.
    fn uniform_row(&self, i: usize, w: usize, out: &mut [T]) {
        let win = self.op.windows;
        let (lo, hi) = win.keys(w, self.n);
        let inv = T::ONE / T::of(win.slots() as f64);
        out.fill(T::ZERO);
        for s in 0..win.slots() {
            let j = win.first(w) + s as isize;
            let f = self.factor(i, w, j) * inv;
            if j >= lo as isize && j < hi as isize {
                let vj = &self.v[j as usize * self.e..(j as usize + 1) * self.e];
                out.iter_mut().zip(vj).for_each(|(o, &x)| *o += f * x);
            } else {
                out.iter_mut().for_each(|o| *o -= f);
            }
        }
    }

    pub(crate) fn forward(&self, out: &mut [T], lse: &mut [T]) {
        let (ws, e) = (self.op.windows.size, self.e);
        let mut s = vec![T::ZERO; ws * self.op.windows.slots()];
        for w in 0..self.n / ws {
            let (lo, hi) = self.scores(w, &mut s);
            let r = hi - lo;
            let mut uniform = vec![];
            for a in 0..ws {
                let i = w * ws + a;
                let row = &mut s[a * r..(a + 1) * r];
                // Keys past the causal limit are invisible; masked keys get the most negative
                // float, so that exp turns them into exact zeros.
                let end = if self.op.windows.causal { (i + 1).min(hi) - lo } else { r };
                if let Some(keep) = self.keep {
                    for (x, &kj) in row[..end].iter_mut().zip(&keep[lo..lo + end]) {
                        if kj == 0 {
                            *x = T::MASK;
                        }
                    }
                }
                let mx = row[..end].iter().fold(T::MASK, |m, &x| m.maxv(x));
                if mx == T::MASK {
                    row.fill(T::ZERO);
                    lse[i] = T::of(f64::NEG_INFINITY);
                    uniform.push(i);
                    continue;
                }
                let mut sum = T::ZERO;
                for x in row[..end].iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                row[end..].fill(T::ZERO);
                lse[i] = mx + sum.ln();
                let inv = T::ONE / sum;
                row[..end].iter_mut().for_each(|x| *x *= inv);
                if self.op.dropout.is_some() {
                    for j in lo..hi {
                        row[j - lo] *= self.factor(i, w, j as isize);
                    }
                }
            }
            let i0 = w * ws;
            gemm(ws, e, r, &mut out[i0 * e..(i0 + ws) * e], e, false, Mat { data: &s, rs: r, cs: 1 }, Mat::rows(&self.v[lo * e..hi * e], e), T::ONE);
            for i in uniform {
                self.uniform_row(i, w, &mut out[i * e..(i + 1) * e]);
            }
        }
    }

    pub(crate) fn backward(&self, g: &[T], out: &[T], lse: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (ws, e, n) = (self.op.windows.size, self.e, self.n);
        let slots = self.op.windows.slots();
        let mut dq = vec![T::ZERO; n * e];
        let mut dk = vec![T::ZERO; n * e];
        let mut dv = vec![T::ZERO; n * e];
        let mut p = vec![T::ZERO; ws * slots];
        let mut pd = vec![T::ZERO; ws * slots];
        let mut ds = vec![T::ZERO; ws * slots];
        let scale = T::of((e as f64).powf(-0.5));
        for w in 0..n / ws {
            let (lo, hi) = self.scores(w, &mut p);
            let r = hi - lo;
            let i0 = w * ws;
            let gw = &g[i0 * e..(i0 + ws) * e];
            // dP' = G Vᵀ
            gemm(ws, r, e, &mut ds, r, false, Mat::rows(gw, e), Mat::rows(&self.v[lo * e..hi * e], e).t(), T::ONE);
            for a in 0..ws {
                let i = i0 + a;
                let dot: T = gw[a * e..(a + 1) * e].iter().zip(&out[i * e..(i + 1) * e]).map(|(&x, &y)| x * y).sum();
                for j in lo..hi {
                    let x = a * r + j - lo;
                    let f = self.factor(i, w, j as isize);
                    if all_masked(lse[i]) {
                        pd[x] = f / T::of(slots as f64);
                        p[x] = T::ZERO;
                        ds[x] = T::ZERO;
                    } else if self.visible(i, j) {
                        let prob = (p[x] - lse[i]).exp();
                        pd[x] = prob * f;
                        ds[x] = prob * (ds[x] * f - dot);
                        p[x] = prob;
                    } else {
                        pd[x] = T::ZERO;
                        ds[x] = T::ZERO;
                    }
                }
            }
            gemm(r, e, ws, &mut dv[lo * e..hi * e], e, true, Mat { data: &pd, rs: r, cs: 1 }.t(), Mat::rows(gw, e), T::ONE);
            gemm(ws, e, r, &mut dq[i0 * e..(i0 + ws) * e], e, false, Mat { data: &ds, rs: r, cs: 1 }, Mat::rows(&self.k[lo * e..hi * e], e), scale);
            gemm(r, e, ws, &mut dk[lo * e..hi * e], e, true, Mat { data: &ds, rs: r, cs: 1 }.t(), Mat::rows(&self.q[i0 * e..(i0 + ws) * e], e), T::ONE);
        }
        (dq, dk, dv)
    }
}

impl Local {
    fn shapes(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Heads> {
        let hs = Heads::of(ql.dims(), "q")?;
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            candle_core::bail!("local attention: shapes {:?} {:?} {:?} must be equal", ql.dims(), kl.dims(), vl.dims());
        }
        if let Some(m) = &self.keep {
            if m.len() != hs.b * hs.n {
                candle_core::bail!("local attention: mask has {} entries, expected {}", m.len(), hs.b * hs.n);
            }
        }
        Ok(hs)
    }

    #[cfg(feature = "cuda")]
    fn gpu_dims(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<super::gpu::Local> {
        let hs = self.shapes(ql, kl, vl)?;
        let w = self.params.windows;
        let dims = super::gpu::Local { b: hs.b, n: hs.n, h: hs.h, e: hs.e, window: w.size, causal: w.causal, dropout: self.params.dropout.is_some() };
        if !dims.supported() {
            candle_core::bail!("local attention: the GPU kernels do not take this shape or attention dropout");
        }
        Ok(dims)
    }
}

impl CustomOp3 for Local {
    fn name(&self) -> &'static str {
        "local-attention"
    }

    fn cpu_fwd(&self, qs_: &CpuStorage, ql: &Layout, ks_: &CpuStorage, kl: &Layout, vs_: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let hs = self.shapes(ql, kl, vl)?;
        with_float!(super::dtype_of(qs_), self.name(), T => {
            let (q, k, v) = (slice::<T>(qs_, ql)?, slice::<T>(ks_, kl)?, slice::<T>(vs_, vl)?);
            // Each task's output, then its rows' log-sum-exps.
            let flat = outputs_by_task(hs, hs.n, |t, lse| {
                let mut out = vec![T::ZERO; hs.n * hs.e];
                Task::load(self, q, k, v, hs, t).forward(&mut out, lse);
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
        let hs = self.shapes(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        with_float!(q.dtype(), self.name(), T => grads_by_task::<T>([q, k, v], [hs; 3], &[res, &grad], |s, t| {
            let (g, out, lse) = task_saved(s[4], s[3], hs, hs.n, t);
            Task::load(self, s[0], s[1], s[2], hs, t).backward(&g, &out, lse)
        }))
    }
}

/// The recurrent form of causal local attention for one (batch row, head): the keys and
/// values of the positions a new query can see, from the start of the previous window on.
#[derive(Clone, Debug)]
pub struct LocalCache {
    e: usize,
    window: usize,
    /// Position of the first cached row.
    start: usize,
    keys: LineVec<f32>,
    values: LineVec<f32>,
}

impl LocalCache {
    /// The cache after a prompt whose keys and values are `k`, `v` (n x e).
    pub fn from_prefix(k: &[f32], v: &[f32], e: usize, window: usize) -> Self {
        let n = k.len() / e.max(1);
        // Only what the next position sees, in buffers of the bound they never outgrow.
        let start = Self::first_seen(n, window);
        let mut keys = LineVec::with_capacity(Self::max_bytes(e, window) / 8);
        let mut values = LineVec::with_capacity(keys.capacity());
        keys.extend_from_slice(&k[start * e..]);
        values.extend_from_slice(&v[start * e..]);
        Self { e, window, start, keys, values }
    }

    /// The first position that position `p` sees: the start of window `p / W - 1`.
    fn first_seen(p: usize, window: usize) -> usize {
        (p / window).saturating_sub(1) * window
    }

    /// The most bytes a cache for heads of width `e` holds: keys and values of two windows.
    pub fn max_bytes(e: usize, window: usize) -> usize {
        2 * 2 * window * e * 4
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * 4
    }

    /// The position the next key takes.
    fn next(&self) -> usize {
        self.start + self.keys.len() / self.e
    }

    /// Takes in the keys and values of the next positions, which lie in one window, after
    /// dropping what the first of them no longer sees; returns that position.
    fn append(&mut self, k: &[f32], v: &[f32]) -> usize {
        let p = self.next();
        self.evict(p);
        self.keys.extend_from_slice(k);
        self.values.extend_from_slice(v);
        p
    }

    /// Drops what position `p` no longer sees: everything before window `p / W - 1`.
    fn evict(&mut self, p: usize) {
        let first = Self::first_seen(p, self.window);
        if first > self.start {
            let drop = (first - self.start) * self.e;
            self.keys.drain_front(drop);
            self.values.drain_front(drop);
            self.start = first;
        }
    }

    /// Attends from the next position with the queries `queries` (one row of e per head that
    /// shares this cache), key `k` and value `v`; writes one output row per query.
    pub fn step(&mut self, queries: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        self.append(k, v);
        for (q, o) in queries.chunks(self.e).zip(out.chunks_mut(self.e)) {
            attend(&self.keys, &self.values, self.e, q, o);
        }
    }

    /// [`LocalCache::step`] for the next `t` positions at once (a prompt piece): `queries` holds
    /// t rows of every sharing head's query, `k` and `v` t rows of e, `out` is shaped like
    /// `queries`. The queries of one window see the same keys, so each window's part is two
    /// matrix products (scores, then weighted values) instead of a pass over the keys per query;
    /// the cache never holds more than two windows, as stepping keeps it.
    pub fn extend(&mut self, queries: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        let e = self.e;
        let t = k.len() / e.max(1);
        let row = queries.len() / t.max(1);
        let scale = (e as f32).powf(-0.5);
        let mut scores = Vec::new();
        let mut i = 0;
        while i < t {
            // Queries i..end lie in the window of the next position, p.
            let end = t.min(i + self.window - self.next() % self.window);
            let p = self.append(&k[i * e..end * e], &v[i * e..end * e]);
            let (s, cached) = (end - i, self.keys.len() / e);
            // Query r (at p + r) sees the cached keys up to its own, index p - start + r.
            let own = p - self.start;
            scores.resize(s * cached, 0.0);
            for head in (0..row).step_by(e) {
                let q = Mat { data: &queries[i * row + head..], rs: row, cs: 1 };
                gemm(s, cached, e, &mut scores, cached, false, q, Mat::rows(&self.keys, e).t(), scale);
                for (r, query_scores) in scores.chunks_mut(cached).enumerate() {
                    let (seen, unseen) = query_scores.split_at_mut(own + r + 1);
                    softmax_f32(seen, 1.0);
                    unseen.fill(0.0);
                }
                gemm(s, e, cached, &mut out[i * row + head..], row, false, Mat::rows(&scores, cached), Mat::rows(&self.values, e), 1.0);
            }
            i = end;
        }
    }
}

/// Rows of keys a step's attention asks for ahead of reading them.
const AHEAD: usize = 16;

vectorized! {
    /// Softmax attention of one query over the cached keys and values (rows of e).
    fn attend(keys: &[f32], values: &[f32], e: usize, q: &[f32], out: &mut [f32]) {
        let scale = (e as f32).powf(-0.5);
        let mut w = vec![0f32; keys.len() / e.max(1)];
        scores(keys, values, e, q, scale, &mut w);
        softmax_f32(&mut w, 1.0);
        // The output in column blocks held in registers across all keys, widest first; every
        // element is the same sum in the same order whichever block computes it.
        let mut col = 0;
        col = weighted_sum::<64>(&w, values, e, col, out);
        col = weighted_sum::<8>(&w, values, e, col, out);
        weighted_sum::<1>(&w, values, e, col, out);
    }
}

/// `w[j] = scale * keys[j] . q`.
#[inline(always)]
fn scores(keys: &[f32], values: &[f32], e: usize, q: &[f32], scale: f32, w: &mut [f32]) {
    for (j, (s, kr)) in w.iter_mut().zip(keys.chunks_exact(e)).enumerate() {
        // The keys a few rows ahead, and this row's value for the weighted sum.
        prefetch_lines(keys, (j + AHEAD) * e, e);
        prefetch_lines(values, j * e, e);
        *s = dot(kr, q) * scale;
    }
}

/// A dot product in eight interleaved partial sums, which the compiler turns into vector code.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = 0.0;
    for a in acc {
        sum += a;
    }
    sum + tail
}

/// `out[col..col + C] = sum_j w[j] values[j][col..col + C]` for each block of `C` columns from
/// `col` on that fits in a row, the block's sums held in registers across the keys; returns
/// the first column left.
#[inline(always)]
fn weighted_sum<const C: usize>(w: &[f32], values: &[f32], e: usize, mut col: usize, out: &mut [f32]) -> usize {
    while col + C <= e {
        let mut acc = [0f32; C];
        for (&wj, row) in w.iter().zip(values.chunks_exact(e)) {
            let x = &row[col..col + C];
            for l in 0..C {
                acc[l] += wj * x[l];
            }
        }
        out[col..col + C].copy_from_slice(&acc);
        col += C;
    }
    col
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    fn case(n: usize, size: usize, causal: bool, mask: Option<Vec<u8>>, dropout: Option<Dropout>, dtype: DType) {
        let (b, h, e) = (2, 2, 8);
        let q = randn(&[b, n, h, e], 1.0, dtype, 1);
        let k = randn(&[b, n, h, e], 1.0, dtype, 2);
        let v = randn(&[b, n, h, e], 1.0, dtype, 3);
        let mask = mask.map(|m| Tensor::from_vec(m, (b, n), &Device::Cpu).unwrap());
        let win = Windows { size, causal };
        let fused = local_attention(&q, &k, &v, mask.as_ref(), win, dropout).unwrap();
        let plain = reference(&q, &k, &v, mask.as_ref(), win, dropout).unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        let err = rel_err(&fused, &plain);
        assert!(err < tol, "n {n} W {size} causal {causal}: forward {err}");
        let gf = probe(&fused, 4).backward().unwrap();
        let gp = probe(&plain, 4).backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let err = rel_err(gf.get(x).unwrap(), gp.get(x).unwrap());
            assert!(err < tol * 20.0, "n {n} W {size} causal {causal}: d{name} {err}");
        }
    }

    #[test]
    fn fused_matches_reference() {
        for dtype in [DType::F32, DType::F64] {
            for causal in [true, false] {
                case(12, 4, causal, None, None, dtype);
                case(8, 8, causal, None, None, dtype);
                let mask: Vec<u8> = (0..24).map(|i| (i % 5 != 2) as u8).collect();
                case(12, 4, causal, Some(mask), None, dtype);
                // A fully masked window: those rows get uniform weights over every slot.
                let mask: Vec<u8> = (0..24).map(|i| !(4..12).contains(&i) as u8).collect();
                case(12, 4, causal, Some(mask), None, dtype);
                case(12, 4, causal, None, Some(Dropout { p: 0.3, seed: 5 }), dtype);
            }
        }
    }

    #[test]
    fn recurrent_form_matches_the_parallel_form() {
        // Widths with and without a tail past the last eight; windows of 1 to 16 keys.
        for e in [8, 12] {
            recurrent_form_matches_at(e);
        }
    }

    fn recurrent_form_matches_at(e: usize) {
        let (n, w) = (40, 8);
        let q = randn(&[1, n, 1, e], 1.0, DType::F32, 51);
        let k = randn(&[1, n, 1, e], 1.0, DType::F32, 52);
        let v = randn(&[1, n, 1, e], 1.0, DType::F32, 53);
        let win = Windows { size: w, causal: true };
        let full = local_attention(&q, &k, &v, None, win, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (qv, kv, vv) = [&q, &k, &v].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).into();
        for p in [0, 5, 8, 13] {
            let mut c = LocalCache::from_prefix(&kv[..p * e], &vv[..p * e], e, w);
            let mut out = vec![0f32; e];
            for i in p..n {
                c.step(&qv[i * e..(i + 1) * e], &kv[i * e..(i + 1) * e], &vv[i * e..(i + 1) * e], &mut out);
                for d in 0..e {
                    assert!((out[d] - full[i * e + d]).abs() < 1e-5, "width {e}, prefix {p}, position {i}");
                }
            }
        }
    }

    #[test]
    fn a_piece_read_at_once_equals_stepping_through_it() {
        // Two heads share the cache; widths with a tail; windows of eight and of one; pieces
        // inside one window, across several, and starting mid-window.
        let heads = 2;
        for (e, w) in [(8, 8), (12, 8), (12, 1)] {
            let n = 60;
            let [q, k, v] = [(heads, 1), (1, 2), (1, 3)].map(|(width, s)| randn(&[n * width * e], 1.0, DType::F32, 90 + s).as_tensor().to_vec1::<f32>().unwrap());
            let row = heads * e;
            for (p, len) in [(0, 1), (0, 5), (3, 8), (5, 27), (8, 16), (13, 40)] {
                let fresh = || LocalCache::from_prefix(&k[..p * e], &v[..p * e], e, w);
                let (mut stepped, mut read) = (fresh(), fresh());
                let mut want = vec![0f32; len * row];
                for i in 0..len {
                    let at = p + i;
                    stepped.step(&q[at * row..(at + 1) * row], &k[at * e..(at + 1) * e], &v[at * e..(at + 1) * e], &mut want[i * row..(i + 1) * row]);
                }
                let mut got = vec![f32::NAN; len * row];
                read.extend(&q[p * row..(p + len) * row], &k[p * e..(p + len) * e], &v[p * e..(p + len) * e], &mut got);
                for (i, (g, x)) in got.iter().zip(&want).enumerate() {
                    assert!((g - x).abs() < 1e-5, "width {e}, window {w}, prefix {p}, piece {len}, element {i}: {g} vs {x}");
                }
                // The same cache afterwards, to the bit, within the same bound.
                assert_eq!((read.start, &read.keys, &read.values), (stepped.start, &stepped.keys, &stepped.values));
                assert!(read.keys.len() <= 2 * w * e);
            }
        }
    }

    #[test]
    fn decoding_steps_give_the_same_bits_in_either_instruction_set() {
        // Heads of the seed and default models, and one with a tail past the last eight; every
        // number of cached keys from 11 to 256, in eights and not.
        for e in [64, 40, 12] {
            let (n, w) = (300, 128);
            let [q, k, v] = [1, 2, 3].map(|s| randn(&[n * e], 2.0, DType::F32, 70 + s).as_tensor().to_vec1::<f32>().unwrap());
            let run = || {
                let mut c = LocalCache::from_prefix(&k[..10 * e], &v[..10 * e], e, w);
                let mut outs = vec![0f32; n * e];
                for i in 10..n {
                    let at = i * e..(i + 1) * e;
                    c.step(&q[at.clone()], &k[at.clone()], &v[at.clone()], &mut outs[at]);
                }
                outs
            };
            assert_eq!(run(), plain(run), "heads of {e}");
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for causal in [true, false] {
            let (b, n, h, e) = (1, 8, 1, 4);
            let q = randn(&[b, n, h, e], 1.0, DType::F64, 31);
            let k = randn(&[b, n, h, e], 1.0, DType::F64, 32);
            let v = randn(&[b, n, h, e], 1.0, DType::F64, 33);
            let mask = Tensor::from_vec(vec![1u8, 1, 0, 1, 1, 1, 0, 1], (1, n), &Device::Cpu).unwrap();
            let win = Windows { size: 4, causal };
            let run = || local_attention(&q, &k, &v, Some(&mask), win, None).unwrap();
            let g = probe(&run(), 34).backward().unwrap();
            let f = || probe(&run(), 34).to_scalar::<f64>().unwrap();
            for x in [&q, &k, &v] {
                check_fd(x, g.get(x).unwrap(), &f, 10, 1e-6);
            }
        }
    }
}
