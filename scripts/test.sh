#!/usr/bin/env bash
# The README's test command: set up ./.venv, build, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k triton`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The CUDA sources must at least compile, even on machines without a GPU (about 40 s: skipped
# when csrc/, this check and the compilers are unchanged since it last passed in this .venv).
if command -v nvcc >/dev/null 2>&1 && compgen -G "csrc/cuda/*.cu" >/dev/null; then
  CUDA_STAMP=.venv/.rcfast-cuda-check
  CUDA_INPUTS=$( {
    find csrc -type f | LC_ALL=C sort | xargs cat
    cat scripts/check_cuda_compiles.sh
    nvcc --version; g++ --version
    .venv/bin/python -c "import torch; print(torch.__version__)"
  } | sha256sum | cut -d' ' -f1)
  if [ -f "$CUDA_STAMP" ] && [ "$(cat "$CUDA_STAMP")" = "$CUDA_INPUTS" ]; then
    echo "test.sh: the CUDA sources compiled before and are unchanged; not recompiling"
  else
    rm -f "$CUDA_STAMP"
    bash scripts/check_cuda_compiles.sh
    echo "$CUDA_INPUTS" > "$CUDA_STAMP"
  fi
fi
.venv/bin/python -m pytest -q --durations=15 tests "$@"
