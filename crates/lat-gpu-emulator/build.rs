//! Compiles the GPU kernels as C++ for the CPU emulation.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let kernels = PathBuf::from("../lat/src/kernels/gpu").canonicalize().expect("kernel sources");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let object = out.join("emulator.o");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-fPIC", "-pthread", "-Wall", "-Wno-unused-function", "-c", "src/emulator.cpp", "-I", "src", "-I"])
        .arg(&kernels)
        .args(["-include", "emulator.h", "-o"])
        .arg(&object)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cxx}: {e}"));
    assert!(status.success(), "compiling the kernel emulation failed");
    let status = Command::new("ar").arg("rcs").arg(out.join("liblat_gpu_emulator.a")).arg(&object).status().expect("cannot run ar");
    assert!(status.success(), "ar failed");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=lat_gpu_emulator");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rerun-if-changed=src/emulator.cpp");
    println!("cargo:rerun-if-changed=src/emulator.h");
    for f in std::fs::read_dir(&kernels).unwrap() {
        println!("cargo:rerun-if-changed={}", f.unwrap().path().display());
    }
}
