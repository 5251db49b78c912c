//! Runs the GPU kernels of `linear-attention-transformer` (`kernels/gpu/kernels.cu`) on the CPU,
//! compiled as C++ with one OS thread per GPU thread, behind the same [`Gpu`] trait as the CUDA
//! backend: the launch plans and the kernel source are the ones a GPU runs. Used by the tests
//! to check the kernels against the plain references on machines without a GPU.

use std::ffi::{c_char, c_int, CString};

use candle_core::Result;
use half::bf16;
use linear_attention_transformer::kernels::gpu::{Args, Elem, Gpu, THREADS};

extern "C" {
    fn lat_emulate(name: *const c_char, gx: u32, gy: u32, threads: u32, shared_floats: usize, args: *const Args) -> c_int;
    fn lat_kernel_constants(out: *mut u32);
}

/// The sizes the kernel source is compiled with: `[THREADS, CHUNK, MAX_DIM, TILE]`.
pub fn kernel_constants() -> [u32; 4] {
    let mut out = [0u32; 4];
    // SAFETY: the function writes exactly four values.
    unsafe { lat_kernel_constants(out.as_mut_ptr()) };
    out
}

/// The emulated device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Emulator;

/// Host memory standing in for device memory (8-byte aligned).
#[derive(Debug)]
pub struct Buffer {
    words: Vec<u64>,
    elem: Elem,
    len: usize,
}

impl Buffer {
    /// A buffer holding `values` as `elem`.
    pub fn from_f32(values: &[f32], elem: Elem) -> Buffer {
        let mut buf = Emulator.alloc(elem, values.len(), true).expect("host allocation");
        for (i, &x) in values.iter().enumerate() {
            buf.set(i, x);
        }
        buf
    }

    /// A buffer of bytes (masks).
    pub fn from_bytes(bytes: &[u8]) -> Buffer {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (i, &b) in bytes.iter().enumerate() {
            words[i / 8] |= (b as u64) << (8 * (i % 8));
        }
        Buffer { words, elem: Elem::F32, len: bytes.len().div_ceil(4) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: plain integers viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * 8) }
    }

    fn set(&mut self, i: usize, x: f32) {
        // SAFETY: plain integers viewed as bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.words.len() * 8) };
        match self.elem {
            Elem::F32 => bytes[i * 4..i * 4 + 4].copy_from_slice(&x.to_le_bytes()),
            Elem::BF16 => bytes[i * 2..i * 2 + 2].copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
        }
    }

    /// Elements [start, start + len) as f32.
    pub fn to_f32(&self, start: usize, len: usize) -> Vec<f32> {
        assert!(start + len <= self.len, "read past the end of an emulated buffer");
        let b = self.bytes();
        (start..start + len)
            .map(|i| match self.elem {
                Elem::F32 => f32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()),
                Elem::BF16 => bf16::from_le_bytes(b[i * 2..i * 2 + 2].try_into().unwrap()).to_f32(),
            })
            .collect()
    }
}

impl Gpu for Emulator {
    type Buf = Buffer;

    fn alloc(&self, elem: Elem, len: usize, zeroed: bool) -> Result<Buffer> {
        // Memory that is not zeroed starts as NaN, so that what no kernel wrote shows.
        let fill = match (zeroed, elem) {
            (true, _) => 0,
            (false, Elem::F32) => 0x7fc0_0000_7fc0_0000,
            (false, Elem::BF16) => 0x7fc0_7fc0_7fc0_7fc0,
        };
        Ok(Buffer { words: vec![fill; (len * elem.size()).div_ceil(8)], elem, len })
    }

    fn addr(&self, buf: &Buffer) -> u64 {
        buf.words.as_ptr() as u64
    }

    fn launch(&self, name: &str, grid: (usize, usize), smem_floats: usize, args: &Args) -> Result<()> {
        if smem_floats > 12 * 1024 {
            candle_core::bail!("{name}: {smem_floats} floats of shared memory exceed the 48 KiB a launch may use");
        }
        let c = CString::new(name).unwrap();
        // SAFETY: the addresses in `args` point into live host buffers sized by the launch plan.
        let rc = unsafe { lat_emulate(c.as_ptr(), grid.0 as u32, grid.1 as u32, THREADS, smem_floats, args) };
        if rc != 0 {
            candle_core::bail!("no kernel named {name}");
        }
        Ok(())
    }
}
