#!/usr/bin/env bash
# The README's main-job command: set up ./.venv, build, then run the consolidation demo.
# Extra arguments go to `rcfast demo` (e.g. `bash scripts/demo.sh --out demo_out`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/rcfast demo "$@"
