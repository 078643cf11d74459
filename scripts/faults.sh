#!/usr/bin/env bash
# Fault injection on the fast quickstart under `deepspeed --num_gpus 2` (issue 38): a SIGTERM at a
# random step, a stopped and a killed rank, a NaN loss, a hanging reward function, a truncated
# checkpoint. Prints one `FAULT ...` line per fault (exit codes, seconds, steps, metrics equal
# after resume). About 10 minutes on 2 CPU cores. Extra arguments go to pytest (e.g. -k nan).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
log=$(mktemp)
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_faults_e2e.py "$@" >"$log" 2>&1 || status=$?
cat "$log" >&2  # pytest's own report (failures in full) on stderr
grep '^FAULT ' "$log" || true
rm -f "$log"
exit "$status"
