#!/usr/bin/env bash
# One command that verifies rcfast on a machine with an NVIDIA GPU (sm_80 / sm_90).
#
#   bash scripts/gpu_check.sh            # full check, ~8 min on an H100/H200 (install included)
#   bash scripts/gpu_check.sh --smoke    # ~20 s once the environment exists: scripts/gpu_smoke.py only
#   bash scripts/gpu_check.sh --out DIR  # where the report goes (default: gpu-check/)
#
# Steps (each with its own time limit; the first failure does not hide the others):
#   1. environment: a separate .venv-gpu with a CUDA build of torch (PyPI's default Linux wheel;
#      RCFAST_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 to choose another), the pinned
#      requirements, rcfast built with RCFAST_USE_CUDA=1; checked: torch sees the GPU and rcfast has
#      its cuda and triton backends;
#   2. smoke: every GPU kernel against the float64 reference, no host sync on a repeated call, fp16
#      GradScaler steps (scripts/gpu_smoke.py);
#   3. tests: every test marked `gpu`: each loss's triton and cuda backends against the reference
#      (boundary sweeps, fuzz against float64), DALI's `mixed` decoder, fp16 GradScaler runs, NCCL DDP
#      over the GPUs present, the no-host-sync tests;
#   4. benchmarks, quick modes: triton and cuda vs eager and torch.compile (and Liger-Kernel when it
#      installs), as fractions of the copy bandwidth measured in the same run.
# Everything lands in one report, DIR/report.md, with each step's status and output; the script
# exits non-zero when any step fails, and says which.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MODE=full
OUT=gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.md"
VENV=${RCFAST_VENV:-.venv-gpu}
PY="$REPO/$VENV/bin/python"
STARTED=$(date +%s)
FAILED=()

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check.sh: FAIL: no NVIDIA GPU here (nvidia-smi -L failed); this script needs one" >&2
  exit 1
fi

{
  echo "# rcfast GPU check ($MODE)"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo "- GPUs: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd ';' -)"
  echo
} > "$REPORT"

# run NAME TIMEOUT_S COMMAND...: run one step, append its status and output tail to the report.
run() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$(echo "$name" | tr ' /' '__').log" t0=$(date +%s) rc
  echo "==> $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$log") 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 )) status=PASS
  if [ $rc -ne 0 ]; then
    status="FAIL (exit $rc$([ $rc -eq 124 ] && echo ': over its time limit'))"
    FAILED+=("$name")
  fi
  {
    echo "## $name: $status, ${took} s"
    echo
    echo '```'
    tail -n 60 "$log"
    echo '```'
    echo
  } >> "$REPORT"
  echo "<== $name: $status (${took} s)"
}

environment() {
  if [ ! -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    RCFAST_VENV="$VENV" bash scripts/setup_env.sh || return 1
  fi
  # Build (again) with the CUDA kernels; MAX_JOBS: nvcc runs in parallel on the machine's cores.
  RCFAST_USE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$REPO/$VENV/bin/pip" install --quiet --disable-pip-version-check \
    --no-build-isolation --use-pep517 -e . || return 1
  # Liger-Kernel, for the benchmark's comparison only: --no-deps, so it cannot change torch or triton.
  "$REPO/$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps liger-kernel \
    || echo "liger-kernel did not install: the benchmarks skip its column"
  "$PY" - <<'EOF'
import sys
import torch
import rcfast
print(f"torch {torch.__version__} CUDA {torch.version.cuda} device {torch.cuda.get_device_name()}")
print("rcfast backends:", rcfast.available_backends())
missing = [b for b in ("cuda", "triton") if b not in rcfast.available_backends()]
if not torch.cuda.is_available() or missing:
    sys.exit(f"FAIL: torch.cuda.is_available()={torch.cuda.is_available()}, missing rcfast backends {missing}")
EOF
}

if [ "$MODE" = smoke ] && [ -x "$PY" ]; then
  echo "(smoke: using the existing $VENV; run without --smoke to rebuild it)"
else
  run "environment" 420 environment
fi
if [ ${#FAILED[@]} -eq 0 ]; then
  run "smoke" 60 "$PY" scripts/gpu_smoke.py
  if [ "$MODE" = full ]; then
    # Every backend parameter that runs on CUDA tensors is marked gpu (the kernel files' triton/cuda
    # matrix, boundary sweeps and fuzz against float64), with the runs, DALI mixed and no-sync tests.
    run "tests marked gpu" 420 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests
    run "bench: dense loss (triton, cuda)" 150 "$PY" bench/bench_triton_gpu.py --quick --output "$OUT/kd_loss_gpu.md"
    for bench in bench_sparse_kd bench_fused_linear; do
      if [ -f "bench/$bench.py" ] && grep -q -- "--gpu" "bench/$bench.py"; then
        run "bench: $bench" 300 "$PY" "bench/$bench.py" --gpu --quick --out "$OUT/$bench.md"
      fi
    done
  fi
fi

TOTAL=$(( $(date +%s) - STARTED ))
{
  echo "## Summary"
  echo
  if [ ${#FAILED[@]} -eq 0 ]; then
    echo "All steps passed in ${TOTAL} s."
  else
    echo "FAILED: ${FAILED[*]} (${TOTAL} s)."
  fi
  for table in "$OUT"/*.md; do
    [ "$table" = "$REPORT" ] && continue
    echo
    echo "### $(basename "$table")"
    echo
    cat "$table"
  done
} >> "$REPORT"
echo "report: $REPORT"
if [ ${#FAILED[@]} -ne 0 ]; then
  echo "gpu_check.sh: FAILED: ${FAILED[*]}" >&2
  exit 1
fi
echo "gpu_check.sh: all passed in ${TOTAL} s"
