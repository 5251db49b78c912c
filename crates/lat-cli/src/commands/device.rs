//! `--device cpu|cuda`.

use candle_core::Device;

use super::{usage, Result};

pub fn parse(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if cfg!(feature = "cuda") {
                Device::new_cuda(0).map_err(|e| usage(format!("cannot open the GPU: {e}")))
            } else {
                Err(usage("this build of lat has no CUDA support: rebuild with --features cuda (see the README)"))
            }
        }
        other => Err(usage(format!("unknown device \"{other}\": use cpu or cuda"))),
    }
}
