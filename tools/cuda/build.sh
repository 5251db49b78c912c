#!/usr/bin/env bash
# Builds `lat` with the `cuda` feature on a machine without CUDA or a GPU: the CUDA 13.0
# toolchain comes from PyPI wheels, and a stub of libcuda (the driver, which no wheel ships)
# satisfies the linker. The stub is used at link time only; at run time the GPU machine's own
# driver is loaded.
#
#     tools/cuda/build.sh            # -> dist/cuda/lat (stripped) and lat.xz, for compute capability 90
#     CUDA_COMPUTE_CAP=80 tools/cuda/build.sh
#     LAT_CUDA_PACK=0 tools/cuda/build.sh   # skip lat.xz
#     LAT_CUDA_PROFILE=cuda-check LAT_CUDA_PACK=0 tools/cuda/build.sh   # CI: compile and link only, unoptimised
#
# The toolchain (about 670 MB of wheels, unpacked) is cached outside the clone, in
# ${LAT_CUDA_CACHE:-~/.cache/lat-cuda}, so repeated builds and fresh clones download it once;
# the build itself goes to target/cuda/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${LAT_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lat-cuda}
CU=$CACHE/root/nvidia/cu13
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
say() { echo "cuda build: $*" >&2; }

# The GPU machines' driver (580) supports CUDA 13.0: newer toolchains emit PTX it cannot load.
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14"

for tool in python3 gcc cargo; do
    command -v $tool >/dev/null || { say "needs $tool on the PATH"; exit 1; }
done
if [ ! -x "$CU/bin/nvcc" ]; then
    say "downloading the CUDA 13.0 toolchain wheels from PyPI into $CACHE (about 670 MB, once)"
    mkdir -p "$CACHE/wheels" "$CACHE/root"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --python-version 3.11 \
        -d "$CACHE/wheels" $WHEELS
    say "unpacking them"
    # A wheel is a zip archive. Python's unpacker (where `unzip` is missing) drops the
    # executable bits, so they are set again.
    for w in "$CACHE"/wheels/*.whl; do
        if command -v unzip >/dev/null; then unzip -q -o "$w" -d "$CACHE/root"; else python3 -m zipfile -e "$w" "$CACHE/root"; fi
    done
    chmod +x "$CU"/bin/* "$CU"/nvvm/bin/*
else
    say "using the CUDA toolchain cached in $CACHE"
fi
# Unversioned names for the linker.
for lib in "$CU"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

# libcuda stub: one empty function per driver symbol that cudarc's bindings name. cudarc's
# sources come from the cargo cache; a fresh cache fetches them first.
cudarc_src() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1 || true; }
CUDARC=$(cudarc_src)
if [ -z "$CUDARC" ]; then
    say "fetching the crates (cudarc's sources name the driver's symbols)"
    (cd "$ROOT" && cargo fetch --quiet)
    CUDARC=$(cudarc_src)
    [ -n "$CUDARC" ] || { say "cudarc 0.19 is not in the cargo cache even after cargo fetch"; exit 1; }
fi
say "building the libcuda link stub from $(basename "$CUDARC")"
mkdir -p "$CACHE/stub"
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDARC"/src/driver/sys/*.rs | sort -u | sed 's/.*/void &(void) {}/' > "$CACHE/stub/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CACHE/stub/libcuda.so" "$CACHE/stub/cuda_stub.c"
ln -sf libcuda.so "$CACHE/stub/libcuda.so.1"

export PATH=$CU/bin:$PATH CUDA_HOME=$CU CUDA_PATH=$CU NVCC=$CU/bin/nvcc
export LIBRARY_PATH=$CACHE/stub:$CU/lib:${LIBRARY_PATH:-}
export RUSTFLAGS="${RUSTFLAGS:-} -L $CACHE/stub -L $CU/lib"
cd "$ROOT"
PROFILE=${LAT_CUDA_PROFILE:-release}
say "compiling lat with --features cuda for compute capability $CUDA_COMPUTE_CAP (profile $PROFILE, target/cuda; a clean release build takes about 17 minutes on 2 cores)"
cargo build --profile "$PROFILE" -p lat-cli --features cuda --target-dir target/cuda
mkdir -p dist/cuda
cp "target/cuda/$PROFILE/lat" dist/cuda/lat
strip dist/cuda/lat
if [ "${LAT_CUDA_PACK:-1}" != 0 ]; then
    # Compressed for travel: most of the binary is PTX text.
    xz -T0 -6 -c dist/cuda/lat > dist/cuda/lat.xz
    say "built dist/cuda/lat ($(du -h dist/cuda/lat | cut -f1); $(du -h dist/cuda/lat.xz | cut -f1) compressed)"
else
    say "built dist/cuda/lat ($(du -h dist/cuda/lat | cut -f1))"
fi
