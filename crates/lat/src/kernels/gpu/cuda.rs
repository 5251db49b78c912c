//! The CUDA side of the GPU kernels: memory and launches on candle's CUDA device, and the glue
//! that runs a launch plan for a custom op's `cuda_fwd` and `bwd`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

use super::{Args, Elem, Gpu, THREADS};

/// The kernels, compiled to PTX by build.rs.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lat_kernels.ptx"));
const MODULE: &str = "lat_kernels";

// SAFETY: `Args` is `repr(C)` plain data, laid out as the kernels' `struct Args`.
unsafe impl DeviceRepr for Args {}

/// candle's CUDA device as a [`Gpu`].
pub(crate) struct Cuda<'a>(pub &'a CudaDevice);

/// Device memory of one element type.
pub(crate) enum Buf {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e}"))
}

impl Gpu for Cuda<'_> {
    type Buf = Buf;

    fn alloc(&self, elem: Elem, len: usize, zeroed: bool) -> Result<Buf> {
        let len = len.max(1);
        // SAFETY (uninitialised memory): every plan writes what it later reads.
        Ok(match (elem, zeroed) {
            (Elem::F32, true) => Buf::F32(self.0.alloc_zeros::<f32>(len)?),
            (Elem::F32, false) => Buf::F32(unsafe { self.0.alloc::<f32>(len)? }),
            (Elem::BF16, true) => Buf::BF16(self.0.alloc_zeros::<bf16>(len)?),
            (Elem::BF16, false) => Buf::BF16(unsafe { self.0.alloc::<bf16>(len)? }),
        })
    }

    fn addr(&self, buf: &Buf) -> u64 {
        // Everything runs on candle's one stream, so stream order is the only synchronisation
        // the kernels need.
        let stream = self.0.cuda_stream();
        match buf {
            Buf::F32(s) => s.device_ptr(&stream).0,
            Buf::BF16(s) => s.device_ptr(&stream).0,
        }
    }

    fn launch(&self, name: &str, grid: (usize, usize), smem_floats: usize, args: &Args) -> Result<()> {
        let func = self.0.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: (smem_floats * 4) as u32 };
        let mut builder = func.builder();
        builder.arg(args);
        // SAFETY: the plan sized every buffer the arguments point to.
        unsafe { builder.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
        Ok(())
    }
}

impl Buf {
    fn into_storage(self, dev: &CudaDevice) -> CudaStorage {
        match self {
            Buf::F32(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Buf::BF16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::F32(s) => s.len(),
            Buf::BF16(s) => s.len(),
        }
    }
}

/// The element type of a kernel input.
fn elem(dtype: DType, what: &str) -> Result<Elem> {
    Elem::of(dtype).ok_or_else(|| cuda_err(what, format!("unsupported dtype {dtype:?} (f32 or bf16 on the GPU)")))
}

/// Device address of a contiguous input.
fn input_addr(s: &CudaStorage, l: &Layout, what: &str) -> Result<u64> {
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: kernel input must be contiguous");
    };
    let stream = s.device().cuda_stream();
    Ok(match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0 + 4 * start as u64,
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(&stream).0 + 2 * start as u64,
        dt => candle_core::bail!("{what}: unsupported dtype {dt:?} (f32 or bf16 on the GPU)"),
    })
}

/// The mask on the device (kept alive by the returned slice) and its address, 0 for none.
fn upload_mask(dev: &CudaDevice, keep: Option<&[u8]>) -> Result<(Option<CudaSlice<u8>>, u64)> {
    match keep {
        None => Ok((None, 0)),
        Some(m) => {
            let slice = dev.clone_htod(m)?;
            let addr = slice.device_ptr(&dev.cuda_stream()).0;
            Ok((Some(slice), addr))
        }
    }
}

/// Runs a forward plan for a custom op's `cuda_fwd`: `plan` gets the element type and the
/// addresses of q, k, v and the mask, and returns the op's flat output.
pub(crate) fn forward(what: &str, inputs: [(&CudaStorage, &Layout); 3], keep: Option<&[u8]>, plan: impl FnOnce(&Cuda, Elem, [u64; 4]) -> Result<Buf>) -> Result<(CudaStorage, Shape)> {
    let dev = inputs[0].0.device();
    let elem = elem(inputs[0].0.dtype(), what)?;
    let mut addrs = [0u64; 4];
    for (a, (s, l)) in addrs.iter_mut().zip(inputs) {
        *a = input_addr(s, l, what)?;
    }
    let (_mask, mask_addr) = upload_mask(dev, keep)?;
    addrs[3] = mask_addr;
    let out = plan(&Cuda(dev), elem, addrs)?;
    let len = out.len();
    Ok((out.into_storage(dev), Shape::from(len)))
}

/// Runs a backward plan for a custom op's `bwd`: `plan` gets the element type, the addresses
/// of q, k, v and the mask, and those of `extra` (the forward output, the output gradient),
/// and returns dq, dk and dv one after the other, which come back shaped like q, k and v.
pub(crate) fn backward(
    what: &str,
    qkv: [&Tensor; 3],
    extra: &[&Tensor],
    keep: Option<&[u8]>,
    plan: impl FnOnce(&Cuda, Elem, [u64; 4], &[u64]) -> Result<Buf>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let all: Vec<Tensor> = qkv.iter().chain(extra).map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
    let mut addrs = Vec::with_capacity(all.len());
    let mut dev = None;
    for (s, l) in &guards {
        let Storage::Cuda(c) = &**s else {
            candle_core::bail!("{what}: every input must be on the GPU");
        };
        addrs.push(input_addr(c, l, what)?);
        dev = Some(c.device().clone());
    }
    let dev = dev.expect("three inputs at least");
    let elem = elem(qkv[0].dtype(), what)?;
    let (_mask, mask_addr) = upload_mask(&dev, keep)?;
    let grads = plan(&Cuda(&dev), elem, [addrs[0], addrs[1], addrs[2], mask_addr], &addrs[3..])?;
    drop(guards);
    let len = grads.len();
    let flat = Tensor::from_storage(Storage::Cuda(grads.into_storage(&dev)), len, BackpropOp::none(), false);
    let mut at = 0;
    let mut next = |t: &Tensor| -> Result<Option<Tensor>> {
        let part = flat.narrow(0, at, t.elem_count())?.reshape(t.dims())?;
        at += t.elem_count();
        Ok(Some(part))
    };
    Ok((next(qkv[0])?, next(qkv[1])?, next(qkv[2])?))
}
