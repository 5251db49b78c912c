//! Rotary position embedding of the reference: interleaved pairs (GPT-J style),
//! `x'[2i] = x[2i] cos θ - x[2i+1] sin θ`, `x'[2i+1] = x[2i+1] cos θ + x[2i] sin θ`,
//! with `θ = position · 10000^(-2i/e)` computed in f32 like the reference's buffer.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, with_float, Elem, Heads};

/// sin and cos of every (position, pair), as the reference's `FixedPositionalEmbedding(e, len)`.
#[derive(Debug)]
pub struct RotaryTable {
    /// Width of a head.
    pub dim: usize,
    /// Positions covered.
    pub len: usize,
    sin: Vec<f32>,
    cos: Vec<f32>,
}

impl RotaryTable {
    /// The table for heads of width `dim` and positions 0..len.
    pub fn new(dim: usize, len: usize) -> Self {
        let half = dim / 2;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / dim as f32)).collect();
        let mut sin = Vec::with_capacity(len * half);
        let mut cos = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &inv_freq {
                let a = p as f32 * f;
                sin.push(a.sin());
                cos.push(a.cos());
            }
        }
        Self { dim, len, sin, cos }
    }

    /// Rotates the rows (n x dim, one head) of positions `offset..` in place; `inverse`
    /// rotates back (the transpose, for gradients).
    pub(crate) fn rotate_rows<T: super::Elem>(&self, rows: &mut [T], dim: usize, offset: usize, inverse: bool) {
        let half = dim / 2;
        for (i, row) in rows.chunks_mut(dim).enumerate() {
            let p = offset + i;
            let (sin, cos) = (&self.sin[p * half..(p + 1) * half], &self.cos[p * half..(p + 1) * half]);
            for j in 0..half {
                let (c, sn) = (T::of(cos[j] as f64), T::of(if inverse { -sin[j] } else { sin[j] } as f64));
                let (a, b) = (row[2 * j], row[2 * j + 1]);
                row[2 * j] = a * c - b * sn;
                row[2 * j + 1] = b * c + a * sn;
            }
        }
    }

    /// Rotates every head (of width `dim`) of one row `x` for position `p`, in place.
    pub fn rotate(&self, x: &mut [f32], dim: usize, p: usize) {
        let half = dim / 2;
        let (sin, cos) = (&self.sin[p * half..(p + 1) * half], &self.cos[p * half..(p + 1) * half]);
        for head in x.chunks_mut(dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// The reference's buffer `[len, dim] = cat(sin, cos)` (halves, not interleaved).
    pub fn buffer(&self) -> Vec<f32> {
        let half = self.dim / 2;
        let mut out = Vec::with_capacity(self.len * self.dim);
        for p in 0..self.len {
            out.extend_from_slice(&self.sin[p * half..(p + 1) * half]);
            out.extend_from_slice(&self.cos[p * half..(p + 1) * half]);
        }
        out
    }
}

/// Rotates `x` [batch, n, heads, e] for positions `offset .. offset + n`.
pub fn rotary(x: &Tensor, table: &Arc<RotaryTable>, offset: usize) -> Result<Tensor> {
    let (_, n, _, e) = x.dims4()?;
    if e != table.dim || offset + n > table.len {
        candle_core::bail!("rotary: table of {} positions x {} cannot rotate {n} positions of width {e} from {offset}", table.len, table.dim);
    }
    if super::use_fused(x) {
        x.contiguous()?.apply_op1(Rotary { table: table.clone(), offset, inverse: false })
    } else {
        reference(x, table, offset)
    }
}

/// Plain version: `x cos + rotate_every_two(x) sin`.
pub fn reference(x: &Tensor, table: &RotaryTable, offset: usize) -> Result<Tensor> {
    let (b, n, h, e) = x.dims4()?;
    let half = e / 2;
    let pick = |t: &[f32]| -> Result<Tensor> {
        let v: Vec<f32> = (0..n * e).map(|x| t[(offset + x / e) * half + (x % e) / 2]).collect();
        Tensor::from_vec(v, (1, n, 1, e), x.device())?.to_dtype(x.dtype())
    };
    let (sin, cos) = (pick(&table.sin)?, pick(&table.cos)?);
    let pairs = x.reshape((b, n, h, half, 2))?;
    let (x1, x2) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 4)?.reshape((b, n, h, e))?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

struct Rotary {
    table: Arc<RotaryTable>,
    offset: usize,
    inverse: bool,
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hs = Heads::of(l.dims(), "rotary input")?;
        let half = hs.e / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        with_float!(super::dtype_of(s), self.name(), T => {
            let x = slice::<T>(s, l)?;
            let mut y = vec![T::ZERO; x.len()];
            let row = hs.h * hs.e;
            y.par_chunks_mut(row).zip(x.par_chunks(row)).enumerate().for_each(|(r, (yr, xr))| {
                let p = self.offset + r % hs.n;
                let (sin, cos) = (&self.table.sin[p * half..(p + 1) * half], &self.table.cos[p * half..(p + 1) * half]);
                for (yh, xh) in yr.chunks_mut(hs.e).zip(xr.chunks(hs.e)) {
                    for i in 0..half {
                        let (c, sn) = (T::of(cos[i] as f64), T::of(sign * sin[i] as f64));
                        let (a, b) = (xh[2 * i], xh[2 * i + 1]);
                        yh[2 * i] = a * c - b * sn;
                        yh[2 * i + 1] = b * c + a * sn;
                    }
                }
            });
            Ok((super::storage::<T>(y), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // A rotation's transpose is the rotation by the opposite angle.
        let inverse = Rotary { table: self.table.clone(), offset: self.offset, inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::*;
    use candle_core::DType;

    #[test]
    fn fused_matches_reference() {
        let table = Arc::new(RotaryTable::new(8, 40));
        for dtype in [DType::F32, DType::F64] {
            let x = randn(&[2, 9, 3, 8], 1.0, dtype, 1);
            for offset in [0, 31] {
                let fused = rotary(&x, &table, offset).unwrap();
                let plain = reference(&x, &table, offset).unwrap();
                assert!(rel_err(&fused, &plain) < 1e-6);
                let gf = probe(&fused, 2).backward().unwrap();
                let gp = probe(&plain, 2).backward().unwrap();
                assert!(rel_err(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-6);
            }
        }
    }

    #[test]
    fn buffer_layout_is_sin_then_cos() {
        let t = RotaryTable::new(4, 3);
        let b = t.buffer();
        assert_eq!(b.len(), 12);
        assert_eq!(b[4], (1.0f32).sin());
        assert_eq!(b[6], (1.0f32).cos());
        assert_eq!(b[5], (0.01f32).sin());
    }
}
