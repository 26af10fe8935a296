#!/usr/bin/env bash
# The README's test command: set up ./.venv, build, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k triton`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The CUDA sources must at least compile, even on machines without a GPU.
if command -v nvcc >/dev/null 2>&1 && compgen -G "csrc/cuda/*.cu" >/dev/null; then
  bash scripts/check_cuda_compiles.sh
fi
.venv/bin/python -m pytest -q --durations=15 tests "$@"
