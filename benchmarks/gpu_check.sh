#!/usr/bin/env bash
# The device checks of issues 16 and 31, run once on a lent GPU machine, from the
# repository root:
#
#     bash benchmarks/gpu_check.sh [options of python -m benchmarks.gpu]
#
# 1. installs the wheels in .whl/ (array-api-compat, array-api-strict; no network there)
#    into /tmp/site, prints the GPU and the library versions;
# 2. python -m benchmarks.gpu_probe: what CuPy does under CUDA graph capture here, step
#    by step (an elementwise kernel, cupy.matmul, handprop's own cuBLAS calls, the fused
#    kernels, a whole training step), every failure with its traceback;
# 3. runs tests/nn, tests/test_device.py and tests/test_graphs.py with the CuPy backend
#    enabled (HANDPROP_TEST_BACKENDS=numpy,array_api_strict,cupy): every fused kernel
#    against its unfused formula on the GPU, real CUDA graphs against eager steps;
# 4. runs python -m benchmarks.gpu: the seed config (handprop with CUDA graphs and
#    without, PyTorch eager and as a CUDA graph), the CNN epoch (handprop with graphs and
#    without, cuDNN), accuracies (GPU vs CPU, graphs vs eager); it writes
#    $OUT/gpu_results.json after every part;
# 5. PyTorch's torch.compile(mode="reduce-overhead") on the seed config, alone and last
#    (its compile is slow): $OUT/gpu_compile.json; SKIP_COMPILE=1 skips it.
#
# Everything printed also goes to $OUT/gpu_check.log ($OUT defaults to ./gpu_out). Every
# step has its own timeout and a failing step does not stop the next; a normal run takes
# about 4.5 minutes on an H200, under 7 at worst (the timeouts add up to 400 s). Handprop is not
# installed: PYTHONPATH=src. Extra arguments go to benchmarks.gpu (``--only seed,cnn,
# layers`` adds the pass-by-pass profile, about 20 s more).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && export OUT
LOG="$OUT/gpu_check.log"
: >"$LOG"
FAILED=()

log() { printf '%s\n' "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run COMMAND under timeout, its output into the log
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    log "=== $name (timeout ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    log "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

log "gpu_check.sh, $(date -u +%FT%TZ), $(pwd), OUT=$OUT"

# -- 1. environment -------------------------------------------------------------------
export PYTHONPATH="$PWD/src"
if compgen -G ".whl/*.whl" >/dev/null; then
    step "install wheels" 20 python3 -m pip install -q --no-index --no-deps \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
    log "no .whl/*.whl here: array-api-compat and array-api-strict must be installed already"
fi
if [ -z "${HANDPROP_TEST_MNIST:-}" ]; then
    for dir in "$PWD/.mnist" "$PWD/../shared/data/mnist"; do
        if [ -d "$dir" ]; then export HANDPROP_TEST_MNIST="$dir" && break; fi
    done
fi
log "PYTHONPATH=$PYTHONPATH HANDPROP_TEST_MNIST=${HANDPROP_TEST_MNIST:-unset}"
GPU_QUERY=name,driver_version,memory.total,clocks.max.sm,power.limit
step "nvidia-smi" 10 bash -c "nvidia-smi -L && nvidia-smi --format=csv --query-gpu=$GPU_QUERY"
step "versions" 30 python3 - <<'EOF'
import importlib, os, platform, sys
print("python", platform.python_version(), sys.executable, "| cores", os.cpu_count())
for name in ("numpy", "torch", "cupy", "array_api_compat", "array_api_strict", "handprop"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), os.path.dirname(module.__file__))
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    print("cudnn", torch.backends.cudnn.version())
except Exception as exc:
    print("torch cuda: ", type(exc).__name__, exc)
try:
    import cupy
    print("cupy cuda runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "driver", cupy.cuda.runtime.driverGetVersion())
except Exception as exc:
    print("cupy cuda:", type(exc).__name__, exc)
EOF

# -- 2. what CuPy does under capture --------------------------------------------------------
export PYTHONUNBUFFERED=1
step "graph probe" 60 python3 -m benchmarks.gpu_probe

# -- 3. the test suite with the CuPy backend -------------------------------------------
# issue 31's first (the fused kernels, the GEMM layouts, the graphs), then the rest
TESTS=(tests/nn/test_kernels.py tests/nn/test_cuda.py tests/test_graphs.py tests/nn)
if [ -e tests/test_device.py ]; then TESTS+=(tests/test_device.py); fi
step "tests (numpy, array_api_strict, cupy)" 100 \
    env HANDPROP_TEST_BACKENDS=numpy,array_api_strict,cupy \
    python3 -m pytest "${TESTS[@]}" -q -rfEs --maxfail=30 --durations=8 -p no:cacheprovider

# -- 4. the measurements ------------------------------------------------------------------
step "benchmarks.gpu" 120 python3 -m benchmarks.gpu --out "$OUT" --only seed,cnn \
    --cpu-budget 15 --seed-budget 30 --cnn-budget 45 "$@"

# -- 5. torch.compile, last ----------------------------------------------------------------
if [ -z "${SKIP_COMPILE:-}" ]; then
    step "torch.compile" 60 python3 -m benchmarks.gpu --out "$OUT" --only compile \
        --json gpu_compile.json
fi

# -- 6. where the results are ------------------------------------------------------------
log "failed steps: ${FAILED[*]:-none}"
log "results: $OUT/gpu_check.log (this log), $OUT/gpu_results.json, $OUT/gpu_compile.json"
ls -l "$OUT" | tee -a "$LOG"
[ ${#FAILED[@]} -eq 0 ]
