//! GPU kernels for the three attention forms (causal linear, non-causal linear, local windowed),
//! forward and backward, written once in CUDA C (`kernels.cu`).
//!
//! This module holds what the host does around them: the argument block, buffer sizes, grids
//! and the order of launches. It is written against the small [`Gpu`] trait so that the same
//! plans drive the CUDA backend (feature `cuda`) and, in the tests, a CPU emulation of the
//! kernels (crate `lat-gpu-emulator`), which checks them against the plain references on
//! machines without a GPU.
//!
//! Outputs that carry statistics for the backward pass are one flat buffer of the element type:
//! the output first (padded to a multiple of 4 bytes), then the statistics as `f32`.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

/// Threads per block (fixed by the kernels).
pub const THREADS: u32 = 256;
/// Positions per chunk of the causal kernels.
pub const CHUNK: usize = 32;
/// Largest head dimension the kernels handle.
pub const MAX_DIM: usize = 64;
/// Queries or keys per tile of the local and non-causal kernels.
pub const TILE: usize = 32;

/// Element type of the tensors the kernels read and write (scratch is always `f32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// bfloat16 (arithmetic in `f32`).
    BF16,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::BF16 => 2,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::BF16 => "bf16",
        }
    }

    /// The element type of a candle dtype, if the kernels support it.
    pub fn of(dtype: candle_core::DType) -> Option<Elem> {
        match dtype {
            candle_core::DType::F32 => Some(Elem::F32),
            candle_core::DType::BF16 => Some(Elem::BF16),
            _ => None,
        }
    }
}

/// The kernels' argument block (`struct Args` in common.cuh): device addresses and sizes.
#[allow(missing_docs)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Args {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub g: u64,
    pub out: u64,
    pub keep: u64,
    pub o0: u64,
    pub o1: u64,
    pub o2: u64,
    pub s0: u64,
    pub s1: u64,
    pub s2: u64,
    pub s3: u64,
    pub s4: u64,
    pub b: i32,
    pub n: i32,
    pub m: i32,
    pub h: i32,
    pub e: i32,
    pub ev: i32,
    pub bucket: i32,
    pub window: i32,
    pub causal: i32,
    pub nc: i32,
}

/// What the launch plans need from a device.
pub trait Gpu {
    /// Device memory of one element type.
    type Buf;
    /// `len` elements of `elem`, zero-filled when `zeroed`.
    fn alloc(&self, elem: Elem, len: usize, zeroed: bool) -> candle_core::Result<Self::Buf>;
    /// Device address of a buffer.
    fn addr(&self, buf: &Self::Buf) -> u64;
    /// Launches `name` on a `grid` of blocks of [`THREADS`] threads with `smem_floats` floats of
    /// dynamic shared memory.
    fn launch(&self, name: &str, grid: (usize, usize), smem_floats: usize, args: &Args) -> candle_core::Result<()>;
}

fn launch<G: Gpu>(gpu: &G, kernel: &str, elem: Elem, grid: (usize, usize), smem_floats: usize, args: &Args) -> candle_core::Result<()> {
    gpu.launch(&format!("{kernel}_{}", elem.suffix()), grid, smem_floats, args)
}

/// Elements of `elem` that hold `len` floats.
fn floats_as(elem: Elem, len: usize) -> usize {
    len * 4 / elem.size()
}

/// `len` rounded up so that what follows it is 4-byte aligned.
fn padded(elem: Elem, len: usize) -> usize {
    len.next_multiple_of(4 / elem.size())
}

fn blocks(len: usize, per: usize) -> usize {
    len.div_ceil(per).max(1)
}

/// Causal linear attention over `q`, `k`: [b, n, h, e] and `v`: [b, n, h, ev].
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub e: usize,
    pub ev: usize,
    pub bucket: usize,
}

impl Causal {
    /// Whether the kernels handle this shape (else the generic path runs).
    pub fn supported(&self) -> bool {
        self.e <= MAX_DIM && self.ev <= MAX_DIM && self.bucket > 0 && (CHUNK.is_multiple_of(self.bucket) || self.bucket.is_multiple_of(CHUNK)) && self.n > 0
    }

    fn chunks(&self) -> usize {
        self.n.div_ceil(CHUNK)
    }

    fn tasks(&self) -> usize {
        self.b * self.h
    }

    fn state(&self) -> usize {
        self.e * self.ev + self.e
    }

    fn out_len(&self, elem: Elem) -> usize {
        padded(elem, self.b * self.n * self.h * self.ev)
    }

    fn args(&self) -> Args {
        Args { b: self.b as i32, n: self.n as i32, m: self.n as i32, h: self.h as i32, e: self.e as i32, ev: self.ev as i32, bucket: self.bucket as i32, nc: self.chunks() as i32, ..Args::default() }
    }

    /// Length of the forward output: the output, then the unclamped denominators.
    pub fn flat_len(&self, elem: Elem) -> usize {
        self.out_len(elem) + floats_as(elem, self.tasks() * self.n)
    }

    /// Chunk states and running maxima (steps 1 and 2); returns (states, lm, mu).
    fn prefix<G: Gpu>(&self, gpu: &G, elem: Elem, a: &mut Args) -> candle_core::Result<[G::Buf; 3]> {
        let (nc, bh, (e, ev)) = (self.chunks(), self.tasks(), (self.e, self.ev));
        let states = gpu.alloc(Elem::F32, bh * nc * self.state(), false)?;
        let lm = gpu.alloc(Elem::F32, bh * nc, false)?;
        let mu = gpu.alloc(Elem::F32, bh * (nc + 1), false)?;
        (a.s0, a.s1, a.s2) = (gpu.addr(&states), gpu.addr(&lm), gpu.addr(&mu));
        launch(gpu, "cla_chunk_sums", elem, (nc, bh), CHUNK * (e + ev) + THREADS as usize, a)?;
        launch(gpu, "cla_prefix", elem, (blocks(self.state(), THREADS as usize), bh), 0, a)?;
        Ok([states, lm, mu])
    }

    /// Forward pass: returns the flat output (see [`Causal::flat_len`]).
    pub fn forward<G: Gpu>(&self, gpu: &G, elem: Elem, q: u64, k: u64, v: u64, keep: u64) -> candle_core::Result<G::Buf> {
        let mut a = Args { q, k, v, keep, ..self.args() };
        let scratch = self.prefix(gpu, elem, &mut a)?;
        let flat = gpu.alloc(elem, self.flat_len(elem), false)?;
        a.o0 = gpu.addr(&flat);
        a.s3 = a.o0 + (self.out_len(elem) * elem.size()) as u64;
        let (e, ev) = (self.e, self.ev);
        launch(gpu, "cla_forward", elem, (self.chunks(), self.tasks()), CHUNK * (2 * e + ev + CHUNK + 1), &a)?;
        drop(scratch);
        Ok(flat)
    }

    /// Backward pass from the flat forward output and the output gradient: returns
    /// dq, dk and dv one after the other.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<G: Gpu>(&self, gpu: &G, elem: Elem, q: u64, k: u64, v: u64, keep: u64, flat: u64, grad: u64) -> candle_core::Result<G::Buf> {
        let mut a = Args { q, k, v, keep, g: grad, out: flat, ..self.args() };
        a.s3 = flat + (self.out_len(elem) * elem.size()) as u64;
        let scratch = self.prefix(gpu, elem, &mut a)?;
        let (nc, bh, (e, ev)) = (self.chunks(), self.tasks(), (self.e, self.ev));
        let queries = gpu.alloc(Elem::F32, bh * nc * self.state(), false)?;
        a.s4 = gpu.addr(&queries);
        launch(gpu, "cla_query_sums", elem, (nc, bh), CHUNK * (e + ev + 1), &a)?;
        launch(gpu, "cla_suffix", elem, (blocks(self.state(), THREADS as usize), bh), 0, &a)?;
        let qk = self.b * self.n * self.h * e;
        let grads = gpu.alloc(elem, 2 * qk + self.b * self.n * self.h * ev, false)?;
        a.o0 = gpu.addr(&grads);
        a.o1 = a.o0 + (qk * elem.size()) as u64;
        a.o2 = a.o1 + (qk * elem.size()) as u64;
        let d = e.max(ev);
        launch(gpu, "cla_backward", elem, (nc, bh), CHUNK * (4 * d + 2 * CHUNK + 1), &a)?;
        drop((scratch, queries));
        Ok(grads)
    }
}

/// Non-causal linear attention: `q`: [b, n, h, e], `k`: [b, m, h, e], `v`: [b, m, h, ev].
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub h: usize,
    pub e: usize,
    pub ev: usize,
}

/// Positions per block of the atomic context sums.
const SPLIT: usize = 256;

impl Linear {
    /// Whether the kernels handle this shape.
    pub fn supported(&self) -> bool {
        self.e <= MAX_DIM && self.ev <= MAX_DIM && self.n > 0 && self.m > 0
    }

    fn tasks(&self) -> usize {
        self.b * self.h
    }

    fn args(&self) -> Args {
        Args { b: self.b as i32, n: self.n as i32, m: self.m as i32, h: self.h as i32, e: self.e as i32, ev: self.ev as i32, ..Args::default() }
    }

    /// Key statistics and the context k̂ᵀv; returns (stats, context).
    fn context<G: Gpu>(&self, gpu: &G, elem: Elem, a: &mut Args) -> candle_core::Result<[G::Buf; 2]> {
        let (bh, e, ev) = (self.tasks(), self.e, self.ev);
        let stats = gpu.alloc(Elem::F32, bh * 2 * e, false)?;
        let context = gpu.alloc(Elem::F32, bh * e * ev, true)?;
        (a.s0, a.s1) = (gpu.addr(&stats), gpu.addr(&context));
        launch(gpu, "lin_key_stats", elem, (1, bh), 2 * THREADS as usize, a)?;
        a.nc = blocks(self.m, SPLIT) as i32;
        launch(gpu, "lin_context", elem, (a.nc as usize, bh), TILE * (e + ev), a)?;
        Ok([stats, context])
    }

    /// Forward pass: returns the output [b, n, h, ev].
    pub fn forward<G: Gpu>(&self, gpu: &G, elem: Elem, q: u64, k: u64, v: u64, keep: u64) -> candle_core::Result<G::Buf> {
        let mut a = Args { q, k, v, keep, ..self.args() };
        let scratch = self.context(gpu, elem, &mut a)?;
        let out = gpu.alloc(elem, self.b * self.n * self.h * self.ev, false)?;
        a.o0 = gpu.addr(&out);
        launch(gpu, "lin_forward", elem, (blocks(self.n, TILE), self.tasks()), TILE * self.e, &a)?;
        drop(scratch);
        Ok(out)
    }

    /// Backward pass: returns dq, dk and dv one after the other.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<G: Gpu>(&self, gpu: &G, elem: Elem, q: u64, k: u64, v: u64, keep: u64, grad: u64) -> candle_core::Result<G::Buf> {
        let mut a = Args { q, k, v, keep, g: grad, ..self.args() };
        let scratch = self.context(gpu, elem, &mut a)?;
        let (bh, e, ev) = (self.tasks(), self.e, self.ev);
        let dcontext = gpu.alloc(Elem::F32, bh * e * ev, true)?;
        a.s2 = gpu.addr(&dcontext);
        a.nc = blocks(self.n, SPLIT) as i32;
        launch(gpu, "lin_context_grad", elem, (a.nc as usize, bh), TILE * (e + ev), &a)?;
        let (nq, nk) = (self.b * self.n * self.h * e, self.b * self.m * self.h * e);
        let grads = gpu.alloc(elem, nq + nk + self.b * self.m * self.h * ev, false)?;
        a.o0 = gpu.addr(&grads);
        a.o1 = a.o0 + (nq * elem.size()) as u64;
        a.o2 = a.o1 + (nk * elem.size()) as u64;
        launch(gpu, "lin_query_grad", elem, (blocks(self.n, TILE), bh), TILE * (2 * e + ev + 1), &a)?;
        launch(gpu, "lin_key_grad", elem, (blocks(self.m, TILE), bh), TILE * (e + ev) + e, &a)?;
        drop((scratch, dcontext));
        Ok(grads)
    }
}

/// Local windowed attention over `q`, `k`, `v`: [b, n, h, e].
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug)]
pub struct Local {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub e: usize,
    pub window: usize,
    pub causal: bool,
    /// Dropout on the probabilities, which the kernels do not implement.
    pub dropout: bool,
}

impl Local {
    /// Whether the kernels handle this shape (and no dropout).
    pub fn supported(&self) -> bool {
        self.e <= MAX_DIM && self.window > 0 && self.n > 0 && self.n.is_multiple_of(self.window) && !self.dropout
    }

    fn tasks(&self) -> usize {
        self.b * self.h
    }

    fn out_len(&self, elem: Elem) -> usize {
        padded(elem, self.b * self.n * self.h * self.e)
    }

    fn args(&self) -> Args {
        let (n, e) = (self.n as i32, self.e as i32);
        Args { b: self.b as i32, n, m: n, h: self.h as i32, e, ev: e, window: self.window as i32, causal: self.causal as i32, ..Args::default() }
    }

    /// Length of the forward output: the output, then each row's log-sum-exp.
    pub fn flat_len(&self, elem: Elem) -> usize {
        self.out_len(elem) + floats_as(elem, self.tasks() * self.n)
    }

    /// Forward pass: returns the flat output (see [`Local::flat_len`]).
    pub fn forward<G: Gpu>(&self, gpu: &G, elem: Elem, q: u64, k: u64, v: u64, keep: u64) -> candle_core::Result<G::Buf> {
        let mut a = Args { q, k, v, keep, ..self.args() };
        let flat = gpu.alloc(elem, self.flat_len(elem), false)?;
        a.o0 = gpu.addr(&flat);
        a.s0 = a.o0 + (self.out_len(elem) * elem.size()) as u64;
        launch(gpu, "loc_forward", elem, (blocks(self.n, TILE), self.tasks()), 4 * TILE * self.e + TILE * TILE + 3 * TILE, &a)?;
        Ok(flat)
    }

    /// Backward pass: returns dq, dk and dv one after the other.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<G: Gpu>(&self, gpu: &G, elem: Elem, q: u64, k: u64, v: u64, keep: u64, flat: u64, grad: u64) -> candle_core::Result<G::Buf> {
        let mut a = Args { q, k, v, keep, g: grad, out: flat, ..self.args() };
        a.s0 = flat + (self.out_len(elem) * elem.size()) as u64;
        let len = self.b * self.n * self.h * self.e;
        let grads = gpu.alloc(elem, 3 * len, false)?;
        a.o0 = gpu.addr(&grads);
        a.o1 = a.o0 + (len * elem.size()) as u64;
        a.o2 = a.o1 + (len * elem.size()) as u64;
        let grid = (blocks(self.n, TILE), self.tasks());
        let e = self.e;
        launch(gpu, "loc_query_grad", elem, grid, 5 * TILE * e + TILE * TILE + 2 * TILE, &a)?;
        launch(gpu, "loc_key_grad", elem, grid, 4 * TILE * e + 2 * TILE * TILE + 2 * TILE, &a)?;
        Ok(grads)
    }
}
