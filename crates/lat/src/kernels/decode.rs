//! The products of a decoding step: `y = x Wᵀ (+ b)` for a few rows `x` [rows, in] (one per
//! stream) against a weight [out, in]. A decoding step is bound by reading the weights, so they
//! are streamed from memory once for all rows (larger batches re-read a block from the caches);
//! and each output element is one dot product summed in one order whatever the number of rows,
//! so a stream's logits do not depend on what else is in its batch. Weights are f32, bf16, or int8
//! with one scale per output channel, dequantized on the fly into f32 accumulation.
//!
//! An f32 weight is the model's own [out, in], which training's products share: each output
//! is a dot product in eight interleaved partial sums (input i in lane i mod 8), added in a
//! fixed tree, then the tail. A quantized weight is ours to lay out, so it is kept in panels of
//! 32 outputs stored [in][32] ([`Panels`]): each output sums first to last along its own vector
//! lane, one weight vector serves up to six rows, and the weights are read front to back.
//! Either way the order of an output's sum depends on the weight alone, never on the rows.
//!
//! The fast path uses AVX2 and FMA, and AVX-512 for three or more rows (picked at run time, with
//! the same bits); [`reference`] is the plain version.

use rayon::prelude::*;

use super::{LineVec, Plain};

/// Outputs per panel.
const PANEL: usize = 32;

/// A weight for [`matmul`].
#[derive(Clone, Copy, Debug)]
pub enum Weight<'a> {
    /// float32 [out, in], row-major.
    F32(&'a [f32]),
    /// A quantized weight in the decoding layout.
    Panels(&'a Panels),
}

impl Weight<'_> {
    /// Element (o, i) as f32, without the int8 scale.
    #[inline(always)]
    fn at(&self, o: usize, i: usize, k: usize) -> f32 {
        match self {
            Weight::F32(w) => w[o * k + i],
            Weight::Panels(p) => p.at(o, i),
        }
    }

    fn scale(&self, o: usize) -> f32 {
        match self {
            Weight::F32(_) => 1.0,
            Weight::Panels(p) => p.scale(o),
        }
    }

    /// The int8 scales of the outputs, if any.
    fn scales(&self) -> Option<&[f32]> {
        match self {
            Weight::Panels(Panels { values: Values::Int8 { scale, .. }, .. }) => Some(scale),
            _ => None,
        }
    }

    /// Whether the weight is [out, k].
    fn is(&self, out: usize, k: usize) -> bool {
        match self {
            Weight::F32(w) => w.len() == out * k,
            Weight::Panels(p) => (p.out, p.k) == (out, k),
        }
    }
}

/// A linear layer's weight quantized, [out, in] row-major, as a quantized model file holds it.
#[derive(Clone, PartialEq)]
pub enum Packed {
    /// bfloat16 bits.
    Bf16(Vec<u16>),
    /// int8 with one scale per output row: `w[o][i] = q[o][i] · scale[o]`.
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

    /// The weight back in f32 [out, in].
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Packed::Bf16(w) => w.iter().map(|&b| bf16_to_f32(b)).collect(),
            Packed::Int8 { q, scale } => {
                let k = q.len() / scale.len().max(1);
                q.iter().enumerate().map(|(i, &v)| v as f32 * scale[i / k.max(1)]).collect()
            }
        }
    }
}

/// A quantized weight [out, in] in the decoding layout: panels of 32 output rows, each stored
/// [in][32], the last one padded with zero rows (at most 31 more rows read per product). A
/// product streams each panel front to back, for one or two rows once, for more rows once per
/// six rows and 16 outputs (from the caches after the first pass: a panel is 64 bytes per input
/// in bf16, 32 in int8).
#[derive(Clone, PartialEq)]
pub struct Panels {
    out: usize,
    k: usize,
    values: Values,
}

#[derive(Clone, PartialEq)]
enum Values {
    Bf16(LineVec<u16>),
    Int8 { q: LineVec<i8>, scale: Vec<f32> },
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.values {
            Values::Bf16(_) => "bf16",
            Values::Int8 { .. } => "int8",
        };
        write!(f, "Panels({kind} [{}, {}])", self.out, self.k)
    }
}

impl Panels {
    /// `packed` [out, in] laid out for decoding.
    pub fn new(packed: &Packed, out: usize) -> Self {
        let (len, values) = match packed {
            Packed::Bf16(w) => (w.len(), Values::Bf16(turned(w, out))),
            Packed::Int8 { q, scale } => (q.len(), Values::Int8 { q: turned(q, out), scale: scale.clone() }),
        };
        Self { out, k: len / out.max(1), values }
    }

    /// Element (o, i), without the int8 scale.
    fn at(&self, o: usize, i: usize) -> f32 {
        let at = panel_offset(o, i, self.k);
        match &self.values {
            Values::Bf16(w) => bf16_to_f32(w[at]),
            Values::Int8 { q, .. } => q[at] as f32,
        }
    }

    fn scale(&self, o: usize) -> f32 {
        match &self.values {
            Values::Bf16(_) => 1.0,
            Values::Int8 { scale, .. } => scale[o],
        }
    }
}

/// Where element (o, i) of a weight [out, k] lies in its panels [out / PANEL][k][PANEL].
fn panel_offset(o: usize, i: usize, k: usize) -> usize {
    (o / PANEL * k + i) * PANEL + o % PANEL
}

/// `w` [out, k] in panels, zero-padded to whole panels; each panel's row of an input starts a
/// cache line (bf16) or half of one (int8).
fn turned<T: Plain>(w: &[T], out: usize) -> LineVec<T> {
    let k = w.len() / out.max(1);
    let mut t = LineVec::zeroed(out.div_ceil(PANEL) * k * PANEL);
    for (o, row) in w.chunks(k.max(1)).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            t[panel_offset(o, i, k)] = v;
        }
    }
    t
}

/// bfloat16 bits as the f32 whose high half they are.
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Lanes of an f32 product's partial sums.
const LANES: usize = 8;

/// One product of [`matmul_all`]: `y [rows, out] = x Wᵀ (+ bias)`, or `gelu(x Wᵀ + bias)`.
#[derive(Clone, Copy)]
pub struct Product<'a> {
    /// The weight [out, in].
    pub w: Weight<'a>,
    /// Number of outputs (columns of `y`).
    pub out: usize,
    /// [out], added after the product.
    pub bias: Option<&'a [f32]>,
    /// GELU after the bias (which it needs): the feed-forward layer's activation, done while
    /// the block's outputs are at hand instead of in a pass of its own.
    pub gelu: bool,
}

/// `y [rows, out] = x [rows, in] Wᵀ (+ bias)`.
pub fn matmul(x: &[f32], rows: usize, w: Weight, out: usize, bias: Option<&[f32]>) -> Vec<f32> {
    matmul_all(x, rows, &[Product { w, out, bias, gelu: false }]).remove(0)
}

/// Several products of the same rows `x` [rows, in] (a layer's queries, keys and values) as one
/// parallel loop: the threads are handed work once, and the rows are interleaved once. Returns
/// each product's `y` [rows, out].
pub fn matmul_all(x: &[f32], rows: usize, products: &[Product]) -> Vec<Vec<f32>> {
    // Every element is written once by its block: no zeroing first.
    let mut ys: Vec<Vec<f32>> = products.iter().map(|p| Vec::with_capacity(rows * p.out)).collect();
    if rows == 0 {
        assert!(x.is_empty(), "decode product: no rows, but x is not empty");
        return ys;
    }
    let k = x.len() / rows;
    assert_eq!(x.len(), rows * k, "decode product: x is not [rows, in]");
    for p in products {
        assert!(p.w.is(p.out, k), "decode product: the weight is not [out, in]");
        assert!(p.bias.is_none_or(|b| b.len() == p.out), "decode product: the bias is not [out]");
        assert!(!p.gelu || p.bias.is_some(), "decode product: GELU comes after a bias");
    }
    // Blocks of outputs in parallel (whole tiles of three or six, or whole panels), each writing
    // its columns of every row of its product: about eight blocks a thread, of even sizes within
    // each product, so that the threads finish together.
    let total: usize = products.iter().map(|p| p.out).sum();
    let per_block = total.div_ceil(8 * rayon::current_num_threads().max(1)).max(1);
    let mut blocks = Vec::new();
    for (i, p) in products.iter().enumerate().filter(|(_, p)| p.out > 0) {
        let even = p.out.div_ceil(p.out.div_ceil(per_block));
        let block = match p.w {
            Weight::F32(_) => even.next_multiple_of(6).max(18),
            Weight::Panels(_) => even.next_multiple_of(PANEL),
        };
        blocks.extend((0..p.out).step_by(block).map(|o0| (i, o0, block.min(p.out - o0))));
    }
    let outs: Vec<_> = ys.iter_mut().zip(products).map(|(y, p)| super::SharedOut::uninit(&mut y.spare_capacity_mut()[..rows * p.out])).collect();
    let xs = match products.iter().any(|p| matches!(p.w, Weight::F32(_))) {
        true => Interleaved::new(x, rows, k),
        false => Interleaved::default(),
    };
    blocks.into_par_iter().for_each(|(i, o0, n)| {
        let Product { w, out, bias, gelu } = products[i];
        let (scales, bias) = (w.scales().map(|s| &s[o0..o0 + n]), bias.map(|b| &b[o0..o0 + n]));
        let mut act = vec![0f32; if gelu { n } else { 0 }];
        // A row of the block's sums made final in place: scaled, biased, GELU.
        let mut finish = |row: &mut [f32]| {
            if let Some(scales) = scales {
                row.iter_mut().zip(scales).for_each(|(v, s)| *v *= s);
            }
            match bias {
                // The same sums as a GELU pass over the biased outputs would make.
                Some(bias) if gelu => {
                    super::gelu::gelu_rows(&mut act, row, bias);
                    row.copy_from_slice(&act);
                }
                Some(bias) => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
                None => {}
            }
        };
        match w {
            Weight::F32(w) => {
                // Straight into the output. SAFETY: this block alone writes (and then reads)
                // columns o0 .. o0 + n of each row of product i, and writes every one of them.
                let dst = unsafe { Dst::new(outs[i].at(o0), out, rows, n) };
                f32_block(x, &xs, rows, k, w, o0, n, dst);
                (0..rows).for_each(|r| finish(unsafe { outs[i].slice(r * out + o0, n) }));
            }
            Weight::Panels(p) => {
                // Panels are written whole: rows of whole panels, of which the first n are kept.
                let stride = n.next_multiple_of(PANEL);
                let mut part = vec![0f32; rows * stride];
                panel_block(x, rows, k, p, o0, n, stride, &mut part);
                for (r, row) in part.chunks_mut(stride).enumerate() {
                    let row = &mut row[..n];
                    finish(row);
                    // SAFETY: as above.
                    unsafe { outs[i].write(r * out + o0, row) };
                }
            }
        }
    });
    for (y, p) in ys.iter_mut().zip(products) {
        // SAFETY: the blocks wrote columns 0 .. out of every row.
        unsafe { y.set_len(rows * p.out) };
    }
    ys
}

/// The rows of `x` [rows, k] for the f32 products, in groups of [`GROUP`] rows (the last may
/// have fewer), each group's first `k / LANES · LANES` inputs interleaved eight at a time,
/// [k / 8][rows of the group][8]: a tile reads its rows' next vectors from one place. Where
/// tiles read rows in pairs (AVX-512, more than two rows), an odd last group has a zero row
/// more. The inputs past the last whole eight stay in `x`. Each group starts a cache line, so
/// AVX-512's loads of two rows' eight inputs are whole lines.
#[derive(Default)]
struct Interleaved {
    values: LineVec<f32>,
    /// Whole eights per row.
    chunks: usize,
    /// Rows stored, with the zero row.
    rows: usize,
}

/// Rows per group of [`Interleaved`]: the rows of one f32 tile.
const GROUP: usize = 4;

impl Interleaved {
    fn new(x: &[f32], rows: usize, k: usize) -> Self {
        let chunks = k / LANES;
        let stored = if rows > 2 { rows.next_multiple_of(2) } else { rows };
        // Written front to back, so never zeroed first.
        let mut values = LineVec::with_capacity(stored * chunks * LANES);
        for g in 0..stored.div_ceil(GROUP) {
            let group = g * GROUP..(g * GROUP + GROUP).min(stored);
            for c in 0..chunks {
                for r in group.clone() {
                    let eight = if r < rows { &x[r * k + c * LANES..][..LANES] } else { &[0.0; LANES] };
                    values.extend_from_slice(eight);
                }
            }
        }
        Self { values, chunks, rows: stored }
    }

    /// Rows stored in group `g`: one input vector of each lies `width · LANES` after the last.
    fn width(&self, g: usize) -> usize {
        (self.rows - g * GROUP).min(GROUP)
    }

    /// Group `g` (rows `GROUP · g ..`) and its width.
    fn group(&self, g: usize) -> (&[f32], usize) {
        let (at, width) = (g * GROUP * self.chunks * LANES, self.width(g));
        (&self.values[at..at + width * self.chunks * LANES], width)
    }
}

/// Where an f32 block's sums go: its element (r, c) at `ptr + r · stride + c`, in place in the
/// product's output, whose other columns other blocks write at the same time. `rows` and `cols`
/// bound the block, checked in debug builds (a write past them would land in another block's).
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    stride: usize,
    rows: usize,
    cols: usize,
}

impl Dst {
    /// # Safety
    /// `ptr` with `stride` covers the block's `rows` x `cols`, which no other thread touches.
    unsafe fn new(ptr: *mut f32, stride: usize, rows: usize, cols: usize) -> Self {
        Self { ptr, stride, rows, cols }
    }

    /// # Safety
    /// As for [`Dst::new`]; (r, c) lies in the block.
    #[inline(always)]
    unsafe fn set(self, r: usize, c: usize, v: f32) {
        debug_assert!(r < self.rows && c < self.cols, "decode product: ({r}, {c}) is outside the block's {} x {}", self.rows, self.cols);
        *self.ptr.add(r * self.stride + c) = v;
    }
}

/// f32 outputs `o0 .. o0 + n` for every row, into `dst` (no bias).
#[allow(clippy::too_many_arguments)]
fn f32_block(x: &[f32], xs: &Interleaved, rows: usize, k: usize, w: &[f32], o0: usize, n: usize, dst: Dst) {
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    if rows > 2 && super::has_avx512() {
        // SAFETY: the CPU has AVX-512 F and DQ; the bounds are those of the AVX2 path.
        unsafe { avx512::block(x, xs, rows, k, w, o0, n, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA; the asserts in `matmul_all` bound every access.
        unsafe { avx2::block(x, xs, rows, k, w, o0, n, dst) };
        return;
    }
    for r in 0..rows {
        for j in 0..n {
            // SAFETY: (r, j) is in the block.
            unsafe { dst.set(r, j, dot(&x[r * k..(r + 1) * k], Weight::F32(w), o0 + j, k)) };
        }
    }
}

/// Quantized outputs `o0 .. o0 + n` (whole panels from a panel's start) for every row, into
/// `part` [rows, stride] (unscaled, no bias).
#[allow(clippy::too_many_arguments)]
fn panel_block(x: &[f32], rows: usize, k: usize, p: &Panels, o0: usize, n: usize, stride: usize, part: &mut [f32]) {
    debug_assert_eq!(o0 % PANEL, 0, "blocks of panels start at a panel");
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    if rows > 2 && super::has_avx512() {
        // SAFETY: the CPU has AVX-512 F and DQ; the bounds are those of the AVX2 path.
        unsafe { avx512::panel_block(x, rows, k, p, o0, n, stride, part) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        for col in (0..n).step_by(PANEL) {
            let at = panel_offset(o0 + col, 0, k);
            // SAFETY: the CPU has AVX2 and FMA; the asserts in `matmul_all`, the panel layout
            // (whole panels from o0) and `stride` bound every access.
            unsafe {
                match &p.values {
                    Values::Bf16(v) => avx2::rows_by_panel(x, rows, k, v[at..].as_ptr(), part, stride, col),
                    Values::Int8 { q, .. } => avx2::rows_by_panel(x, rows, k, q[at..].as_ptr(), part, stride, col),
                }
            }
        }
        return;
    }
    for r in 0..rows {
        for j in 0..n {
            part[r * stride + j] = dot(&x[r * k..(r + 1) * k], Weight::Panels(p), o0 + j, k);
        }
    }
}

/// The dot product of `x` with output row `o` of the weight, in the order of the vector path:
/// for f32, LANES partial sums, a fixed tree, then the tail; for panels, first to last.
fn dot(x: &[f32], w: Weight, o: usize, k: usize) -> f32 {
    if matches!(w, Weight::Panels(_)) {
        return (0..k).fold(0f32, |s, i| x[i].mul_add(w.at(o, i, k), s));
    }
    let mut acc = [0f32; LANES];
    let full = k / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = x[i + l].mul_add(w.at(o, i + l, k), *a);
        }
    }
    (full..k).fold(tree(acc), |s, i| x[i].mul_add(w.at(o, i, k), s))
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
            let s: f64 = (0..k).map(|i| x[r * k + i] as f64 * (w.at(o, i, k) * w.scale(o)) as f64).sum();
            (s + bias.map_or(0.0, |b| b[o] as f64)) as f32
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Dst, Interleaved, GROUP, LANES, PANEL};

    /// How far ahead of each weight stream to prefetch, in bytes: the hardware's prefetchers
    /// stop at page boundaries, and batch-1 decoding is bound by how fast the weights arrive.
    pub(super) const PREFETCH: usize = 4096;

    /// A quantized element type: eight of them loaded as f32.
    pub trait Elem: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
    }

    /// bfloat16 bits: the high half of an f32.
    impl Elem for u16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
        }
    }

    impl Elem for i8 {
        #[inline(always)]
        unsafe fn load8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        }
    }

    /// The sum of the eight lanes in the order of `super::tree`: halves first, then pairs.
    #[inline(always)]
    pub(super) unsafe fn reduce(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let p = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)))
    }

    /// The sums of `acc` into `totals`, each in the tree of [`reduce`], eight at a time.
    #[inline(always)]
    unsafe fn reduce_all(acc: &[__m256], totals: &mut [f32]) {
        for (chunk, totals) in acc.chunks(8).zip(totals.chunks_mut(8)) {
            let Ok(eight) = <[__m256; 8]>::try_from(chunk) else {
                chunk.iter().zip(totals).for_each(|(a, t)| *t = reduce(*a));
                continue;
            };
            let mut sums = [0f32; 8];
            _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(eight));
            for (i, &s) in sums.iter().enumerate() {
                totals[if i < 4 { 2 * i } else { 2 * (i - 4) + 1 }] = s;
            }
        }
    }

    /// Eight sums at once, [a0, a2, a4, a6, a1, a3, a5, a7], each added as `reduce` adds it:
    /// the halves (`a[i] + a[i + 4]`), then `h[0] + h[2]` and `h[1] + h[3]`, then the pair,
    /// shuffled so that each step adds whole registers.
    #[inline(always)]
    unsafe fn reduce8(a: [__m256; 8]) -> __m256 {
        let halves = |x, y| _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y));
        let pairs = |a, b| _mm256_add_ps(_mm256_shuffle_ps::<0b01_00_01_00>(a, b), _mm256_shuffle_ps::<0b11_10_11_10>(a, b));
        let (front, back) = (pairs(halves(a[0], a[1]), halves(a[2], a[3])), pairs(halves(a[4], a[5]), halves(a[6], a[7])));
        _mm256_add_ps(_mm256_shuffle_ps::<0b10_00_10_00>(front, back), _mm256_shuffle_ps::<0b11_01_11_01>(front, back))
    }

    /// How an f32 tile prefetches weights: one or two rows stream them from memory, each
    /// weight row [`PREFETCH`] bytes ahead; more rows re-read each tile's weights from L1 once
    /// per group of rows, and fetch the next tile's during all of those passes, each pass
    /// `lines` cache lines from `next`, one per iteration, so that memory is busy the whole time.
    #[derive(Clone, Copy)]
    enum Ahead {
        Rows,
        Next { next: *const i8, lines: usize },
    }

    /// f32: the R rows of an interleaved group `xs` (rows `r0 ..`) by O outputs (from `o`):
    /// each (row, output) pair accumulates exactly as `super::dot`, into `dst` at (r, j + b).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_tile<const R: usize, const W: usize, const O: usize>((xs, width): (&[f32], usize), x: &[f32], r0: usize, k: usize, w: &[f32], o: usize, dst: Dst, j: usize, ahead: Ahead) {
        let full = k / LANES * LANES;
        debug_assert!(R <= W && W == width && xs.len() == W * full && w.len() >= (o + O) * k);
        let acc = sums::<R, W, O>(xs.as_ptr(), w.as_ptr().add(o * k), k, full / LANES, ahead);
        let mut totals = [0f32; 4 * 6];
        reduce_all(acc.as_flattened(), &mut totals);
        for r in 0..R {
            for b in 0..O {
                let mut s = totals[r * O + b];
                for t in full..k {
                    s = x[(r0 + r) * k + t].mul_add(w[(o + b) * k + t], s);
                }
                dst.set(r0 + r, j + b, s);
            }
        }
    }

    /// The tile's loop over the inputs: R · O sums, each in eight lanes, of rows in a group of
    /// width W (a constant, so that the loop keeps its registers for the weight rows).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sums<const R: usize, const W: usize, const O: usize>(mut xp: *const f32, mut wp: *const f32, k: usize, iters: usize, ahead: Ahead) -> [[__m256; O]; R] {
        let mut acc = [[_mm256_setzero_ps(); O]; R];
        for i in 0..iters {
            match ahead {
                Ahead::Rows => (0..O).for_each(|b| _mm_prefetch::<_MM_HINT_T0>((wp.add(b * k) as *const i8).wrapping_add(PREFETCH))),
                Ahead::Next { next, lines } if i < lines => _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * i)),
                Ahead::Next { .. } => {}
            }
            let mut wv = [_mm256_setzero_ps(); O];
            for (b, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(b * k));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * LANES));
                for b in 0..O {
                    a[b] = _mm256_fmadd_ps(xv, wv[b], a[b]);
                }
            }
            xp = xp.add(W * LANES);
            wp = wp.add(LANES);
        }
        acc
    }

    /// f32: `outs` (at most O) outputs from `o0 + j` for every row of group `g`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_group<const O: usize>(xs: &Interleaved, x: &[f32], rows: usize, g: usize, k: usize, w: &[f32], o: usize, outs: usize, dst: Dst, j: usize, ahead: Ahead) {
        let (xg, r0) = (xs.group(g), g * GROUP);
        macro_rules! outs {
            ($r:literal, $w:literal) => {
                match outs {
                    6.. if O >= 6 => dot_tile::<$r, $w, 6>(xg, x, r0, k, w, o, dst, j, ahead),
                    5 if O >= 5 => dot_tile::<$r, $w, 5>(xg, x, r0, k, w, o, dst, j, ahead),
                    4 if O >= 4 => dot_tile::<$r, $w, 4>(xg, x, r0, k, w, o, dst, j, ahead),
                    3.. => dot_tile::<$r, $w, 3>(xg, x, r0, k, w, o, dst, j, ahead),
                    2 => dot_tile::<$r, $w, 2>(xg, x, r0, k, w, o, dst, j, ahead),
                    _ => dot_tile::<$r, $w, 1>(xg, x, r0, k, w, o, dst, j, ahead),
                }
            };
        }
        // The rows left and the group's width: an odd last group of more than two rows in all
        // has a zero row more (see `Interleaved`).
        match (rows - r0, xg.1) {
            (4.., _) => outs!(4, 4),
            (3, _) => outs!(3, 4),
            (2, _) => outs!(2, 2),
            (1, 2) => outs!(1, 2),
            _ => outs!(1, 1),
        }
    }

    /// f32, see `super::f32_block`. One or two rows read the weights once, six outputs at
    /// a time so that enough weight rows stream at once. More rows take three outputs at a
    /// time by each group of four rows: 12 accumulators (of the 16 vector registers) for every
    /// 7 loads, the three weight rows from L1 after the first group; meanwhile the next three
    /// rows (contiguous in [out, in]) come from memory, a share in each group's pass.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(x: &[f32], xs: &Interleaved, rows: usize, k: usize, w: &[f32], o0: usize, n: usize, dst: Dst) {
        if rows <= 2 {
            return few_rows(x, xs, rows, k, w, o0, n, dst);
        }
        let groups = rows.div_ceil(GROUP);
        let lines = (3 * k * 4).div_ceil(64 * groups);
        for j in (0..n).step_by(3) {
            // Past the last tile this points beyond the weight: prefetching never faults.
            let next = w.as_ptr().wrapping_add((o0 + j + 3) * k) as *const i8;
            for g in 0..groups {
                let ahead = Ahead::Next { next: next.wrapping_add(64 * lines * g), lines };
                dot_group::<3>(xs, x, rows, g, k, w, o0 + j, n - j, dst, j, ahead);
            }
        }
    }

    /// f32, one or two rows: a function of its own, so that its loop, bound by how fast the
    /// weights arrive, has the registers to itself.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn few_rows(x: &[f32], xs: &Interleaved, rows: usize, k: usize, w: &[f32], o0: usize, n: usize, dst: Dst) {
        for j in (0..n).step_by(6) {
            dot_group::<6>(xs, x, rows, 0, k, w, o0 + j, n - j, dst, j, Ahead::Rows);
        }
    }

    /// Panels: rows `r0 .. r0 + R` against the panel's columns `c .. c + 8 · V`, into
    /// `part[r · stride + col + c ..]`. R · V accumulators, each summing its products first to
    /// last as `super::dot`; at most 12 of the 16 vector registers, so that the V weight
    /// vectors and a broadcast fit beside them.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<E: Elem, const R: usize, const V: usize>(x: &[f32], r0: usize, k: usize, panel: *const E, c: usize, part: &mut [f32], stride: usize, col: usize) {
        let (xp, pp) = (x.as_ptr().add(r0 * k), panel.add(c));
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for i in 0..k {
            let p = pp.add(i * PANEL);
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
            let mut wv = [_mm256_setzero_ps(); V];
            for (v, w) in wv.iter_mut().enumerate() {
                *w = E::load8(p.add(8 * v));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xp.add(r * k + i));
                for (a, w) in a.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *w, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, a) in a.iter().enumerate() {
                _mm256_storeu_ps(part.as_mut_ptr().add((r0 + r) * stride + col + c + 8 * v), *a);
            }
        }
    }

    /// Panels: R rows from `r0` across the whole panel, 16 outputs at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn halves<E: Elem, const R: usize>(x: &[f32], r0: usize, k: usize, panel: *const E, part: &mut [f32], stride: usize, col: usize) {
        tile::<E, R, 2>(x, r0, k, panel, 0, part, stride, col);
        tile::<E, R, 2>(x, r0, k, panel, 16, part, stride, col);
    }

    /// Every row against one panel [k, PANEL] into columns `col .. col + PANEL` of `part`
    /// [rows, stride]. Six rows by 16 outputs (12 accumulators) while six are left; one or two
    /// rows take all 32 outputs at once, so that enough sums are in flight to hide the FMA's
    /// latency.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_by_panel<E: Elem>(x: &[f32], rows: usize, k: usize, panel: *const E, part: &mut [f32], stride: usize, col: usize) {
        let mut r = 0;
        while rows - r >= 6 {
            halves::<E, 6>(x, r, k, panel, part, stride, col);
            r += 6;
        }
        match rows - r {
            5 => halves::<E, 5>(x, r, k, panel, part, stride, col),
            4 => halves::<E, 4>(x, r, k, panel, part, stride, col),
            3 => halves::<E, 3>(x, r, k, panel, part, stride, col),
            2 => tile::<E, 2, 4>(x, r, k, panel, 0, part, stride, col),
            1 => tile::<E, 1, 4>(x, r, k, panel, 0, part, stride, col),
            _ => {}
        }
    }
}

/// Three or more rows are bound by the FMAs, not by reading the weights: where the CPU has
/// AVX-512, registers twice as wide (and twice as many) do twice the work per instruction.
/// Every lane sums exactly what the AVX2 path's does, in the same order: the same bits.
#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
mod avx512 {
    use std::arch::x86_64::*;

    use super::avx2::{reduce, PREFETCH};
    use super::{panel_offset, Dst, Interleaved, Panels, Values, GROUP, LANES, PANEL};

    /// Outputs of an f32 tile.
    const OUTS: usize = 6;
    /// Rows of a tile: two interleaved groups for f32.
    const ROWS: usize = 2 * GROUP;

    /// See `super::panel_block`, for three or more rows.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel_block(x: &[f32], rows: usize, k: usize, p: &Panels, o0: usize, n: usize, stride: usize, part: &mut [f32]) {
        for col in (0..n).step_by(PANEL) {
            let at = panel_offset(o0 + col, 0, k);
            match &p.values {
                Values::Bf16(v) => rows_by_panel(x, rows, k, v[at..].as_ptr(), part, stride, col),
                Values::Int8 { q, .. } => rows_by_panel(x, rows, k, q[at..].as_ptr(), part, stride, col),
            }
        }
    }

    /// f32: eight rows by six outputs at a time, each register two rows' eight lanes of one
    /// output (24 accumulators of the 32 registers, 10 loads for 24 FMAs). The first pass over
    /// a tile's weights reads them from memory, the others from the caches, and every pass
    /// fetches a share of the next tile's.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(x: &[f32], xs: &Interleaved, rows: usize, k: usize, w: &[f32], o0: usize, n: usize, dst: Dst) {
        let passes = rows.div_ceil(ROWS);
        let lines = (OUTS * k * 4).div_ceil(64 * passes);
        for j in (0..n).step_by(OUTS) {
            // Past the last tile this points beyond the weight: prefetching never faults.
            let next = w.as_ptr().wrapping_add((o0 + j + OUTS) * k) as *const i8;
            for pass in 0..passes {
                let r0 = pass * ROWS;
                let groups = [xs.group(2 * pass), if rows - r0 > GROUP { xs.group(2 * pass + 1) } else { xs.group(2 * pass) }];
                let ahead = (next.wrapping_add(64 * lines * pass), lines);
                macro_rules! outs {
                    ($p:literal) => {
                        match n - j {
                            6.. => tile::<$p, 6>(groups, x, rows, r0, k, w, o0 + j, dst, j, ahead),
                            5 => tile::<$p, 5>(groups, x, rows, r0, k, w, o0 + j, dst, j, ahead),
                            4 => tile::<$p, 4>(groups, x, rows, r0, k, w, o0 + j, dst, j, ahead),
                            3 => tile::<$p, 3>(groups, x, rows, r0, k, w, o0 + j, dst, j, ahead),
                            2 => tile::<$p, 2>(groups, x, rows, r0, k, w, o0 + j, dst, j, ahead),
                            _ => tile::<$p, 1>(groups, x, rows, r0, k, w, o0 + j, dst, j, ahead),
                        }
                    };
                }
                match (rows - r0).div_ceil(2) {
                    4.. => outs!(4),
                    3 => outs!(3),
                    2 => outs!(2),
                    _ => outs!(1),
                }
            }
        }
    }

    /// f32: P row pairs from `r0` (in `groups`, two pairs each) by O outputs from `o`, into
    /// `dst` at (r, j + b) for the rows below `rows`; each (row, output) sums exactly as
    /// `super::dot`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const P: usize, const O: usize>(groups: [(&[f32], usize); 2], x: &[f32], rows: usize, r0: usize, k: usize, w: &[f32], o: usize, dst: Dst, j: usize, ahead: (*const i8, usize)) {
        let full = k / LANES * LANES;
        debug_assert!(groups.iter().all(|&(g, width)| width % 2 == 0 && g.len() == width * full) && w.len() >= (o + O) * k);
        let acc = sums::<P, O>(groups.map(|(g, width)| (g.as_ptr(), width * LANES)), w.as_ptr().add(o * k), k, full / LANES, ahead);
        if P == ROWS / 2 && O == OUTS && r0 + ROWS <= rows {
            let mut totals = [[0f32; OUTS]; ROWS];
            reduce_whole_tile(acc.as_flattened(), &mut totals);
            for (r, totals) in totals.iter().enumerate() {
                let r = r0 + r;
                for (b, &total) in totals.iter().enumerate() {
                    let mut s = total;
                    for t in full..k {
                        s = x[r * k + t].mul_add(w[(o + b) * k + t], s);
                    }
                    dst.set(r, j + b, s);
                }
            }
            return;
        }
        for (p, acc) in acc.iter().enumerate() {
            for (b, &a) in acc.iter().enumerate() {
                for (h, half) in [_mm512_castps512_ps256(a), _mm512_extractf32x8_ps::<1>(a)].into_iter().enumerate() {
                    let r = r0 + 2 * p + h;
                    if r < rows {
                        let mut s = reduce(half);
                        for t in full..k {
                            s = x[r * k + t].mul_add(w[(o + b) * k + t], s);
                        }
                        dst.set(r, j + b, s);
                    }
                }
            }
        }
    }

    /// A whole tile's 48 sums, `acc` [pair][output] (four row pairs by six outputs), into
    /// `totals` [row][output], each added in the tree of `reduce` but sixteen at a time: of every
    /// two outputs' accumulators, first the halves of each row (`a[i] + a[i + 4]`), then
    /// `h[0] + h[2]` and `h[1] + h[3]`, then the pair, shuffled so that each step adds whole
    /// registers.
    #[inline(always)]
    unsafe fn reduce_whole_tile(acc: &[__m512], totals: &mut [[f32; OUTS]; ROWS]) {
        debug_assert_eq!(acc.len(), ROWS / 2 * OUTS);
        for g in 0..OUTS / 2 {
            // Per 128-bit lane: [row 2p, row 2p + 1] of output 2g, then of 2g + 1, four sums each.
            let halves = |p: usize| {
                let (x, y) = (acc[p * OUTS + 2 * g], acc[p * OUTS + 2 * g + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
            };
            // Per lane: [h0 + h2, h1 + h3] of a's lane, then of b's.
            let pairs = |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b));
            let (front, back) = (pairs(halves(0), halves(1)), pairs(halves(2), halves(3)));
            // Lane l, element e: the sum of row 2e + l % 2, output 2g + l / 2.
            let sums = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(front, back), _mm512_shuffle_ps::<0b11_01_11_01>(front, back));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), sums);
            for (i, &s) in out.iter().enumerate() {
                let (lane, e) = (i / 4, i % 4);
                totals[2 * e + lane % 2][2 * g + lane / 2] = s;
            }
        }
    }

    /// The tile's loop over the inputs: pair p of the tile is pair p % 2 of group p / 2.
    #[inline(always)]
    unsafe fn sums<const P: usize, const O: usize>(groups: [(*const f32, usize); 2], mut wp: *const f32, k: usize, iters: usize, (next, lines): (*const i8, usize)) -> [[__m512; O]; P] {
        let mut acc = [[_mm512_setzero_ps(); O]; P];
        let [(mut g0, step0), (mut g1, step1)] = groups;
        for i in 0..iters {
            if i < lines {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * i));
            }
            let mut wv = [_mm512_setzero_ps(); O];
            for (b, v) in wv.iter_mut().enumerate() {
                *v = _mm512_broadcast_f32x8(_mm256_loadu_ps(wp.add(b * k)));
            }
            for (p, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps((if p < 2 { g0 } else { g1 }).add(p % 2 * 2 * LANES));
                for b in 0..O {
                    a[b] = _mm512_fmadd_ps(xv, wv[b], a[b]);
                }
            }
            g0 = g0.add(step0);
            g1 = g1.add(step1);
            wp = wp.add(LANES);
        }
        acc
    }

    /// A quantized element type: sixteen of them loaded as f32.
    pub trait Elem: Copy {
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Elem for u16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
        }
    }

    impl Elem for i8 {
        #[inline(always)]
        unsafe fn load16(p: *const i8) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
        }
    }

    /// Panels: eight rows at a time across the whole panel (16 accumulators), then the rest.
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn rows_by_panel<E: Elem>(x: &[f32], rows: usize, k: usize, panel: *const E, part: &mut [f32], stride: usize, col: usize) {
        let mut r = 0;
        while rows - r >= ROWS {
            panel_tile::<E, ROWS>(x, r, k, panel, part, stride, col);
            r += ROWS;
        }
        match rows - r {
            7 => panel_tile::<E, 7>(x, r, k, panel, part, stride, col),
            6 => panel_tile::<E, 6>(x, r, k, panel, part, stride, col),
            5 => panel_tile::<E, 5>(x, r, k, panel, part, stride, col),
            4 => panel_tile::<E, 4>(x, r, k, panel, part, stride, col),
            3 => panel_tile::<E, 3>(x, r, k, panel, part, stride, col),
            2 => panel_tile::<E, 2>(x, r, k, panel, part, stride, col),
            1 => panel_tile::<E, 1>(x, r, k, panel, part, stride, col),
            _ => {}
        }
    }

    /// Panels: rows `r0 .. r0 + R` against the whole panel into `part[r · stride + col ..]`,
    /// each output summing first to last as `super::dot`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_tile<E: Elem, const R: usize>(x: &[f32], r0: usize, k: usize, panel: *const E, part: &mut [f32], stride: usize, col: usize) {
        let xp = x.as_ptr().add(r0 * k);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for i in 0..k {
            let p = panel.add(i * PANEL);
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
            let wv = [E::load16(p), E::load16(p.add(16))];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * k + i));
                a[0] = _mm512_fmadd_ps(xv, wv[0], a[0]);
                a[1] = _mm512_fmadd_ps(xv, wv[1], a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, a) in a.iter().enumerate() {
                _mm512_storeu_ps(part.as_mut_ptr().add((r0 + r) * stride + col + 16 * v), *a);
            }
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

    /// Products of one input run together give each the bits it gets alone, whatever their
    /// weight types, sizes (none included) and biases; no rows is no work.
    #[test]
    fn products_run_together_as_alone() {
        let (rows, k) = (9, 72);
        let x = data(rows * k, 4);
        let outs = [40, 7, 0, 64];
        let ws: Vec<Vec<f32>> = outs.iter().enumerate().map(|(i, &out)| data(out * k, 5 + i as u64)).collect();
        let bias = data(64, 9);
        let q8 = Panels::new(&Packed::int8(&ws[1], outs[1]), outs[1]);
        let weights = [Weight::F32(&ws[0]), Weight::Panels(&q8), Weight::F32(&ws[2]), Weight::F32(&ws[3])];
        let biases = [Some(&bias[..40]), Some(&bias[..7]), Some(&bias[..0]), None];
        let alone: Vec<Vec<f32>> = (0..outs.len()).map(|i| matmul(&x, rows, weights[i], outs[i], biases[i])).collect();
        let products: Vec<Product> = (0..outs.len()).map(|i| Product { w: weights[i], out: outs[i], bias: biases[i], gelu: false }).collect();
        assert_eq!(matmul_all(&x, rows, &products), alone);
        assert!(matmul(&[], 0, weights[0], outs[0], None).is_empty());
    }

    /// GELU in the products' last pass gives the bits of the GELU pass it replaces, for every
    /// weight type, beside a product without it.
    #[test]
    fn gelu_in_the_product_is_the_gelu_pass() {
        let (k, out) = (40, 45);
        let w = data(out * k, 3);
        let bias = data(out, 4);
        let [bf, q8] = panels(&w, out);
        for (rows, weight) in [1, 5].into_iter().flat_map(|rows| [Weight::F32(&w), Weight::Panels(&bf), Weight::Panels(&q8)].map(|w| (rows, w))) {
            let x = data(rows * k, 2);
            let plain = matmul(&x, rows, weight, out, None);
            let mut want = vec![0f32; rows * out];
            crate::kernels::gelu::gelu_rows(&mut want, &plain, &bias);
            let both = matmul_all(&x, rows, &[Product { w: weight, out, bias: Some(&bias), gelu: true }, Product { w: weight, out, bias: None, gelu: false }]);
            assert_eq!(both, [want, plain], "{rows} rows, {weight:?}");
        }
    }

    /// `w` [out, k] in bf16 and in int8, laid out for decoding.
    fn panels(w: &[f32], out: usize) -> [Panels; 2] {
        [Panels::new(&Packed::bf16(w), out), Panels::new(&Packed::int8(w, out), out)]
    }

    #[test]
    fn products_match_the_reference_for_every_weight_type() {
        for (rows, out, k) in [(1, 3, 5), (5, 17, 37), (32, 64, 128), (7, 130, 512), (13, 33, 8)] {
            let x = data(rows * k, 1);
            let w = data(out * k, 2);
            let bias = data(out, 3);
            let [bf, q8] = panels(&w, out);
            for weight in [Weight::F32(&w), Weight::Panels(&bf), Weight::Panels(&q8)] {
                let y = matmul(&x, rows, weight, out, Some(&bias));
                let want = reference(&x, rows, weight, out, Some(&bias));
                let worst = y.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1.0)));
                assert!(worst < 1e-5 * k as f32, "{rows}x{out}x{k} {weight:?}: {worst}");
            }
        }
    }

    #[test]
    fn panels_hold_the_quantized_weights_in_whole_panels() {
        let (out, k) = (37, 11);
        let w = data(out * k, 9);
        for packed in [Packed::bf16(&w), Packed::int8(&w, out)] {
            let p = Panels::new(&packed, out);
            let back = packed.dequantize();
            for o in 0..out {
                for i in 0..k {
                    assert_eq!(p.at(o, i) * p.scale(o), back[o * k + i], "{packed:?} ({o}, {i})");
                }
            }
            let bytes = match packed {
                Packed::Bf16(_) => 2 * PANEL * k * 2,
                Packed::Int8 { .. } => 2 * PANEL * k + out * 4,
            };
            let stored = match &p.values {
                Values::Bf16(v) => v.len() * 2,
                Values::Int8 { q, scale } => q.len() + scale.len() * 4,
            };
            assert_eq!(stored, bytes, "{packed:?}: two panels of {PANEL} rows");
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
        assert_eq!(Packed::int8(&[0.0; 6], 2).dequantize(), vec![0.0; 6]);
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
            let y = matmul(&x, rows, Weight::Panels(&Panels::new(&packed, out)), out, None);
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
        // Tails of one to three outputs in a tile of four, of none and five inputs in eight.
        for (out, k) in [(70, 93), (47, 64)] {
            same_bits_in_any_batch(out, k);
        }
    }

    fn same_bits_in_any_batch(out: usize, k: usize) {
        let w = data(out * k, 4);
        let x = data(33 * k, 5);
        let [bf, q8] = panels(&w, out);
        for weight in [Weight::F32(&w), Weight::Panels(&bf), Weight::Panels(&q8)] {
            let one: Vec<Vec<f32>> = (0..33).map(|r| matmul(&x[r * k..(r + 1) * k], 1, weight, out, None)).collect();
            for (r, one) in one.iter().enumerate() {
                let scalar: Vec<f32> = (0..out).map(|o| dot(&x[r * k..(r + 1) * k], weight, o, k) * weight.scale(o)).collect();
                assert_eq!(*one, scalar, "{weight:?} row {r}: the vector path sums as the scalar one");
            }
            // Every tile shape (six or four rows at a time, then fewer), and a full batch.
            for rows in (2..=13).chain([32, 33]) {
                let all = matmul(&x[..rows * k], rows, weight, out, None);
                for (r, one) in one.iter().enumerate().take(rows) {
                    assert_eq!(*one, all[r * out..(r + 1) * out], "{weight:?}: row {r} of {rows}");
                }
                // The AVX2 tiles of three or more f32 rows, which AVX-512 CPUs do not take.
                #[cfg(target_arch = "x86_64")]
                if let (Weight::F32(w), true) = (weight, std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
                    // NaN where a write would be missing.
                    let (x, mut avx2) = (&x[..rows * k], vec![f32::NAN; rows * out]);
                    // SAFETY: the CPU has AVX2 and FMA; x, w and avx2 are [rows, k], [out, k], [rows, out].
                    unsafe { avx2::block(x, &Interleaved::new(x, rows, k), rows, k, w, 0, out, Dst::new(avx2.as_mut_ptr(), out, rows, out)) };
                    for (r, one) in one.iter().enumerate().take(rows) {
                        assert_eq!(*one, avx2[r * out..(r + 1) * out], "AVX2: row {r} of {rows}");
                    }
                }
            }
        }
    }
}
