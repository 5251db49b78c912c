//! With the `cuda` feature, compiles the GPU kernels (src/kernels/gpu/kernels.cu) to PTX with
//! nvcc (found through NVCC, CUDA_HOME or PATH) for CUDA_COMPUTE_CAP (default 80; the PTX also
//! runs on newer GPUs). Without it, there is nothing to build.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let dir = PathBuf::from("src/kernels/gpu");
    for f in std::fs::read_dir(&dir).expect("kernel sources") {
        println!("cargo:rerun-if-changed={}", f.unwrap().path().display());
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var("NVCC").ok().or_else(|| std::env::var("CUDA_HOME").ok().map(|h| format!("{h}/bin/nvcc"))).unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lat_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", &format!("--gpu-architecture=compute_{cap}"), "-o"])
        .arg(&out)
        .arg(dir.join("kernels.cu"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or CUDA_HOME): {e}"));
    assert!(status.success(), "nvcc failed on src/kernels/gpu/kernels.cu");
}
