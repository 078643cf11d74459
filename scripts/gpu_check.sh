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
# Environment: STEPS (training steps per case, default 4), GPUS (default: all GPUs).
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
OUT=benchmarks/results/gpu
RUNS=runs/gpu_check
PY=.venv/bin/python
DS=".venv/bin/deepspeed --num_gpus $GPUS"
# every case: a few steps on every GPU, evaluated at the end, its own run directory
common() {
  echo "output_dir=$RUNS/$1 trainer.overwrite=true trainer.max_steps=$STEPS" \
    "trainer.eval_every=$STEPS trainer.save_every=$STEPS logging.progress_bar=false" \
    "rollout.prompts_per_step=$((GPUS * 4)) data.eval_size=$((GPUS * 16))"
}

failures=0
run() {  # run NAME COMMAND...: log to $OUT/logs/NAME.log, a row in summary.md
  local name=$1
  shift
  echo "== $name: $(printf '%q ' "$@")"
  [ "$DRY" = 1 ] && return 0
  local start status
  start=$(date +%s)
  if "$@" >"$OUT/logs/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; failures=$((failures + 1)); fi
  local accuracy
  accuracy=$(grep -o 'step [0-9]*: eval/accuracy [0-9.]*' "$OUT/logs/$name.log" | tail -1 || true)
  echo "| $name | $status | $(($(date +%s) - start)) s | ${accuracy:-} |" | tee -a "$OUT/summary.md"
}

echo "gpu_check: $GPUS GPU(s), $STEPS steps per case, results in $OUT/"
if [ "$DRY" = 0 ]; then
  bash scripts/setup.sh
  mkdir -p "$OUT/logs" "$RUNS"
  {
    echo "# GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
    echo
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/    /'
    echo
    echo "| case | status | wall | last eval |"
    echo "|---|---|---|---|"
  } >"$OUT/summary.md"
fi

Q=configs/quickstart.yaml
run zero2-transformers $DS launch/train_rl.py --config $Q $(common zero2-transformers) deepspeed.zero_stage=2
run zero3-transformers $DS launch/train_rl.py --config $Q $(common zero3-transformers) deepspeed.zero_stage=3
run zero2-vllm-sleep $DS launch/train_rl.py --config $Q $(common zero2-vllm-sleep) \
  deepspeed.zero_stage=2 rollout.backend=vllm rollout.vllm_sleep_mode=true
run zero3-vllm-sleep $DS launch/train_rl.py --config $Q $(common zero3-vllm-sleep) \
  deepspeed.zero_stage=3 rollout.backend=vllm rollout.vllm_sleep_mode=true
run zero3-offload $DS launch/train_rl.py --config $Q $(common zero3-offload) \
  deepspeed.config=configs/deepspeed/zero3_offload.json algo.kl_coef=0.01
run implicit-prm $DS launch/train_rl.py --config configs/quickstart_implicit_prm.yaml \
  $(common implicit-prm)
run pav-verifier $DS launch/train_pav.py --config configs/quickstart_pav.yaml \
  pav.output_dir=$RUNS/pav-verifier pav.prompts=$((GPUS * 16)) pav.epochs=1 \
  logging.progress_bar=false
run pav $DS launch/train_rl.py --config configs/quickstart_pav.yaml $(common pav) \
  "reward.heads=[{head: pav, kwargs: {path: $RUNS/pav-verifier, prover_k: 4}}]"
run ppo $DS launch/train_rl.py --config configs/quickstart_ppo.yaml $(common ppo)
run chat-bf16-vllm $DS launch/train_rl.py --config configs/quickstart_chat.yaml \
  $(common chat-bf16-vllm) rollout.backend=vllm rollout.vllm_sleep_mode=true

# Throughput at real size: random Qwen2-1.5B weights in bf16, 512-token responses.
MODEL=$RUNS/qwen2-1.5b-random
run random-model $PY benchmarks/random_model.py --out $MODEL --size qwen2-1.5b
run throughput $PY benchmarks/throughput.py --configs zero2-transformers,zero2-vllm,zero3-vllm \
  --ranks "$GPUS" --steps 5 --warmup 2 --out "$OUT/throughput" --runs-dir "$RUNS/throughput" \
  model.path=$MODEL model.dtype=bfloat16 model.gradient_checkpointing=true \
  rollout.max_new_tokens=512 rollout.prompts_per_step=$((GPUS * 8)) rollout.group_size=8 \
  rollout.vllm_sleep_mode=true rollout.vllm_gpu_memory_utilization=0.4 \
  trainer.micro_batch_size=8 trainer.eval_every=0 data.eval_size=$GPUS

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing was run"
  exit 0
fi
echo "gpu_check: $failures case(s) failed; see $OUT/summary.md"
[ "$failures" = 0 ]
