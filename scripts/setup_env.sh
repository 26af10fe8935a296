#!/usr/bin/env bash
# Create ./.venv with everything rcfast needs and build rcfast._C into it.
# Idempotent: a second run only rebuilds what changed. Used by test.sh, demo.sh and CI.
# RCFAST_VENV=DIR builds another virtual environment (scripts/gpu_check.sh uses .venv-gpu);
# RCFAST_TORCH_SPEC / RCFAST_TORCH_INDEX_URL choose the torch wheel (default: torch==2.13.0
# from the configured index -- the CPU wheel here, a CUDA build from PyPI on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${RCFAST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
# torch first and pinned, so that no other requirement can pull a (multi-GB) CUDA build.
TORCH_SPEC=${RCFAST_TORCH_SPEC:-torch==${RCFAST_TORCH_VERSION:-2.13.0}}
if [ -n "${RCFAST_TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" --index-url "$RCFAST_TORCH_INDEX_URL" "$TORCH_SPEC"
else
  "${PIP[@]}" "$TORCH_SPEC"
fi
"${PIP[@]}" -r requirements-dev.txt
# The editable install rebuilds rcfast._C from scratch (about 90 s here), so it is skipped when
# nothing it is built from changed since this environment's last successful build: the
# build scripts and metadata, every file under csrc/, torch's version and the build switches.
# The Python sources need no step (an editable install reads them in place).
STAMP="$VENV/.rcfast-build-inputs"
BUILD_INPUTS=$( {
  cat setup.py build_ext.py pyproject.toml
  find csrc -type f | LC_ALL=C sort | xargs cat
  "$VENV/bin/python" -c "import torch; print(torch.__version__)"
  echo "DEBUG=${DEBUG:-} RCFAST_USE_CUDA=${RCFAST_USE_CUDA:-} RCFAST_SKIP_EXTENSION=${RCFAST_SKIP_EXTENSION:-}"
} | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$BUILD_INPUTS" ] \
   && "$VENV/bin/python" -c "import rcfast" >/dev/null 2>&1; then
  echo "setup_env: rcfast is built and its build inputs are unchanged; not rebuilding"
  exit 0
fi
rm -f "$STAMP"
# --no-build-isolation: build against the torch installed above, not a fresh download;
# --use-pep517: otherwise pip 23 runs the legacy `setup.py develop`, which re-invokes
# pip with build isolation (and no torch).
"${PIP[@]}" --no-build-isolation --use-pep517 -e .
echo "$BUILD_INPUTS" > "$STAMP"
