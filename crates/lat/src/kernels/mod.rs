//! The low-level layer of the crate: fused kernels with explicit backward passes, and the
//! recurrent forms that decoding steps with. Models never need this module directly; it is
//! public for checks, benchmarks and tools that call one kernel (`lat check`, `lat
//! kernel-bench`, the GPU emulator).
//!
//! Each kernel module holds the fused operation (a candle custom op, multi-threaded, written
//! against raw slices) and, beside it, `reference`: the same function written plainly with
//! candle tensor ops and differentiated by candle's autograd. Tests check that the two agree,
//! forward and backward, on random inputs. The reference is also what runs on devices without a
//! fused implementation, and everywhere when `LAT_KERNELS=reference` is set.

pub mod awake;
pub mod causal_linear;
pub mod cross_entropy;
pub mod decode;
pub mod embedding_bag;
pub mod gelu;
pub mod gpu;
pub mod layer_norm;
pub mod linear;
mod lines;
pub mod local;
pub mod matmul;
pub mod rotary;
pub mod self_attention;

use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};
use std::sync::OnceLock;

use candle_core::{CpuStorage, Device, Layout, Storage, Tensor, WithDType};
pub(crate) use lines::{LineVec, Plain};
use rayon::prelude::*;

/// Float types the CPU kernels are written for: f32 for real work, f64 for gradient checks.
pub trait Elem:
    WithDType
    + Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + std::iter::Sum
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// The most negative finite value: the reference's mask fill (`-finfo.max`).
    const MASK: Self;
    /// The smallest positive normal value.
    const MIN_POSITIVE: Self;
    /// Conversion from f64.
    fn of(v: f64) -> Self;
    /// e^self.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// The error function.
    fn erf(self) -> Self;
    /// The larger of two values.
    fn maxv(self, o: Self) -> Self;
}

macro_rules! impl_elem {
    ($t:ty, $erf:path, $exp:path) => {
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const MASK: Self = -<$t>::MAX;
            const MIN_POSITIVE: Self = <$t>::MIN_POSITIVE;
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline(always)]
            fn maxv(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
impl_elem!(f32, erf_f32, f32::exp);
impl_elem!(f64, libm::erf, f64::exp);

/// erf in f32 from a rational approximation on [-4, 4] (beyond it erf is ±1 in f32); about
/// 1e-7 from libm's `erff` and several times faster, which matters for GELU.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    const A: [f32; 7] = [-2.726_142_3e-10, 2.770_681_4e-8, -2.101_024e-6, -5.692_506_4e-5, -7.349_906_3e-4, -2.954_6e-3, -1.609_603_3e-2];
    const B: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = A.iter().fold(0.0f32, |acc, &c| acc * x2 + c);
    let q = B.iter().fold(0.0f32, |acc, &c| acc * x2 + c);
    x * p / q
}

/// e^x in f32 for x <= 0 (what a softmax takes), within about two units in the last place of
/// libm's `expf` down to e^-87, and plain arithmetic the compiler keeps in vector code: x is
/// n ln 2 + r with |r| <= ln 2 / 2, e^r comes from a polynomial, 2^n is put into the exponent
/// bits. Below -87 it gives e^-87 (1.6e-38), which no softmax weight beside its maximum's 1 can
/// tell from 0; above 0 it gives 1 (callers subtract a maximum first).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // ln 2 in two parts, the first exact in few bits so that n * LN2_HI is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, left in the low bits of the sum.
    const ROUND: f32 = 12_582_912.0;
    const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = P.iter().fold(0.0f32, |acc, &c| acc * r + c);
    let er = p * (r * r) + r + 1.0;
    let two_n = f32::from_bits(((shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32) << 23);
    er * two_n
}

/// Runs `$body` with `$T` bound to the Rust type of a float dtype; other dtypes are an error.
macro_rules! with_float {
    ($dtype:expr, $name:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?} (f32 or f64 on the CPU)", $name),
        }
    };
}
pub(crate) use with_float;

/// The most negative finite value of a float dtype: what masked logits are filled with (the
/// reference uses float32's, which rounds to -inf in bfloat16 and float16).
pub(crate) fn most_negative(dtype: candle_core::DType, device: &Device) -> candle_core::Result<Tensor> {
    let v = match dtype {
        candle_core::DType::BF16 => half::bf16::MAX.to_f64(),
        candle_core::DType::F16 => half::f16::MAX.to_f64(),
        _ => f32::MAX as f64,
    };
    Tensor::full(-v, (), device)?.to_dtype(dtype)
}

/// Asks the caches for the line holding `data[at]` ahead of its use; nothing past the end, or
/// off x86-64. A decoding step reads every stream's state once, tens of megabytes in small
/// separate pieces, each too short for the hardware's prefetchers to run ahead of.
#[inline(always)]
fn prefetch(data: &[f32], at: usize) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
    #[cfg(target_arch = "x86_64")]
    if at < data.len() {
        // SAFETY: prefetching reads nothing and cannot fault; the address lies in `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(data.as_ptr().add(at) as *const i8) };
    }
}

/// [`prefetch`] for every cache line of `data[at .. at + len]`.
#[inline(always)]
pub(crate) fn prefetch_lines(data: &[f32], at: usize, len: usize) {
    for line in (at..at + len).step_by(LINE_F32) {
        prefetch(data, line);
    }
}

/// f32 values per cache line.
const LINE_F32: usize = 16;

/// `vectorized! { fn name(args) -> R { body } }` (or `fn name<T: Bound>(…)`) defines `name`,
/// which runs `body` compiled for AVX2 and FMA where the CPU has them, and as built (SSE2 on
/// x86-64) elsewhere. It is the same code, and Rust neither fuses nor reorders float
/// operations, so both give the same bits: the loops the compiler vectorizes get registers twice
/// as wide, and `mul_add` one instruction. What the body calls must be `#[inline(always)]` to
/// share its instruction set (iterator adaptors such as `collect` and `sum` may not be inlined).
macro_rules! vectorized {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$t:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name $(<$t: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$t: $bound>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide $(<$t: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    body $(::<$t>)? ($($arg),*)
                }
                if $crate::kernels::has_avx2() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { wide $(::<$t>)? ($($arg),*) };
                }
            }
            body $(::<$t>)? ($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// Whether [`vectorized`] functions take their AVX2 form: the CPU has AVX2 and FMA, and (in
/// tests) the thread has not asked for the plain form.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    #[cfg(test)]
    if testing::PLAIN.with(|p| p.get()) {
        return false;
    }
    *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
}

/// Whether the build's own AVX-512 kernels run (the decoding products for three or more rows):
/// the `avx512` feature, and a CPU with AVX-512 F and DQ.
#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
pub(crate) fn has_avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq"))
}

/// Whether `LAT_KERNELS=reference` asks for the plain versions everywhere.
fn reference_requested() -> bool {
    static REFERENCE: OnceLock<bool> = OnceLock::new();
    *REFERENCE.get_or_init(|| std::env::var("LAT_KERNELS").is_ok_and(|v| v == "reference"))
}

/// The fused kernels take f32 and f64 tensors on the CPU, unless `LAT_KERNELS=reference` asks
/// for the plain versions.
pub fn use_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64) && !reference_requested()
}

/// The instruction set of the matrix products (gemm's kernels, chosen at run time): `avx512`
/// where the build has the `avx512` feature and the CPU the instructions, else `avx2` or
/// `fma`-less `scalar`, or `neon` elsewhere.
pub fn matrix_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
        "scalar"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// Whether the GPU kernels take a call for `x`'s device and dtype: CUDA builds, f32 or bf16,
/// unless `LAT_KERNELS=reference` asks for the plain versions.
pub fn use_gpu(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && gpu::Elem::of(x.dtype()).is_some() && !reference_requested()
}

pub(crate) fn dtype_of(s: &CpuStorage) -> candle_core::DType {
    candle_core::backend::BackendStorage::dtype(s)
}

pub(crate) fn storage<T: WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// The contiguous slice a layout describes.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("kernel input must be contiguous"),
    }
}

/// Borrows the data of contiguous CPU tensors for the duration of `f`.
pub(crate) fn read<T: WithDType, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (g, l) in &guards {
        match &**g {
            Storage::Cpu(s) => slices.push(slice::<T>(s, l)?),
            _ => candle_core::bail!("kernel input must be on the CPU"),
        }
    }
    Ok(f(&slices))
}

/// Wraps a kernel result as a tensor on the CPU.
pub(crate) fn tensor<T: WithDType>(data: Vec<T>, shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// A matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
    pub fn t(self) -> Self {
        Self { data: self.data, rs: self.cs, cs: self.rs }
    }
}

/// `dst (m x n, row-major, row stride dst_rs) [+]= alpha * a (m x k) * b (k x n)`, single-threaded:
/// kernels parallelise over batch and heads themselves.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Elem>(m: usize, n: usize, k: usize, dst: &mut [T], dst_rs: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm: destination too small");
    // SAFETY: the destination covers m rows of n at stride dst_rs, and being borrowed mutably it
    // cannot alias `a` or `b`.
    unsafe { gemm_into(m, n, k, dst.as_mut_ptr(), dst_rs, accumulate, a, b, alpha, gemm::Parallelism::None) }
}

/// The one call into `gemm`'s kernels: `dst [+]= alpha * a * b` as [`gemm`] describes it, on the
/// threads `parallelism` names; zeros (or `dst` as it is, when accumulating) when `k` is 0.
///
/// # Safety
/// `dst` points at m rows of n writable elements, `dst_rs` apart, that alias neither operand
/// and are initialised when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: Elem>(m: usize, n: usize, k: usize, dst: *mut T, dst_rs: usize, accumulate: bool, a: Mat<T>, b: Mat<T>, alpha: T, parallelism: gemm::Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                std::ptr::write_bytes(dst.add(r * dst_rs), 0, n);
            }
        }
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(a.rs, a.cs, m, k) < a.data.len(), "gemm: lhs too small");
    assert!(last(b.rs, b.cs, k, n) < b.data.len(), "gemm: rhs too small");
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        T::ONE,
        alpha,
        false,
        false,
        false,
        parallelism,
    )
}

/// Disjoint writes into one output buffer from parallel tasks whose rows interleave
/// (heads of a [batch, n, heads, e] tensor).
pub(crate) struct SharedOut<T> {
    ptr: *mut T,
    len: usize,
}

unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T: Copy> SharedOut<T> {
    pub fn new(v: &mut [T]) -> Self {
        Self { ptr: v.as_mut_ptr(), len: v.len() }
    }

    /// Over memory not yet written (a vector's spare capacity), which the writes initialise.
    pub fn uninit(v: &mut [std::mem::MaybeUninit<T>]) -> Self {
        Self { ptr: v.as_mut_ptr().cast(), len: v.len() }
    }

    /// Copies `src` to `offset`.
    ///
    /// # Safety
    /// No two concurrent calls may write overlapping ranges, and the buffer must outlive them.
    pub unsafe fn write(&self, offset: usize, src: &[T]) {
        assert!(offset + src.len() <= self.len, "SharedOut: write out of bounds");
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len());
    }

    /// Where element `offset` lies, for a kernel that writes its part in place.
    ///
    /// # Safety
    /// As for [`SharedOut::write`], for every element written through the pointer.
    pub unsafe fn at(&self, offset: usize) -> *mut T {
        assert!(offset <= self.len, "SharedOut: offset out of bounds");
        self.ptr.add(offset)
    }

    /// Elements `offset .. offset + len`, to finish in place.
    ///
    /// # Safety
    /// They have been written, and no other thread touches them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        assert!(offset + len <= self.len, "SharedOut: slice out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(offset), len)
    }
}

/// Heads of width `e` laid out as [batch, n, …] rows of `stride` elements, head `h` of a row
/// starting at `col + h · e`, seen one (batch, head) task at a time. A [batch, n, heads, e]
/// tensor has stride `heads · e` and col 0; the q, k and v parts of a fused [batch, n,
/// 3 · heads · e] projection are the same heads at cols 0, heads · e and 2 · heads · e.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub e: usize,
    pub stride: usize,
    pub col: usize,
}

impl Heads {
    pub fn of(shape: &[usize], what: &str) -> candle_core::Result<Self> {
        match *shape {
            [b, n, h, e] => Ok(Self { b, n, h, e, stride: h * e, col: 0 }),
            _ => candle_core::bail!("{what}: expected [batch, n, heads, dim_head], got {shape:?}"),
        }
    }

    pub fn tasks(&self) -> usize {
        self.b * self.h
    }

    /// Offset of row `i` of task `t` (t = batch * heads + head).
    #[inline]
    pub fn row(&self, t: usize, i: usize) -> usize {
        let (bi, hi) = (t / self.h, t % self.h);
        (bi * self.n + i) * self.stride + self.col + hi * self.e
    }

    /// Copies task `t`'s rows into a contiguous [n, e] buffer.
    pub fn gather<T: Copy>(&self, src: &[T], t: usize, dst: &mut [T]) {
        for i in 0..self.n {
            let o = self.row(t, i);
            dst[i * self.e..(i + 1) * self.e].copy_from_slice(&src[o..o + self.e]);
        }
    }

    /// Writes a contiguous [n, e] buffer back as task `t`'s rows.
    ///
    /// # Safety
    /// Each task may be scattered by one thread at a time.
    pub unsafe fn scatter<T: Copy>(&self, dst: &SharedOut<T>, t: usize, src: &[T]) {
        for i in 0..self.n {
            dst.write(self.row(t, i), &src[i * self.e..(i + 1) * self.e]);
        }
    }
}

/// An attention kernel's forward pass as one parallel loop over its (batch row, head) tasks:
/// `task_out(t, stats)` returns task t's output [n, e] and fills its `stats_len` statistics
/// (what the backward pass needs). Returns the outputs, laid out as `out`, then each task's
/// statistics in task order.
pub(crate) fn outputs_by_task<T: Elem>(out: Heads, stats_len: usize, task_out: impl Fn(usize, &mut [T]) -> Vec<T> + Sync) -> Vec<T> {
    let out_len = out.b * out.n * out.h * out.e;
    let mut flat = vec![T::ZERO; out_len + out.tasks() * stats_len];
    let (outs, stats) = flat.split_at_mut(out_len);
    let (outs, stats) = (SharedOut::new(outs), SharedOut::new(stats));
    (0..out.tasks()).into_par_iter().for_each(|t| {
        // SAFETY: task t alone touches its own statistics (zeroed above) and writes its own rows.
        let o = task_out(t, unsafe { stats.slice(t * stats_len, stats_len) });
        unsafe { out.scatter(&outs, t, &o) };
    });
    flat
}

/// Task t's share of an output gradient `grad` and of what [`outputs_by_task`] returned
/// (`saved`: outputs laid out as `out`, then `stats_len` statistics a task): its output
/// gradient and output, each [n, e], and its statistics.
pub(crate) fn task_saved<'a, T: Elem>(grad: &[T], saved: &'a [T], out: Heads, stats_len: usize, t: usize) -> (Vec<T>, Vec<T>, &'a [T]) {
    let out_len = out.b * out.n * out.h * out.e;
    let (mut g, mut o) = (vec![T::ZERO; out.n * out.e], vec![T::ZERO; out.n * out.e]);
    out.gather(&grad[..out_len], t, &mut g);
    out.gather(&saved[..out_len], t, &mut o);
    (g, o, &saved[out_len + t * stats_len..][..stats_len])
}

/// An attention kernel's backward pass as one parallel loop over its tasks: `task_grads(s, t)`
/// returns task t's gradients of q, k and v as [n, e] buffers, from the slices `s` of q, k, v
/// and then `more`; they are written into gradients shaped as q, k and v, laid out as
/// `layouts`.
#[allow(clippy::type_complexity)]
pub(crate) fn grads_by_task<T: Elem>(
    [q, k, v]: [&Tensor; 3],
    layouts: [Heads; 3],
    more: &[&Tensor],
    task_grads: impl Fn(&[&[T]], usize) -> (Vec<T>, Vec<T>, Vec<T>) + Sync,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let mut grads = [q, k, v].map(|x| vec![T::ZERO; x.elem_count()]);
    let shared = grads.each_mut().map(|g| SharedOut::new(g));
    let inputs: Vec<&Tensor> = [q, k, v].into_iter().chain(more.iter().copied()).collect();
    read::<T, _>(&inputs, |s| {
        (0..layouts[0].tasks()).into_par_iter().for_each(|t| {
            let (gq, gk, gv) = task_grads(s, t);
            for ((layout, out), g) in layouts.iter().zip(&shared).zip([gq, gk, gv]) {
                // SAFETY: task t alone writes its own rows.
                unsafe { layout.scatter(out, t, &g) };
            }
        });
    })?;
    let [dq, dk, dv] = grads;
    Ok((Some(tensor(dq, q.dims())?), Some(tensor(dk, k.dims())?), Some(tensor(dv, v.dims())?)))
}

/// Partial sums of [`sum_lanes`]: two registers of eight f32, which the compiler keeps apart.
const SUM_LANES: usize = 16;

/// `Σ f(a[i], b[i])` (for one slice, pass it as both) in [`SUM_LANES`] interleaved partial sums
/// added in a fixed tree, then the tail: one long chain of dependent additions would wait on
/// each addition's latency, these run side by side (and as vector code inside [`vectorized`]).
#[inline(always)]
pub(crate) fn sum_lanes<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::ZERO; SUM_LANES];
    let (ca, cb) = (a.chunks_exact(SUM_LANES), b.chunks_exact(SUM_LANES));
    let mut tail = T::ZERO;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += f(x, y);
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..SUM_LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    let mut width = SUM_LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

/// Softmax over each row of `x` (rows of width `e`) in place, then times `scale`.
#[inline(always)]
pub(crate) fn softmax_rows<T: Elem>(x: &mut [T], e: usize, scale: T) {
    for row in x.chunks_mut(e) {
        let mx = row.iter().fold(T::MASK, |a, &b| a.maxv(b));
        let mut sum = T::ZERO;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = scale / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `x = scale * softmax(x)` for one f32 row of what a decoding step attends over, with
/// [`exp_f32`] and eight partial maxima and sums, so that it stays in the vector code of the
/// `vectorized!` function it is called from.
#[inline(always)]
pub(crate) fn softmax_f32(x: &mut [f32], scale: f32) {
    let mut mx = [f32::NEG_INFINITY; 8];
    for c in x.chunks(8) {
        for (m, &v) in mx.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let mx = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = [0f32; 8];
    for c in x.chunks_mut(8) {
        for (s, v) in sum.iter_mut().zip(c) {
            *v = exp_f32(*v - mx);
            *s += *v;
        }
    }
    let mut total = 0.0;
    for s in sum {
        total += s;
    }
    let inv = scale / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Backward of `y = scale * softmax(x)` per row, given y and dy: writes dx into `dy`.
pub(crate) fn softmax_rows_backward<T: Elem>(y: &[T], dy: &mut [T], e: usize, scale: T) {
    for (yr, gr) in y.chunks(e).zip(dy.chunks_mut(e)) {
        let dot: T = yr.iter().zip(gr.iter()).map(|(&a, &b)| a * b).sum();
        let inv = T::ONE / scale;
        for (g, &p) in gr.iter_mut().zip(yr) {
            // y = s p, dp = s dy, dx = p (dp - p.dp) = y (dy - y.dy / s)
            *g = p * (*g - dot * inv);
        }
    }
}

#[cfg(test)]
mod fast_math_tests {
    #[test]
    fn fast_exp_matches_libm() {
        // Every 2^-10 from -87 to 0, and the ends.
        for x in (0..=87 * 1024).map(|i| -(i as f32) / 1024.0).chain([-87.0, -0.0, 0.0]) {
            let (got, want) = (super::exp_f32(x), x.exp());
            assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}): {got} vs {want}");
        }
        assert_eq!(super::exp_f32(-1e30), super::exp_f32(-87.0));
        assert_eq!(super::exp_f32(f32::NEG_INFINITY), super::exp_f32(-87.0));
    }

    #[test]
    fn fast_erf_matches_libm() {
        let worst = (-600..=600).map(|i| i as f32 / 100.0).map(|x| (super::erf_f32(x) - libm::erff(x)).abs()).fold(0f32, f32::max);
        assert!(worst < 5e-7, "max error {worst}");
    }
}

/// Test helpers shared by the kernel tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::Cell;

    use candle_core::{DType, Device, Tensor, Var};

    use crate::rng::Rng;

    thread_local! {
        /// Set by [`plain`]: this thread's `vectorized!` functions take their plain form.
        pub static PLAIN: Cell<bool> = const { Cell::new(false) };
    }

    /// `f()` with this thread's `vectorized!` functions in their plain (as built) form.
    pub fn plain<R>(f: impl FnOnce() -> R) -> R {
        PLAIN.with(|p| p.set(true));
        let r = f();
        PLAIN.with(|p| p.set(false));
        r
    }

    pub fn randn(shape: &[usize], scale: f64, dtype: DType, seed: u64) -> Var {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.normal() * scale).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap()
    }

    /// Max |a - b| / (max |b| + tiny).
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())) + 1e-30;
        a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// A fixed random projection of `y`, so that one backward pass checks every output.
    pub fn probe(y: &Tensor, seed: u64) -> Tensor {
        let w = randn(y.dims(), 1.0, y.dtype(), seed);
        (y * w.as_tensor()).unwrap().sum_all().unwrap()
    }

    /// Central finite differences of the scalar `f` at a few coordinates of `x`, compared with
    /// the analytic gradient `g`.
    pub fn check_fd(x: &Var, g: &Tensor, f: &dyn Fn() -> f64, points: usize, tol: f64) {
        let n = x.elem_count();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let grads = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for p in 0..points {
            let i = (p * 7919 + 13) % n;
            let mut v = base.clone();
            v[i] = base[i] + h;
            x.set(&Tensor::from_vec(v.clone(), x.dims(), &Device::Cpu).unwrap()).unwrap();
            let fp = f();
            v[i] = base[i] - h;
            x.set(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap()).unwrap();
            let fm = f();
            let fd = (fp - fm) / (2.0 * h);
            let err = (fd - grads[i]).abs() / (fd.abs().max(grads[i].abs()).max(1e-3));
            assert!(err < tol, "coordinate {i}: finite difference {fd} vs analytic {}", grads[i]);
        }
        x.set(&Tensor::from_vec(base, x.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}
