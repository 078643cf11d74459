#!/usr/bin/env bash
# Create .venv (once) with the pinned CPU stack and the project installed editable.
# Idempotent: a second call only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.setup-$(cat requirements.txt constraints.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/pip" install -q -c constraints.txt torch==2.13.0
DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -c constraints.txt -r requirements.txt
"$VENV/bin/pip" install -q -c constraints.txt --no-deps -e .
touch "$stamp"
echo "setup: environment ready in $VENV"
