#!/usr/bin/env bash
# One command for a GPU machine (fresh, x86_64, no .venv in the copied tree): build tokcomp's
# CUDA kernels in place, run their parity tests on CUDA, benchmark them against the PyTorch
# references. Uses the machine's own torch (no network needed); total under ~8 minutes.
#
#   bash eval/gpu_check.sh                # results (logs, JSON) go to $OUT or results/gpu_check
#
# Environment: PYTHON (interpreter with torch, default: the first of python3 / python that
# imports torch), OUT (results folder), TOKCOMP_WHEELS (a folder of wheels, e.g. pytest and
# ninja, installed with --no-index when missing), MAX_JOBS (parallel compile jobs),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's), TOKCOMP_GPU_CHECK_BUDGET (seconds, 470).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT_DIR=${OUT:-$ROOT/results/gpu_check}
mkdir -p "$OUT_DIR"
START=$(date +%s)
BUDGET=${TOKCOMP_GPU_CHECK_BUDGET:-470}  # seconds for the whole script (the model benchmark too)
STATUS=0
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
fail() { echo "FAILED: $*"; STATUS=1; }
# limit SECONDS: a step's timeout, at most SECONDS and never past the script's budget.
limit() {
    local left=$(( BUDGET - ($(date +%s) - START) ))
    [ "$left" -lt 10 ] && left=10
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# --- 1. Python with torch ---------------------------------------------------------------------
step "python and torch"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$(command -v "$candidate")
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "no python with torch found; trying a venv with pip install torch==2.14.1 (needs an index)"
    python3 -m venv "$ROOT/.venv-gpu" && "$ROOT/.venv-gpu/bin/pip" install -q torch==2.14.1 \
        && PY=$ROOT/.venv-gpu/bin/python
    [ -n "$PY" ] || { echo "FAILED: no torch available on this machine"; exit 1; }
fi
"$PY" - <<'EOF'
import platform, shutil, subprocess, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"torch CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
try:
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
          .splitlines()[-1])
except OSError:
    print("nvcc: not found on PATH nor at /usr/local/cuda/bin/nvcc")
EOF

# pytest / ninja / setuptools: use what is there; install from local wheels if given.
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'ninja', 'setuptools') if u.find_spec(m) is None))")
if [ -n "$missing" ] && [ -n "${TOKCOMP_WHEELS:-}" ]; then
    echo "installing $missing from $TOKCOMP_WHEELS"
    "$PY" -m pip install -q --no-index --find-links "$TOKCOMP_WHEELS" $missing \
        || echo "(could not install $missing from $TOKCOMP_WHEELS)"
elif [ -n "$missing" ]; then
    echo "missing python packages: $missing (pip install may fail offline; continuing)"
    "$PY" -m pip install -q $missing 2>/dev/null || true
fi

# --- 2. build the extension with CUDA, in place ----------------------------------------------
step "build tokcomp._C with TOKCOMP_CUDA=1 (in place)"
export TOKCOMP_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # Only this machine's GPU: a faster build. Falls back to setup.py's default without a GPU.
    arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" \
        2>/dev/null) && export TORCH_CUDA_ARCH_LIST=$arch
fi
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} MAX_JOBS=$MAX_JOBS"
if timeout "$(limit 300)" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
    echo "build ok ($(ls tokcomp/_C*.so))"
else
    tail -40 "$OUT_DIR/build.log"
    fail "build (full log: $OUT_DIR/build.log)"
    exit 1
fi
"$PY" -c "import tokcomp._C as c; assert c.WITH_CUDA, 'built without CUDA'; print('WITH_CUDA', c.WITH_CUDA)" \
    || { fail "tokcomp._C does not load with CUDA"; exit 1; }

# --- 3. parity tests on CUDA (and CPU) -------------------------------------------------------
step "tests/test_ops_parity.py"
if "$PY" -c "import pytest" 2>/dev/null; then
    # --noconftest: the shared fixtures need timm, which these tests do not.
    timeout "$(limit 150)" "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/test_ops_parity.py \
        --junitxml="$OUT_DIR/parity.xml" 2>&1 | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "parity tests"
else
    echo "pytest is not installed: falling back to bench_ops.py --check (max |diff| per case)"
fi

# --- 4. benchmark ------------------------------------------------------------------------------
step "eval/bench_ops.py --device cuda"
for dtype in float32 bfloat16; do
    timeout "$(limit 90)" "$PY" eval/bench_ops.py --device cuda --dtype "$dtype" --check \
        --repeats 21 --inner 10 --json "$OUT_DIR/bench_ops_cuda_$dtype.json" \
        || fail "bench_ops cuda $dtype"
done

# --- 5. model benchmark ------------------------------------------------------------------------
step "model benchmark"
# >>> OWNER: add the model benchmark here (e.g. timeout "$(limit 120)" "$PY" -m tokcomp bench
# >>> ... --device cuda), writing its results under "$OUT_DIR". Whole script: under ~8 minutes.
# <<< end of the model benchmark

step "done in $(( $(date +%s) - START ))s, status $STATUS (results in $OUT_DIR)"
exit $STATUS
