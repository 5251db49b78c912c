#!/usr/bin/env bash
# Builds `lat` with the `cuda` feature on a machine without CUDA: the CUDA 13.0 toolchain comes
# from PyPI wheels, and a stub of libcuda (the driver, which no wheel ships) satisfies the linker.
# The stub is used at link time only; at run time the GPU machine's own driver is loaded.
#
#     tools/cuda/build.sh            # -> dist/cuda/lat (stripped) and lat.xz, for compute capability 90
#     CUDA_COMPUTE_CAP=80 tools/cuda/build.sh
#
# Everything it downloads or builds stays in .cuda/ and target/cuda/ (both git-ignored).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=$ROOT/.cuda
CU=$CACHE/root/nvidia/cu13
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# The GPU machines' driver (580) supports CUDA 13.0: newer toolchains emit PTX it cannot load.
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14"

if [ ! -x "$CU/bin/nvcc" ]; then
    mkdir -p "$CACHE/wheels" "$CACHE/root"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --python-version 3.11 \
        -d "$CACHE/wheels" $WHEELS
    for w in "$CACHE"/wheels/*.whl; do unzip -q -o "$w" -d "$CACHE/root"; done
fi
# Unversioned names for the linker.
for lib in "$CU"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

# libcuda stub: one empty function per driver symbol that cudarc's bindings name.
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)
if [ -z "$CUDARC" ]; then
    (cd "$ROOT" && cargo fetch --quiet)
    CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
fi
mkdir -p "$CACHE/stub"
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDARC"/src/driver/sys/*.rs | sort -u | sed 's/.*/void &(void) {}/' > "$CACHE/stub/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CACHE/stub/libcuda.so" "$CACHE/stub/cuda_stub.c"
ln -sf libcuda.so "$CACHE/stub/libcuda.so.1"

export PATH=$CU/bin:$PATH CUDA_HOME=$CU CUDA_PATH=$CU NVCC=$CU/bin/nvcc
export LIBRARY_PATH=$CACHE/stub:$CU/lib:${LIBRARY_PATH:-}
export RUSTFLAGS="${RUSTFLAGS:-} -L $CACHE/stub -L $CU/lib"
cd "$ROOT"
cargo build --release -p lat-cli --features cuda --target-dir target/cuda
mkdir -p dist/cuda
cp target/cuda/release/lat dist/cuda/lat
strip dist/cuda/lat
# Compressed for travel: most of the binary is PTX text.
xz -T0 -6 -c dist/cuda/lat > dist/cuda/lat.xz
echo "built dist/cuda/lat ($(du -h dist/cuda/lat | cut -f1); $(du -h dist/cuda/lat.xz | cut -f1) compressed) for compute capability $CUDA_COMPUTE_CAP"
