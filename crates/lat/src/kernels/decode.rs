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

/// A weight kept small for decoding: what a quantized model file holds for each matrix.
#[derive(Clone, PartialEq)]
pub enum Packed {
    /// bfloat16 bits, row-major [out, in].
    Bf16(Vec<u16>),
    /// int8 [out, in] with one scale per output row.
    Int8 {
        /// The quantized values.
        q: Vec<i8>,
        /// One scale per output row.
        scale: Vec<f32>,
    },
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Packed::Bf16(w) => write!(f, "Bf16({} weights)", w.len()),
            Packed::Int8 { q, scale } => write!(f, "Int8({} weights, {} scales)", q.len(), scale.len()),
        }
    }
}

impl Packed {
    /// `w` [out, in] rounded to bfloat16 (to nearest, ties to even).
    pub fn bf16(w: &[f32]) -> Self {
        Packed::Bf16(w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect())
    }

    /// `w` [out, in] in int8 with a scale per output row: `scale = max |w_row| / 127`,
    /// `q = round(w / scale)`, so the error of each weight is at most half its row's scale.
    pub fn int8(w: &[f32], out: usize) -> Self {
        let k = w.len() / out.max(1);
        let mut q = Vec::with_capacity(w.len());
        let mut scale = Vec::with_capacity(out);
        for row in w.chunks(k.max(1)) {
            let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let s = if s > 0.0 { s } else { 1.0 };
            q.extend(row.iter().map(|&v| (v / s).round().clamp(-127.0, 127.0) as i8));
            scale.push(s);
        }
        Packed::Int8 { q, scale }
    }

    /// The view the products read.
    pub fn weight(&self) -> Weight<'_> {
        match self {
            Packed::Bf16(w) => Weight::Bf16(w),
            Packed::Int8 { q, scale } => Weight::Int8 { q, scale },
        }
    }

    /// The weight back in f32 [out, in].
    pub fn dequantize(&self) -> Vec<f32> {
        let w = self.weight();
        let k = w.len() / self.rows().max(1);
        (0..w.len()).map(|i| w.at(i) * w.row_scale(i / k.max(1))).collect()
    }

    fn rows(&self) -> usize {
        match self {
            Packed::Bf16(_) => 1,
            Packed::Int8 { scale, .. } => scale.len(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Packed::Bf16(w) => w.len() * 2,
            Packed::Int8 { q, scale } => q.len() + scale.len() * 4,
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

    /// How far ahead of each weight stream to prefetch, in bytes: the hardware's prefetchers
    /// stop at page boundaries, and batch-1 decoding is bound by how fast the weights arrive.
    const PREFETCH: usize = 4096;

    /// A weight element type: eight of them loaded as f32.
    trait Elem: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        fn to_f32(self) -> f32 {
            self
        }
    }

    /// bfloat16 bits: the high half of an f32.
    impl Elem for u16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
        }
        fn to_f32(self) -> f32 {
            f32::from_bits((self as u32) << 16)
        }
    }

    impl Elem for i8 {
        #[inline(always)]
        unsafe fn load8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        }
        fn to_f32(self) -> f32 {
            self as f32
        }
    }

    /// The sum of the eight lanes in the order of `super::tree`: halves first, then pairs.
    #[inline(always)]
    unsafe fn reduce(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let p = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)))
    }

    /// R rows (from `r0`) by O outputs (from `o`): each (row, output) pair accumulates exactly
    /// as `super::dot`, into `dst[r · n + j + b]`.
    #[inline(always)]
    unsafe fn tile<E: Elem, const R: usize, const O: usize>(x: &[f32], r0: usize, k: usize, w: &[E], o: usize, dst: &mut [f32], n: usize, j: usize) {
        let (xp, wp) = (x.as_ptr().add(r0 * k), w.as_ptr().add(o * k));
        let mut acc = [[_mm256_setzero_ps(); O]; R];
        let full = k / LANES * LANES;
        let mut i = 0;
        while i < full {
            let mut wv = [_mm256_setzero_ps(); O];
            for (b, v) in wv.iter_mut().enumerate() {
                *v = E::load8(wp.add(b * k + i));
                _mm_prefetch::<_MM_HINT_T0>((wp.add(b * k + i) as *const i8).add(PREFETCH));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + i));
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
                    s = x[(r0 + r) * k + t].mul_add(w[(o + b) * k + t].to_f32(), s);
                }
                dst[(r0 + r) * n + j + b] = s;
            }
        }
    }

    /// Outputs `o0 + j ..` of rows `r ..` with O outputs per tile: as many rows (up to 4) at a
    /// time as are left.
    #[inline(always)]
    unsafe fn rows_of<E: Elem, const O: usize>(x: &[f32], rows: std::ops::Range<usize>, k: usize, w: &[E], o: usize, dst: &mut [f32], n: usize, j: usize) {
        let mut r = rows.start;
        while r < rows.end {
            match rows.end - r {
                4.. => tile::<E, 4, O>(x, r, k, w, o, dst, n, j),
                3 => tile::<E, 3, O>(x, r, k, w, o, dst, n, j),
                2 => tile::<E, 2, O>(x, r, k, w, o, dst, n, j),
                _ => tile::<E, 1, O>(x, r, k, w, o, dst, n, j),
            }
            r += 4.min(rows.end - r);
        }
    }

    /// See `super::block_product`. Tiles of 4 rows by 3 outputs keep 12 accumulators (of the
    /// 16 vector registers) busy for every 7 loads; one or two rows take 6 outputs at a time,
    /// so that enough weight rows stream at once.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<E: Elem>(x: &[f32], rows: usize, k: usize, w: &[E], o0: usize, n: usize, dst: &mut [f32]) {
        let mut j = 0;
        while j < n {
            let outs = (n - j).min(if rows <= 2 { 6 } else { 3 });
            match outs {
                6 => rows_of::<E, 6>(x, 0..rows, k, w, o0 + j, dst, n, j),
                5 => rows_of::<E, 5>(x, 0..rows, k, w, o0 + j, dst, n, j),
                4 => rows_of::<E, 4>(x, 0..rows, k, w, o0 + j, dst, n, j),
                3 => rows_of::<E, 3>(x, 0..rows, k, w, o0 + j, dst, n, j),
                2 => rows_of::<E, 2>(x, 0..rows, k, w, o0 + j, dst, n, j),
                _ => rows_of::<E, 1>(x, 0..rows, k, w, o0 + j, dst, n, j),
            }
            j += outs;
        }
    }

    /// See `super::block_product`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_product(x: &[f32], rows: usize, k: usize, w: Weight, o0: usize, n: usize, dst: &mut [f32]) {
        match w {
            Weight::F32(w) => block(x, rows, k, w, o0, n, dst),
            Weight::Bf16(w) => block(x, rows, k, w, o0, n, dst),
            Weight::Int8 { q, .. } => block(x, rows, k, q, o0, n, dst),
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
    fn quantized_weights_round_trip_within_their_error() {
        let (out, k) = (9, 50);
        let w = data(out * k, 6);
        let back = Packed::bf16(&w).dequantize();
        assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= a.abs() / 256.0), "bf16 keeps 8 bits of mantissa");
        let p = Packed::int8(&w, out);
        let back = p.dequantize();
        let Packed::Int8 { scale, .. } = &p else { unreachable!("int8") };
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            assert!((a - b).abs() <= scale[i / k] * 0.5 + 1e-7, "int8 weight {i}: {a} vs {b}");
        }
        assert_eq!(p.bytes(), out * k + out * 4);
        assert_eq!(Packed::int8(&vec![0.0; 6], 2).dequantize(), vec![0.0; 6]);
    }

    #[test]
    fn quantized_products_stay_within_the_quantisation_error_of_f32() {
        let (rows, out, k) = (6, 40, 300);
        let x = data(rows * k, 7);
        let w = data(out * k, 8);
        let exact = reference(&x, rows, Weight::F32(&w), out, None);
        // |Σ x_i (w_i - ŵ_i)| ≤ Σ |x_i| · max_i |w_i - ŵ_i|: each weight's own bound.
        let bound = |r: usize, per_weight: f32| x[r * k..(r + 1) * k].iter().map(|v| v.abs()).sum::<f32>() * per_weight;
        for packed in [Packed::bf16(&w), Packed::int8(&w, out)] {
            let mut y = vec![0f32; rows * out];
            matmul(&x, rows, packed.weight(), out, None, &mut y);
            let mut typical = 0f32;
            for r in 0..rows {
                for o in 0..out {
                    let row = &w[o * k..(o + 1) * k];
                    let per_weight = match &packed {
                        Packed::Bf16(_) => row.iter().fold(0f32, |m, v| m.max(v.abs())) / 256.0,
                        Packed::Int8 { scale, .. } => scale[o] / 2.0,
                    };
                    let err = (y[r * out + o] - exact[r * out + o]).abs();
                    assert!(err <= bound(r, per_weight) + 1e-4, "{packed:?} ({r}, {o}): {err}");
                    typical = typical.max(err / bound(r, per_weight));
                }
            }
            // Rounding errors mostly cancel: far inside the worst case.
            assert!(typical < 0.2, "{packed:?}: {typical}");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_in_any_batch() {
        let (out, k) = (70, 93);
        let w = data(out * k, 4);
        let x = data(9 * k, 5);
        let (bf, q8) = (Packed::bf16(&w), Packed::int8(&w, out));
        for weight in [Weight::F32(&w), bf.weight(), q8.weight()] {
            let one: Vec<Vec<f32>> = (0..9)
                .map(|r| {
                    let mut y = vec![0f32; out];
                    matmul(&x[r * k..(r + 1) * k], 1, weight, out, None, &mut y);
                    y
                })
                .collect();
            for r in 0..9 {
                let scalar: Vec<f32> = (0..out).map(|o| dot(&x[r * k..(r + 1) * k], weight, o * k, k) * weight.row_scale(o)).collect();
                assert_eq!(one[r], scalar, "{weight:?} row {r}: the vector path sums as the scalar one");
            }
            // Every tile shape: 1 and 2 rows take six outputs at a time, more rows three.
            for rows in [2, 3, 5, 9] {
                let mut all = vec![0f32; rows * out];
                matmul(&x[..rows * k], rows, weight, out, None, &mut all);
                for r in 0..rows {
                    assert_eq!(one[r], all[r * out..(r + 1) * out], "{weight:?}: row {r} of {rows}");
                }
            }
        }
    }
}
