#!/usr/bin/env bash
# Set up .venv if needed, then lint, type-check and run the whole test suite:
# fast tests first, then the end-to-end runs under the real deepspeed launcher.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-disabled}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
.venv/bin/ruff check rl rewards launch tests benchmarks examples
.venv/bin/ruff format --check rl rewards launch tests benchmarks examples
.venv/bin/mypy rl rewards
.venv/bin/python -m pytest -q -m "not e2e" tests
.venv/bin/python -m pytest -q -m e2e tests
