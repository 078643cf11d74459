#!/usr/bin/env bash
# Fault injection on the fast quickstart under `deepspeed --num_gpus 2` (issue 38): a SIGTERM at a
# random step, a stopped and a killed rank, a NaN loss, a hanging reward function, a truncated
# checkpoint. Prints one `FAULT ...` line per fault (exit codes, seconds, steps, metrics equal
# after resume). About 10 minutes on 2 CPU cores. Extra arguments go to pytest (e.g. -k nan).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_faults_e2e.py "$@" 2>&1 |
  tee /dev/stderr | grep '^FAULT ' || true
