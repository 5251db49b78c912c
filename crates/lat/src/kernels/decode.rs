//! The products of a decoding step: `y = x Wᵀ (+ b)` for a few rows `x` [rows, in] (one per
//! stream) against a weight [out, in]. A decoding step is bound by reading the weights, so they
//! are read from memory once for all rows; and each output element is one dot product summed in
//! a fixed order whatever the number of rows, so a stream's logits do not depend on what else is
//! in its batch. Weights are f32, bf16, or int8 with one scale per output channel, dequantized on
//! the fly into f32 accumulation.
//!
//! The fast path uses AVX2 and FMA (picked at run time); [`reference`] is the plain version.

use rayon::prelude::*;

/// A weight [out, in], row-major.
#[derive(Clone, Copy, Debug)]
pub enum Weight<'a> {
    /// float32.
    F32(&'a [f32]),
    /// bfloat16, as raw bits.
    Bf16(&'a [u16]),
    /// int8 with the scale of each output row: `w[o][i] = q[o][i] · scale[o]`.
    Int8 {
        /// The quantized values.
        q: &'a [i8],
        /// One scale per output row.
        scale: &'a [f32],
    },
}

impl Weight<'_> {
    fn len(&self) -> usize {
        match self {
            Weight::F32(w) => w.len(),
            Weight::Bf16(w) => w.len(),
            Weight::Int8 { q, .. } => q.len(),
        }
    }

    /// Element `i` as f32 (without the int8 scale).
    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        match self {
            Weight::F32(w) => w[i],
            Weight::Bf16(w) => f32::from_bits((w[i] as u32) << 16),
            Weight::Int8 { q, .. } => q[i] as f32,
        }
    }

    fn row_scale(&self, o: usize) -> f32 {
        match self {
            Weight::Int8 { scale, .. } => scale[o],
            _ => 1.0,
        }
    }
}

/// Lanes of the accumulators: each output element sums its products in 8 interleaved partial
/// sums (k ≡ lane mod 8), then adds them in a fixed tree, then the tail.
const LANES: usize = 8;

/// `y [rows, out] = x [rows, in] Wᵀ (+ bias)`.
pub fn matmul(x: &[f32], rows: usize, w: Weight, out: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let k = x.len() / rows.max(1);
    assert_eq!(x.len(), rows * k, "decode product: x is not [rows, in]");
    assert_eq!(w.len(), out * k, "decode product: the weight is not [out, in]");
    assert_eq!(y.len(), rows * out, "decode product: y is not [rows, out]");
    assert!(bias.is_none_or(|b| b.len() == out), "decode product: the bias is not [out]");
    if rows == 0 || out == 0 {
        return;
    }
    // Blocks of outputs in parallel, each writing its columns of every row.
    let threads = rayon::current_num_threads().max(1);
    let block = (out.div_ceil(4 * threads)).next_multiple_of(3).max(18).min(out);
    let shared = super::SharedOut::new(y);
    (0..out.div_ceil(block)).into_par_iter().for_each(|bi| {
        let o0 = bi * block;
        let n = block.min(out - o0);
        let mut part = vec![0f32; rows * n];
        block_product(x, rows, k, w, o0, n, &mut part);
        for row in part.chunks_mut(n) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *v * w.row_scale(o0 + j) + bias.map_or(0.0, |b| b[o0 + j]);
            }
        }
        for (r, row) in part.chunks(n).enumerate() {
            // SAFETY: block bi alone writes columns o0 .. o0 + n of each row.
            unsafe { shared.write(r * out + o0, row) };
        }
    });
}

/// Outputs `o0 .. o0 + n` for every row, into `dst` [rows, n] (unscaled, no bias).
fn block_product(x: &[f32], rows: usize, k: usize, w: Weight, o0: usize, n: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA; the callee reads x[rows·k], w[(o0+n)·k] and writes
        // dst[n·rows], which the asserts in `matmul` guarantee.
        unsafe { avx2::block_product(x, rows, k, w, o0, n, dst) };
        return;
    }
    for j in 0..n {
        for r in 0..rows {
            dst[r * n + j] = dot(&x[r * k..(r + 1) * k], w, (o0 + j) * k, k);
        }
    }
}

/// The dot product of `x` with the weight row starting at `at`, in the fixed order of the
/// vector path (LANES partial sums, a fixed tree, then the tail).
fn dot(x: &[f32], w: Weight, at: usize, k: usize) -> f32 {
    let mut acc = [0f32; LANES];
    let full = k / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        for l in 0..LANES {
            acc[l] = x[i + l].mul_add(w.at(at + i + l), acc[l]);
        }
    }
    let mut s = tree(acc);
    for i in full..k {
        s = x[i].mul_add(w.at(at + i), s);
    }
    s
}

/// The fixed sum of eight partial sums: ((0+4)+(2+6)) + ((1+5)+(3+7)).
#[inline(always)]
fn tree(a: [f32; LANES]) -> f32 {
    let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Plain version: `y = x Wᵀ (+ bias)` in f64, the weight dequantized first.
pub fn reference(x: &[f32], rows: usize, w: Weight, out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let k = x.len() / rows.max(1);
    (0..rows)
        .flat_map(|r| (0..out).map(move |o| (r, o)))
        .map(|(r, o)| {
            let s: f64 = (0..k).map(|i| x[r * k + i] as f64 * (w.at(o * k + i) * w.row_scale(o)) as f64).sum();
            (s + bias.map_or(0.0, |b| b[o] as f64)) as f32
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Weight, LANES};

    /// Eight weights from `at` as f32.
    #[inline(always)]
    unsafe fn load(w: Weight, at: usize) -> __m256 {
        match w {
            Weight::F32(v) => _mm256_loadu_ps(v.as_ptr().add(at)),
            Weight::Bf16(v) => {
                let h = _mm_loadu_si128(v.as_ptr().add(at) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            Weight::Int8 { q, .. } => {
                let b = _mm_loadl_epi64(q.as_ptr().add(at) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
            }
        }
    }

    /// The sum of the eight lanes in the order of `super::tree`: halves first, then pairs.
    #[inline(always)]
    unsafe fn reduce(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let p = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)))
    }

    /// R rows by O outputs: each (row, output) pair accumulates exactly as `super::dot`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const O: usize>(x: &[f32], r0: usize, k: usize, w: Weight, o: usize, dst: &mut [f32], n: usize, j: usize) {
        let mut acc = [[_mm256_setzero_ps(); O]; R];
        let full = k / LANES * LANES;
        let mut i = 0;
        while i < full {
            let mut wv = [_mm256_setzero_ps(); O];
            for (b, v) in wv.iter_mut().enumerate() {
                *v = load(w, (o + b) * k + i);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.as_ptr().add((r0 + r) * k + i));
                for b in 0..O {
                    a[b] = _mm256_fmadd_ps(xv, wv[b], a[b]);
                }
            }
            i += LANES;
        }
        for r in 0..R {
            for b in 0..O {
                let mut s = reduce(acc[r][b]);
                for t in full..k {
                    s = x[(r0 + r) * k + t].mul_add(w.at((o + b) * k + t), s);
                }
                dst[(r0 + r) * n + j + b] = s;
            }
        }
    }

    /// Runs `tile::<R, O>` for `$rows` rows left, with `O` fixed.
    macro_rules! rows_of {
        ($o:literal, $left:expr, $x:expr, $r:expr, $k:expr, $w:expr, $oj:expr, $dst:expr, $n:expr, $j:expr) => {
            match $left {
                4.. => tile::<4, $o>($x, $r, $k, $w, $oj, $dst, $n, $j),
                3 => tile::<3, $o>($x, $r, $k, $w, $oj, $dst, $n, $j),
                2 => tile::<2, $o>($x, $r, $k, $w, $oj, $dst, $n, $j),
                _ => tile::<1, $o>($x, $r, $k, $w, $oj, $dst, $n, $j),
            }
        };
    }

    /// See `super::block_product`. Tiles of 4 rows by 3 outputs keep 12 accumulators (of the
    /// 16 vector registers) busy for every 7 loads.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_product(x: &[f32], rows: usize, k: usize, w: Weight, o0: usize, n: usize, dst: &mut [f32]) {
        let mut j = 0;
        while j < n {
            let outs = (n - j).min(3);
            let mut r = 0;
            while r < rows {
                match outs {
                    3 => rows_of!(3, rows - r, x, r, k, w, o0 + j, dst, n, j),
                    2 => rows_of!(2, rows - r, x, r, k, w, o0 + j, dst, n, j),
                    _ => rows_of!(1, rows - r, x, r, k, w, o0 + j, dst, n, j),
                }
                r += 4.min(rows - r);
            }
            j += outs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn products_match_the_reference_for_every_weight_type() {
        for (rows, out, k) in [(1, 3, 5), (5, 17, 37), (32, 64, 128), (7, 130, 512)] {
            let x = data(rows * k, 1);
            let w = data(out * k, 2);
            let bias = data(out, 3);
            let bf: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let scale: Vec<f32> = (0..out).map(|o| w[o * k..(o + 1) * k].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).collect();
            let q: Vec<i8> = w.iter().enumerate().map(|(i, v)| (v / scale[i / k]).round() as i8).collect();
            for weight in [Weight::F32(&w), Weight::Bf16(&bf), Weight::Int8 { q: &q, scale: &scale }] {
                let mut y = vec![0f32; rows * out];
                matmul(&x, rows, weight, out, Some(&bias), &mut y);
                let want = reference(&x, rows, weight, out, Some(&bias));
                let worst = y.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1.0)));
                assert!(worst < 1e-5 * k as f32, "{rows}x{out}x{k} {weight:?}: {worst}");
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_in_any_batch() {
        let (out, k) = (70, 93);
        let w = data(out * k, 4);
        let x = data(9 * k, 5);
        let mut all = vec![0f32; 9 * out];
        matmul(&x, 9, Weight::F32(&w), out, None, &mut all);
        for r in 0..9 {
            let mut one = vec![0f32; out];
            matmul(&x[r * k..(r + 1) * k], 1, Weight::F32(&w), out, None, &mut one);
            assert_eq!(one, all[r * out..(r + 1) * out], "row {r}");
            let scalar: Vec<f32> = (0..out).map(|o| dot(&x[r * k..(r + 1) * k], Weight::F32(&w), o * k, k)).collect();
            assert_eq!(one, scalar, "row {r}: the vector path sums as the scalar one");
        }
    }
}
