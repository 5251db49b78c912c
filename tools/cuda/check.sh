#!/usr/bin/env bash
# The GPU check: kernel and model correctness against the CPU, then benchmarks side by side
# with the Python reference and flash-linear-attention, on one machine in one run.
#
#   tools/cuda/check.sh prepare   # build machine: the CUDA binary (tools/cuda/build.sh) and the
#                                 # reference's Python packages as wheels, into dist/cuda, .whl
#   tools/cuda/check.sh cpu       # any machine: the parts that need no GPU
#   tools/cuda/check.sh gpu       # GPU machine (CUDA 13 runtime from its Python environment):
#                                 # everything; results in ${OUT:-results}/ (summary.md, *.jsonl)
#
# On the lent GPU machines: carry dist/cuda/lat.xz and .whl, and run `tools/cuda/check.sh gpu`.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
MODE=${1:-gpu}
RESULTS=${OUT:-$ROOT/results}
mkdir -p "$RESULTS"
[ "$MODE" = prepare ] || rm -f "$RESULTS"/*.jsonl "$RESULTS"/*.txt "$RESULTS"/summary.md
PY=${PYTHON:-python3}
FAILED=0

step() { echo; echo "== $*"; }
run() { # run LABEL TIMEOUT FILE CMD...: appends the output to FILE (and shows it), keeps
         # going after a failure or a timeout, and remembers it
    local label=$1 limit=$2 file=$3; shift 3
    timeout "$limit" "$@" 2>&1 | tee -a "$file"
    if [ "${PIPESTATUS[0]}" != 0 ]; then echo "!! $label failed or timed out" | tee -a "$RESULTS/failures.txt"; FAILED=1; fi
}

case $MODE in
prepare)
    tools/cuda/build.sh || exit 1
    # Pure-Python packages the GPU machine lacks (it has torch, triton and einops).
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        linear-attention-transformer==0.19.1 local-attention==1.11.2 product-key-memory==0.3.0 \
        axial-positional-embedding==0.3.12 linformer==0.2.3 hyper-connections==0.4.11 \
        torch-einops-utils==0.2.0 CoLT5-attention==0.11.2 fla-core==0.6.0 || exit 1
    du -sh dist/cuda/lat.xz .whl
    ;;
cpu)
    LAT=${LAT:-target/release/lat}
    [ -x "$LAT" ] || cargo build --release -p lat-cli || exit 1
    step "kernels and model: fused CPU kernels against the plain reference"
    run check 600 "$RESULTS/check-cpu.txt" "$LAT" check --device cpu
    step "kernel timing on the CPU (small sizes)"
    run kernel-bench 600 "$RESULTS/kernels.jsonl" "$LAT" kernel-bench --op causal-linear --heads 8 --seq-len 1024,4096 --precision f32 --steps 3
    step "the benchmark scripts parse"
    run python-syntax 60 "$RESULTS/python.txt" $PY -m py_compile tools/cuda/bench_kernels.py tools/cuda/summarize.py tools/reference/bench.py
    ;;
gpu)
    LAT=${LAT:-dist/cuda/lat}
    if [ ! -x "$LAT" ] && [ -f dist/cuda/lat.xz ]; then
        $PY -c "import lzma, shutil; shutil.copyfileobj(lzma.open('dist/cuda/lat.xz'), open('dist/cuda/lat', 'wb'))" && chmod +x dist/cuda/lat
    fi
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # The CUDA 13 libraries (cuBLAS, cuRAND, runtime) that torch's environment ships.
    NV=$($PY -c "import nvidia, os; print(os.pathsep.join(os.path.join(p, d) for p in nvidia.__path__ for d in os.listdir(p)))")
    for d in ${NV//:/ }; do for l in "$d/lib" "$d/lib64"; do [ -d "$l" ] && LD_LIBRARY_PATH=$l:${LD_LIBRARY_PATH:-}; done; done
    export LD_LIBRARY_PATH
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu.txt"

    step "kernels and model on the GPU against the CPU reference"
    run check 300 "$RESULTS/check-gpu.txt" "$LAT" check --device cuda

    step "seed model, one training step and one forward pass, side by side"
    M=$RESULTS/model.jsonl
    for T in 1024 4096 16384; do
        for P in bf16 f32; do
            run "lat train $T $P" 120 "$M" "$LAT" bench --preset seed --mode train --seq-len $T --precision $P --device cuda --steps 5 --json
            run "reference train $T $P" 120 "$M" $PY tools/reference/bench.py --preset seed --mode train --seq-len $T --precision $P --device cuda --steps 5 --json
        done
        run "lat forward $T" 120 "$M" "$LAT" bench --preset seed --mode forward --seq-len $T --device cuda --steps 5 --json
        run "reference forward $T" 120 "$M" $PY tools/reference/bench.py --preset seed --mode forward --seq-len $T --device cuda --steps 5 --json
    done

    step "causal linear attention kernels, bf16, head dim 64, forward+backward"
    SIZES="--batch 1,4,8 --heads 8,16 --seq-len 4096,16384,65536"
    run "lat kernels" 240 "$RESULTS/kernels.jsonl" "$LAT" kernel-bench --op causal-linear $SIZES --precision bf16 --device cuda --steps 10
    run "python kernels" 240 "$RESULTS/kernels.jsonl" $PY tools/cuda/bench_kernels.py $SIZES --steps 10
    ;;
*)
    echo "usage: tools/cuda/check.sh prepare|cpu|gpu" >&2
    exit 2
    ;;
esac

if [ "$MODE" != prepare ]; then
    $PY tools/cuda/summarize.py "$RESULTS" | tee "$RESULTS/summary.md"
fi
exit $FAILED
