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
# --no-build-isolation: build against the torch installed above, not a fresh download;
# --use-pep517: otherwise pip 23 runs the legacy `setup.py develop`, which re-invokes
# pip with build isolation (and no torch).
"${PIP[@]}" --no-build-isolation --use-pep517 -e .
