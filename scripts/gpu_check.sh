#!/usr/bin/env bash
# The GPU check: on a machine with 1-8 NVIDIA GPUs, every quickstart for a few steps on all
# of them (transformers and vLLM with sleep mode, ZeRO-2 and ZeRO-3, the implicit PRM,
# PAV, PPO, the bf16 chat model), then a throughput run of a randomly initialised model at
# real size (Qwen2-1.5B config, bf16, 512-token responses): tokens/s per phase, the weight
# sync's share of a step, peak GPU memory and MFU. Everything lands in
# benchmarks/results/gpu/ (summary.md, one log per case, throughput/).
#
#   bash scripts/gpu_check.sh            # run it (needs nvidia-smi and the GPUs)
#   bash scripts/gpu_check.sh --dry-run  # print the plan and exit 0 (any machine)
#
# Environment:
#   STEPS         training steps per case (default 4)
#   GPUS          GPUs per case (default: all)
#   PYTHON        an interpreter that already has the stack (torch, deepspeed, transformers,
#                 ...): used as is, scripts/setup.sh is not run (default: .venv after setup)
#   CASES         comma-separated case names to run (default: all)
#   CASE_TIMEOUT  seconds one case may run before it is stopped and counted failed (1800)
# Without vLLM importable, the vLLM cases are reported as skipped, not run.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2
  exit 2
fi

if [ "$DRY" = 1 ]; then
  GPUS=${GPUS:-8}
else
  found=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
  if [ "${found:-0}" -lt 1 ]; then
    echo "error: no NVIDIA GPU found (nvidia-smi -L lists none); use --dry-run to see the plan" >&2
    exit 1
  fi
  GPUS=${GPUS:-$found}
fi
STEPS=${STEPS:-4}
CASES=${CASES:-}
CASE_TIMEOUT=${CASE_TIMEOUT:-1800}
OUT=benchmarks/results/gpu
RUNS=runs/gpu_check
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  DS="$PY -m deepspeed.launcher.runner --num_gpus $GPUS"
else
  PY=.venv/bin/python
  DS=".venv/bin/deepspeed --num_gpus $GPUS"
fi
# every case: a few steps on every GPU, evaluated at the end, its own run directory
common() {
  echo "output_dir=$RUNS/$1 trainer.overwrite=true trainer.max_steps=$STEPS" \
    "trainer.eval_every=$STEPS trainer.save_every=$STEPS logging.progress_bar=false" \
    "rollout.prompts_per_step=$((GPUS * 4)) data.eval_size=$((GPUS * 16))"
}

failures=0
row() { echo "| $1 | $2 | $3 | $4 |" | tee -a "$OUT/summary.md"; }
run() {  # run NAME COMMAND...: log to $OUT/logs/NAME.log, a row in summary.md
  local name=$1
  shift
  if [ -n "$CASES" ] && [[ ",$CASES," != *",$name,"* ]]; then
    return 0
  fi
  echo "== $name: $(printf '%q ' "$@")"
  [ "$DRY" = 1 ] && return 0
  local start status
  start=$(date +%s)
  if timeout --signal=TERM --kill-after=30 "$CASE_TIMEOUT" "$@" >"$OUT/logs/$name.log" 2>&1; then
    status=ok
  else
    status="FAILED (exit $?)"
    failures=$((failures + 1))
  fi
  local accuracy
  accuracy=$(grep -o 'step [0-9]*: eval/accuracy [0-9.]*' "$OUT/logs/$name.log" | tail -1 || true)
  row "$name" "$status" "$(($(date +%s) - start)) s" "${accuracy:-}"
}
run_vllm() {  # a case that needs vLLM: reported as skipped where vLLM does not import
  if [ "$DRY" = 0 ] && [ "$HAVE_VLLM" = 0 ]; then
    if [ -z "$CASES" ] || [[ ",$CASES," == *",$1,"* ]]; then
      row "$1" "skipped: vllm not installed" "" ""
    fi
    return 0
  fi
  run "$@"
}

echo "gpu_check: $GPUS GPU(s), $STEPS steps per case, results in $OUT/"
HAVE_VLLM=1
if [ "$DRY" = 0 ]; then
  [ -n "${PYTHON:-}" ] || bash scripts/setup.sh
  "$PY" -c "import vllm" >/dev/null 2>&1 || HAVE_VLLM=0
  mkdir -p "$OUT/logs" "$RUNS"
  {
    echo "# GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/    /'
    "$PY" -c "import torch, deepspeed, transformers; print('    torch', torch.__version__, \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
    echo
    echo "| case | status | wall | last eval |"
    echo "|---|---|---|---|"
  } >"$OUT/summary.md"
fi

Q=configs/quickstart.yaml
run zero2-transformers $DS launch/train_rl.py --config $Q $(common zero2-transformers) deepspeed.zero_stage=2
run zero3-transformers $DS launch/train_rl.py --config $Q $(common zero3-transformers) deepspeed.zero_stage=3
run chat-bf16-transformers $DS launch/train_rl.py --config configs/quickstart_chat.yaml \
  $(common chat-bf16-transformers) rollout.backend=transformers
run implicit-prm $DS launch/train_rl.py --config configs/quickstart_implicit_prm.yaml \
  $(common implicit-prm)
run pav-verifier $DS launch/train_pav.py --config configs/quickstart_pav.yaml \
  pav.output_dir=$RUNS/pav-verifier pav.prompts=$((GPUS * 16)) pav.epochs=1 \
  logging.progress_bar=false
run pav $DS launch/train_rl.py --config configs/quickstart_pav.yaml $(common pav) \
  "reward.heads=[{head: pav, kwargs: {path: $RUNS/pav-verifier, prover_k: 4}}]"
run ppo $DS launch/train_rl.py --config configs/quickstart_ppo.yaml $(common ppo)

# Throughput at real size: random Qwen2-1.5B weights in bf16, 512-token responses.
MODEL=$RUNS/qwen2-1.5b-random
if [ "$HAVE_VLLM" = 1 ]; then TP_CONFIGS=zero2-transformers,zero2-vllm,zero3-vllm; else TP_CONFIGS=zero2-transformers; fi
run random-model $PY benchmarks/random_model.py --out $MODEL --size qwen2-1.5b
run throughput $PY benchmarks/throughput.py --configs $TP_CONFIGS \
  --ranks "$GPUS" --steps 5 --warmup 2 --out "$OUT/throughput" --runs-dir "$RUNS/throughput" \
  model.path=$MODEL model.dtype=bfloat16 model.gradient_checkpointing=true \
  rollout.max_new_tokens=512 rollout.prompts_per_step=$((GPUS * 8)) rollout.group_size=8 \
  rollout.vllm_sleep_mode=true rollout.vllm_gpu_memory_utilization=0.4 \
  trainer.micro_batch_size=8 trainer.eval_every=0 data.eval_size=$GPUS

run zero3-offload $DS launch/train_rl.py --config $Q $(common zero3-offload) \
  deepspeed.config=configs/deepspeed/zero3_offload.json algo.kl_coef=0.01
run_vllm zero2-vllm-sleep $DS launch/train_rl.py --config $Q $(common zero2-vllm-sleep) \
  deepspeed.zero_stage=2 rollout.backend=vllm rollout.vllm_sleep_mode=true
run_vllm zero3-vllm-sleep $DS launch/train_rl.py --config $Q $(common zero3-vllm-sleep) \
  deepspeed.zero_stage=3 rollout.backend=vllm rollout.vllm_sleep_mode=true
run_vllm chat-bf16-vllm $DS launch/train_rl.py --config configs/quickstart_chat.yaml \
  $(common chat-bf16-vllm) rollout.backend=vllm rollout.vllm_sleep_mode=true

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing was run"
  exit 0
fi
echo "gpu_check: $failures case(s) failed; see $OUT/summary.md"
[ "$failures" = 0 ]
