#!/usr/bin/env bash
# The one command to run on a CUDA machine, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. prints nvidia-smi and tool versions
# 2. builds pygen with its CUDA kernels (PYGEN_CUDA=ON pip install --no-build-isolation -e .)
# 3. runs the test suite (the CUDA backend's tests, then the rest: python -m pytest tests)
# 4. runs benchmarks/sanitize_smoke.py under compute-sanitizer memcheck, if it is installed
# 5. times sampling loops eagerly and replayed from a CUDA graph (benchmarks/cuda_graph_sampling.py),
#    and the diffusion model's loop with its UNet vs diffusers' steps (benchmarks/diffusion_sampling.py)
# 6. runs benchmarks/gpu_bench.py and keeps its JSON
#
# Logs and results go to $OUT (the device tool fetches what is there) or /tmp:
#   build.log tests-cuda.log tests-rest.log sanitize.log graph.log bench.log gpu-<stamp>.json results/<device>-<stamp>.json
#   results/cuda-graph-<stamp>.json
# The results file is also copied to benchmarks/results/ in this tree.
# A failed build stops the script; a failed later stage is reported and the others still
# run; the exit status is non-zero if any stage failed. The whole run is held under
# PYGEN_CHECK_BUDGET seconds (default 480): each stage's time limit is cut to what is left,
# and the benchmark stops starting new configurations in time.
# PYGEN_BENCH_ARGS adds arguments to gpu_bench.py, e.g. the coupling ops first and alone:
#   PYGEN_BENCH_ARGS="--ops rq_spline,affine_coupling --bf16-sizes=" bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR/results" benchmarks/results
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
BUDGET="${PYGEN_CHECK_BUDGET:-480}"
PY="${PYTHON:-python}"
FAILED=()

left() { echo $((BUDGET - SECONDS)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# stage NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT_DIR/NAME.log, show the tail.
stage() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, only ${limit}s of the budget left"
    FAILED+=("$name(no time)")
    return 1
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
  if [ -n "${SHOW_FROM:-}" ] && grep -q -- "$SHOW_FROM" "$OUT_DIR/$name.log"; then
    echo "--- $name: exit $rc after $((SECONDS - t0))s; $OUT_DIR/$name.log from '$SHOW_FROM':"
    sed -n "/$SHOW_FROM/,\$p" "$OUT_DIR/$name.log" | head -n 120 | cut -c1-300
  else
    echo "--- $name: exit $rc after $((SECONDS - t0))s; last lines of $OUT_DIR/$name.log:"
    tail -n "${TAIL_LINES:-15}" "$OUT_DIR/$name.log" | cut -c1-300
  fi
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name(exit $rc)")
    return 1
  fi
}

echo "=== machine and versions"
nvidia-smi || true
"$PY" - <<'EOF' || true
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF
(nvcc --version | tail -n 2) || echo "nvcc not found"
cmake --version | head -n 1 || true
echo "ninja $(ninja --version 2>/dev/null || echo 'not found')"
"$PY" -c "import pytest_benchmark" 2>/dev/null && echo "pytest-benchmark installed" || echo "pytest-benchmark not installed"

export PYGEN_CUDA=ON
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# --no-deps: the machine has no network, and torch/numpy are already there.
if ! stage build "$(min 300 "$(left)")" "$PY" -m pip install --no-build-isolation --no-deps -e . -v; then
  echo "build failed: see $OUT_DIR/build.log (errors below)"
  grep -n -i -E "error|fatal" "$OUT_DIR/build.log" | head -n 30 || true
  exit 1
fi
"$PY" -c "import pygen; print('pygen', pygen.__version__, 'backends', pygen.available_backends())"

# Keep at least ~170 s for the sanitizer and the benchmark.
# The CUDA backend's tests first (compiled kernels, quick), then the rest (the Triton kernels
# are JIT-compiled per specialisation on a fresh machine: slower). No -x: every failure is
# listed (-rf), and a stage cut short by its time limit still shows what passed so far.
TAIL_LINES=25 stage tests-cuda "$(min 120 $(($(left) - 230)))" "$PY" -m pytest -q -rf -p no:cacheprovider \
  -k "cuda and not triton" tests || true
TAIL_LINES=25 stage tests-rest "$(min 150 $(($(left) - 180)))" "$PY" -m pytest -q -rf -p no:cacheprovider \
  -k "not (cuda and not triton)" tests || true

SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
if [ -n "$SANITIZER" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage sanitize "$(min 100 $(($(left) - 130)))" \
    "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitize_smoke.py || true
else
  echo "=== sanitize: compute-sanitizer not found, skipped"
fi

# A whole sampling loop per scheduler, eager vs replayed from one CUDA graph.
stage graph "$(min 60 $(($(left) - 120)))" "$PY" benchmarks/cuda_graph_sampling.py \
  --json "$OUT_DIR/results/cuda-graph-$STAMP.json" || true

# The diffusion model's whole loop with its UNet: pygen (eager, CUDA graph) vs diffusers' step.
stage model-loop "$(min 60 $(($(left) - 100)))" "$PY" benchmarks/diffusion_sampling.py --device cuda \
  --batch 1,16,256 --loops ddpm:1000,ddim:50 --reps 2 --json "$OUT_DIR/results/model-loop-$STAMP.json" || true

JSON="$OUT_DIR/gpu-$STAMP.json"
BENCH_LEFT=$(($(left) - 10))
# shellcheck disable=SC2086  # PYGEN_BENCH_ARGS is split into words on purpose
SHOW_FROM="^== summary" TAIL_LINES=30 stage bench "$BENCH_LEFT" "$PY" benchmarks/gpu_bench.py --out "$JSON" \
  --max-seconds $((BENCH_LEFT - 45)) ${PYGEN_BENCH_ARGS:-} || true
if [ -f "$JSON" ]; then
  SLUG="$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['metadata']['device_slug'])" "$JSON")"
  cp "$JSON" "$OUT_DIR/results/$SLUG-$STAMP.json"
  cp "$JSON" "benchmarks/results/$SLUG-$STAMP.json"
  echo "results: $OUT_DIR/results/$SLUG-$STAMP.json (copy in benchmarks/results/)"
fi

echo "=== done in ${SECONDS}s"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all stages passed"
