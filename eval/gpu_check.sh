#!/usr/bin/env bash
# One command for a GPU machine (an H200: fresh, x86_64, the repo tree copied without .venv):
#   1. finds a python with torch and prints the versions (python, torch, CUDA, GPU, nvcc, cupy);
#   2. installs the wheels of a .whl folder, if there is one (pip --no-index, into a private
#      folder on PYTHONPATH): e.g. cupy-cuda13x and its needs when the machine lacks cupy;
#   3. builds tokcomp._C with CUDA in place (TOKCOMP_CUDA=1, this GPU's architecture only) and
#      prints the dispatcher's first-call checks of every op on CUDA (tokcomp.backend verbose);
#   4. runs every op's parity tests on CUDA tensors (float32, float16, bfloat16; finite and
#      non-finite inputs) for both GPU routes, the compiled kernels and the cupy kernels
#      (skipped, with a message, without cupy);
#   5. benchmarks the ops against their PyTorch references (eval/bench_ops.py, both routes);
#   6. benchmarks DeiT-S and ViT-B/16 at batch 256, fp16 autocast: unpruned vs ToMe r=13,
#      PiToMe, DiffRate, Zero-TPrune (eval/bench_gpu_models.py).
# Needs no network. Whole script: under 8 minutes on one H200 (each step has a time limit).
#
#   bash eval/gpu_check.sh                # logs and JSON go to $OUT or results/gpu_check
#
# Environment: PYTHON (interpreter with torch, default: the first of python3 / python that
# imports torch), OUT (results folder), TOKCOMP_WHEELS (wheel folder, default .whl), MAX_JOBS
# (parallel compile jobs, default: all cores), TORCH_CUDA_ARCH_LIST (default: the visible GPU's),
# TOKCOMP_GPU_CHECK_BUDGET (seconds for the whole script, default 470).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT_DIR=${OUT:-$ROOT/results/gpu_check}
mkdir -p "$OUT_DIR"
START=$(date +%s)
BUDGET=${TOKCOMP_GPU_CHECK_BUDGET:-470}
STATUS=0
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # tokcomp from this tree (not installed)
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
fail() { echo "FAILED: $*"; STATUS=1; }
# limit SECONDS: a step's timeout, at most SECONDS and never past the script's budget.
limit() {
    local left=$(( BUDGET - ($(date +%s) - START) ))
    [ "$left" -lt 10 ] && left=10
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# --- 1. Python with torch ---------------------------------------------------------------------
step "python, torch, CUDA"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$(command -v "$candidate")
            break
        fi
    done
fi
[ -n "$PY" ] || { echo "FAILED: no python with torch on this machine (set PYTHON)"; exit 1; }

# --- 2. wheels carried in .whl ----------------------------------------------------------------
WHEELS=${TOKCOMP_WHEELS:-$ROOT/.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=/tmp/tokcomp-wheels
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl; then
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        fail "installing the wheels of $WHEELS"
    fi
else
    echo "no wheels in $WHEELS: using the packages installed on this machine"
fi

"$PY" - <<'EOF'
import importlib, platform, shutil, subprocess, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"torch CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
try:
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
          .splitlines()[-1])
except (OSError, IndexError):
    print("nvcc: not found on PATH nor at /usr/local/cuda/bin/nvcc")
for name in ("cupy", "timm", "pytest", "xdist", "ninja"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '(no version)')}")
    except Exception as err:  # any import failure is worth printing, not stopping for
        print(f"{name}: not importable ({type(err).__name__}: {err})")
EOF
if "$PY" -c "import cupy" 2>/dev/null; then
    CUPY=1
else
    CUPY=0
    echo "cupy route SKIPPED: cupy is not installed here; put a cupy-cuda13x wheel (and its needs:"
    echo "fastrlock, cuda-pathfinder) for this python in .whl/ to test it"
fi

# --- 3. build the extension with CUDA, in place ----------------------------------------------
step "build tokcomp._C with TOKCOMP_CUDA=1 (in place)"
export TOKCOMP_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # Only this machine's GPU (sm_90 on an H200): the fastest build.
    arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" \
        2>/dev/null) && export TORCH_CUDA_ARCH_LIST=$arch
fi
"$PY" -c "import ninja" 2>/dev/null || echo "(ninja missing: the sources compile one at a time)"
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} MAX_JOBS=$MAX_JOBS"
if timeout "$(limit 300)" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
    echo "build ok ($(ls tokcomp/_C*.so))"
else
    tail -40 "$OUT_DIR/build.log"
    fail "build (full log: $OUT_DIR/build.log)"
    exit 1
fi
"$PY" -c "
import tokcomp, tokcomp._C as c
assert c.WITH_CUDA, 'built without CUDA'
print('WITH_CUDA', c.WITH_CUDA, '| backend(cuda):', tokcomp.backend('cuda'))" \
    || { fail "tokcomp._C does not load with CUDA"; exit 1; }
# The dispatcher's first-call parity checks (tokcomp.ops.selfcheck), every op and dtype.
"$PY" -c "
import torch, tokcomp
from tokcomp.ops import dispatch, selfcheck
device = torch.device('cuda', torch.cuda.current_device())
for name in selfcheck.CASES:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dispatch.checked_route(name, device, dtype)
for name, report in tokcomp.backend(device, verbose=True).items():
    print(f'{name}: {report}')
assert 'failed' not in str(tokcomp.backend(device, verbose=True)), 'a first-call check failed'" \
    || fail "first-call checks of the CUDA route"

# --- 4. parity tests on CUDA: compiled and cupy routes ---------------------------------------
step "tests/test_ops_parity.py on CUDA (routes: compiled$([ "$CUPY" = 1 ] && echo ', cupy'))"
if "$PY" -c "import pytest" 2>/dev/null; then
    args=(-q -p no:cacheprovider --noconftest -k "cuda or dispatcher" --junitxml="$OUT_DIR/parity.xml")
    "$PY" -c "import xdist" 2>/dev/null && args+=(-n 4)
    # --noconftest: the shared fixtures build timm models, which these tests do not need. The
    # CPU route is tested on the CI machine; here only CUDA tensors (and the dispatcher's view).
    timeout "$(limit 180)" "$PY" -m pytest "${args[@]}" tests/test_ops_parity.py 2>&1 | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "parity tests"
else
    echo "pytest is not installed: relying on bench_ops.py --check (max |diff| per case)"
fi

# --- 5. op benchmarks ------------------------------------------------------------------------
step "eval/bench_ops.py --device cuda"
routes=(compiled)
[ "$CUPY" = 1 ] && routes+=(cupy)
for route in "${routes[@]}"; do
    for dtype in float32 float16; do
        timeout "$(limit 60)" "$PY" eval/bench_ops.py --device cuda --route "$route" \
            --dtype "$dtype" --check --warmup 3 --repeats 11 --inner 10 \
            --json "$OUT_DIR/bench_ops_cuda_${route}_$dtype.json" || fail "bench_ops $route $dtype"
    done
done

# --- 6. model benchmark ------------------------------------------------------------------------
step "eval/bench_gpu_models.py: DeiT-S and ViT-B/16, batch 256, fp16 autocast"
timeout "$(limit 150)" "$PY" eval/bench_gpu_models.py --device cuda --batch-size 256 \
    --json "$OUT_DIR/bench_models.json" || fail "model benchmark"

step "done in $(( $(date +%s) - START ))s, status $STATUS (results in $OUT_DIR)"
exit $STATUS
