//! Multi-head self-attention of the reference in one op: from the fused projection
//! `qkv` [batch, n, 3 · heads · e] (queries, keys, values) to the merged head outputs
//! [batch, n, heads · e]. The first `local_heads` heads attend with windowed softmax attention
//! (local.rs), the others with global linear attention, causal (causal_linear.rs) or not
//! (linear.rs); rotary positions, when given, rotate queries and keys of every head first.
//!
//! The fused kernel reads each head's rows straight from `qkv` and writes its output and its
//! gradients straight to their places: no per-head projections, splits or concatenations. The
//! plain version composes the three kernels' plain versions on the split heads.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::local::{Dropout, LocalParams, Windows};
use super::rotary::RotaryTable;
use super::{causal_linear, linear, local, read, rotary, slice, with_float, Elem, Heads, SharedOut};

/// Geometry of a self-attention layer.
#[derive(Clone, Copy, Debug)]
pub struct HeadSpec {
    /// Attention heads.
    pub heads: usize,
    /// How many of them (the first) are local.
    pub local_heads: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// Causal masking.
    pub causal: bool,
    /// Blind-spot bucket of causal global heads.
    pub bucket: usize,
    /// Window of local heads.
    pub window: usize,
}

/// `qkv`: [batch, n, 3 · heads · dim_head]; `mask`: [batch, n], nonzero = keep; `rotary`: the
/// table and the position of row 0; `dropout`: on the local heads' probabilities.
pub fn self_attention(qkv: &Tensor, spec: HeadSpec, mask: Option<&Tensor>, rotary: Option<(&Arc<RotaryTable>, usize)>, dropout: Option<Dropout>) -> Result<Tensor> {
    let (b, n, width) = qkv.dims3()?;
    let he = spec.heads * spec.dim_head;
    if width != 3 * he || spec.local_heads > spec.heads {
        candle_core::bail!("self-attention: qkv width {width} does not fit {} heads of {}", spec.heads, spec.dim_head);
    }
    if spec.local_heads > 0 && n % spec.window != 0 {
        candle_core::bail!("self-attention: length {n} is not a multiple of the window {}", spec.window);
    }
    if spec.causal && spec.local_heads < spec.heads && n % spec.bucket.max(1) != 0 {
        candle_core::bail!("self-attention: length {n} is not a multiple of the bucket {}", spec.bucket);
    }
    if super::use_fused(qkv) {
        let op = Fused::new(spec, mask, rotary, dropout)?;
        if op.keep.as_ref().is_some_and(|k| k.len() != b * n) {
            candle_core::bail!("self-attention: the mask must be [{b}, {n}]");
        }
        let flat = qkv.contiguous()?.apply_op1(op)?;
        flat.narrow(0, 0, b * n * he)?.reshape((b, n, he))
    } else {
        composed(qkv, spec, mask, rotary, dropout, false)
    }
}

/// The fused forward without graph: the output and the flat result (output and statistics)
/// that [`backward`] needs.
pub(crate) fn forward_saved(qkv: &Tensor, spec: HeadSpec, mask: Option<&Tensor>, rotary: Option<(&Arc<RotaryTable>, usize)>, dropout: Option<Dropout>) -> Result<(Tensor, Tensor)> {
    let (b, n, _) = qkv.dims3()?;
    let op = Fused::new(spec, mask, rotary, dropout)?;
    let qkv = qkv.contiguous()?;
    let flat = qkv.apply_op1_no_bwd(&op)?;
    let he = spec.heads * spec.dim_head;
    Ok((flat.narrow(0, 0, b * n * he)?.reshape((b, n, he))?, flat))
}

/// The fused backward: d qkv for output gradient `dout` [batch, n, heads · dim_head].
pub(crate) fn backward(qkv: &Tensor, flat: &Tensor, dout: &Tensor, spec: HeadSpec, mask: Option<&Tensor>, rotary: Option<(&Arc<RotaryTable>, usize)>, dropout: Option<Dropout>) -> Result<Tensor> {
    Fused::new(spec, mask, rotary, dropout)?.backward(&qkv.contiguous()?, flat, &dout.contiguous()?)
}

/// Plain version: split, rotate, and the three plain kernels.
pub fn reference(qkv: &Tensor, spec: HeadSpec, mask: Option<&Tensor>, rotary: Option<(&Arc<RotaryTable>, usize)>, dropout: Option<Dropout>) -> Result<Tensor> {
    composed(qkv, spec, mask, rotary, dropout, true)
}

/// Split, rotate, and the three attention forms: their plain versions, or (`plain` false) each
/// form's own dispatch, which picks the GPU kernels where they apply.
fn composed(qkv: &Tensor, spec: HeadSpec, mask: Option<&Tensor>, rotary: Option<(&Arc<RotaryTable>, usize)>, dropout: Option<Dropout>, plain: bool) -> Result<Tensor> {
    let (b, n, _) = qkv.dims3()?;
    let (h, e, l) = (spec.heads, spec.dim_head, spec.local_heads);
    let part = |i: usize| qkv.narrow(2, i * h * e, h * e)?.reshape((b, n, h, e));
    let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
    if let Some((table, offset)) = rotary {
        q = rotary::reference(&q, table, offset)?;
        k = rotary::reference(&k, table, offset)?;
    }
    let mut outs = vec![];
    if l > 0 {
        let heads = |t: &Tensor| t.narrow(2, 0, l);
        let w = Windows { size: spec.window, causal: spec.causal };
        let (q, k, v) = (heads(&q)?, heads(&k)?, heads(&v)?);
        outs.push(if plain { local::reference(&q, &k, &v, mask, w, dropout)? } else { local::local_attention(&q, &k, &v, mask, w, dropout)? });
    }
    if l < h {
        let heads = |t: &Tensor| t.narrow(2, l, h - l);
        let (q, k, v) = (heads(&q)?, heads(&k)?, heads(&v)?);
        outs.push(match (spec.causal, plain) {
            (true, true) => causal_linear::reference(&q, &k, &v, mask, spec.bucket)?,
            (true, false) => causal_linear::causal_linear_attention(&q, &k, &v, mask, spec.bucket)?,
            (false, true) => linear::reference(&q, &k, &v, mask)?,
            (false, false) => linear::linear_attention(&q, &k, &v, mask)?,
        });
    }
    Tensor::cat(&outs, 2)?.reshape((b, n, h * e))
}

struct Fused {
    spec: HeadSpec,
    keep: Option<Vec<u8>>,
    rotary: Option<(Arc<RotaryTable>, usize)>,
    dropout: Option<Dropout>,
}

/// Statistics kept per row and head for the backward pass (the causal kernel's two).
const STATS: usize = 2;

impl Fused {
    fn new(spec: HeadSpec, mask: Option<&Tensor>, rotary: Option<(&Arc<RotaryTable>, usize)>, dropout: Option<Dropout>) -> Result<Self> {
        let keep = mask.map(|m| m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()).transpose()?;
        Ok(Self { spec, keep, rotary: rotary.map(|(t, o)| (t.clone(), o)), dropout })
    }

    /// Views of q, k, v (inside qkv) and of the output, over every head.
    fn views(&self, b: usize, n: usize) -> (Heads, Heads, Heads, Heads) {
        let (h, e) = (self.spec.heads, self.spec.dim_head);
        let part = |i: usize| Heads { b, n, h, e, stride: 3 * h * e, col: i * h * e };
        (part(0), part(1), part(2), Heads { b, n, h, e, stride: h * e, col: 0 })
    }

    /// The raw rows of task t's q, k, v, rotated when there are rotary positions.
    fn rows<T: Elem>(&self, qkv: &[T], views: (Heads, Heads, Heads), t: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (qs, ks, vs) = views;
        let len = qs.n * qs.e;
        let (mut q, mut k, mut v) = (vec![T::ZERO; len], vec![T::ZERO; len], vec![T::ZERO; len]);
        qs.gather(qkv, t, &mut q);
        ks.gather(qkv, t, &mut k);
        vs.gather(qkv, t, &mut v);
        if let Some((table, offset)) = &self.rotary {
            table.rotate_rows(&mut q, qs.e, *offset, false);
            table.rotate_rows(&mut k, qs.e, *offset, false);
        }
        (q, k, v)
    }

    fn keep_row(&self, t: usize, n: usize) -> Option<&[u8]> {
        let bi = t / self.spec.heads;
        self.keep.as_deref().map(|m| &m[bi * n..(bi + 1) * n])
    }

    fn local_params(&self) -> LocalParams {
        LocalParams { windows: Windows { size: self.spec.window, causal: self.spec.causal }, dropout: self.dropout }
    }

    /// Task number of a local head in the plain version's numbering (batch · local + head),
    /// which names its dropout stream.
    fn local_task(&self, t: usize) -> usize {
        (t / self.spec.heads) * self.spec.local_heads + t % self.spec.heads
    }
}

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        "self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, _) = l.shape().dims3()?;
        let (qs, ks, vs, os) = self.views(b, n);
        let (h, e) = (self.spec.heads, self.spec.dim_head);
        with_float!(super::dtype_of(s), self.name(), T => {
            let qkv = slice::<T>(s, l)?;
            let out_len = b * n * h * e;
            let mut flat = vec![T::ZERO; out_len + b * h * n * STATS];
            let (outs, stats) = flat.split_at_mut(out_len);
            let shared = SharedOut::new(outs);
            stats.par_chunks_mut(n * STATS).enumerate().for_each(|(t, st)| {
                let (q, k, v) = self.rows(qkv, (qs, ks, vs), t);
                let keep = self.keep_row(t, n);
                let mut out = vec![T::ZERO; n * e];
                if t % h < self.spec.local_heads {
                    local::Task::new(self.local_params(), q, k, v, keep, self.local_task(t), e).forward(&mut out, &mut st[..n]);
                } else if self.spec.causal {
                    causal_linear::Task::new(q, k, v, keep, e, e, self.spec.bucket).forward(&mut out, st);
                } else {
                    out = linear::Task::new(q, k, v, keep, e, e).forward();
                }
                // SAFETY: task t writes only its own rows.
                unsafe { os.scatter(&shared, t, &out) };
            });
            let len = flat.len();
            Ok((super::storage::<T>(flat), Shape::from(len)))
        })
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, n, _) = qkv.dims3()?;
        let out_len = b * n * self.spec.heads * self.spec.dim_head;
        Ok(Some(self.backward(qkv, res, &grad.narrow(0, 0, out_len)?.contiguous()?)?))
    }
}

impl Fused {
    /// d qkv from the forward's flat result and the output gradient (its first part).
    fn backward(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (b, n, _) = qkv.dims3()?;
        let (qs, ks, vs, os) = self.views(b, n);
        let (h, e) = (self.spec.heads, self.spec.dim_head);
        let out_len = b * n * h * e;
        with_float!(qkv.dtype(), "self-attention", T => {
            let mut dqkv = vec![T::ZERO; qkv.elem_count()];
            let shared = SharedOut::new(&mut dqkv);
            read::<T, _>(&[qkv, res, grad], |s| {
                let (x, res, grad) = (s[0], s[1], s[2]);
                (0..b * h).into_par_iter().for_each(|t| {
                    let (q, k, v) = self.rows(x, (qs, ks, vs), t);
                    let keep = self.keep_row(t, n);
                    let (mut g, mut out) = (vec![T::ZERO; n * e], vec![T::ZERO; n * e]);
                    os.gather(&grad[..out_len], t, &mut g);
                    let stats = &res[out_len + t * n * STATS..out_len + (t + 1) * n * STATS];
                    let (mut dq, mut dk, dv) = if t % h < self.spec.local_heads {
                        os.gather(&res[..out_len], t, &mut out);
                        local::Task::new(self.local_params(), q, k, v, keep, self.local_task(t), e).backward(&g, &out, &stats[..n])
                    } else if self.spec.causal {
                        os.gather(&res[..out_len], t, &mut out);
                        causal_linear::Task::new(q, k, v, keep, e, e, self.spec.bucket).backward(&g, &out, stats)
                    } else {
                        linear::Task::new(q, k, v, keep, e, e).backward(&g, keep)
                    };
                    if let Some((table, offset)) = &self.rotary {
                        table.rotate_rows(&mut dq, e, *offset, true);
                        table.rotate_rows(&mut dk, e, *offset, true);
                    }
                    // SAFETY: task t writes only its own rows of each part.
                    unsafe {
                        qs.scatter(&shared, t, &dq);
                        ks.scatter(&shared, t, &dk);
                        vs.scatter(&shared, t, &dv);
                    }
                });
            })?;
            super::tensor(dqkv, qkv.dims())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::Device;

    fn case(spec: HeadSpec, n: usize, masked: bool, rotary: bool, dropout: Option<Dropout>) {
        let b = 2;
        for dtype in [DType::F32, DType::F64] {
            let qkv = randn(&[b, n, 3 * spec.heads * spec.dim_head], 1.0, dtype, 1);
            let mask = masked.then(|| Tensor::from_vec((0..b * n).map(|i| (i % 7 != 4 && i % n < n - 3) as u8).collect::<Vec<_>>(), (b, n), &Device::Cpu).unwrap());
            let table = Arc::new(RotaryTable::new(spec.dim_head, 64));
            let rot = rotary.then_some((&table, 3));
            let fused = self_attention(&qkv, spec, mask.as_ref(), rot, dropout).unwrap();
            let plain = reference(&qkv, spec, mask.as_ref(), rot, dropout).unwrap();
            let tol = if dtype == DType::F32 { 3e-5 } else { 1e-11 };
            let err = rel_err(&fused, &plain);
            assert!(err < tol, "{spec:?} n {n} masked {masked} rotary {rotary}: forward {err}");
            let gf = probe(&fused, 2).backward().unwrap();
            let gp = probe(&plain, 2).backward().unwrap();
            let err = rel_err(gf.get(&qkv).unwrap(), gp.get(&qkv).unwrap());
            assert!(err < tol * 20.0, "{spec:?} n {n} masked {masked} rotary {rotary}: gradient {err}");
        }
    }

    #[test]
    fn fused_matches_the_composed_plain_kernels() {
        for causal in [true, false] {
            for local_heads in [0, 1, 3] {
                let spec = HeadSpec { heads: 3, local_heads, dim_head: 8, causal, bucket: 4, window: 8 };
                case(spec, 24, false, false, None);
                case(spec, 24, true, true, None);
                case(HeadSpec { bucket: 1, ..spec }, 16, true, false, Some(Dropout { p: 0.2, seed: 3 }));
            }
        }
    }
}
