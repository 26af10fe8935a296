#!/usr/bin/env bash
# Create ./.venv with everything rcfast needs and build rcfast._C into it.
# Idempotent: a second run only rebuilds what changed. Used by test.sh, demo.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned, so that no other requirement can pull a (multi-GB) CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==${RCFAST_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# --no-build-isolation: build against the torch installed above, not a fresh download;
# --use-pep517: otherwise pip 23 runs the legacy `setup.py develop`, which re-invokes
# pip with build isolation (and no torch).
.venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation --use-pep517 -e .
