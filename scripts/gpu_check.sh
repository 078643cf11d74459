#!/usr/bin/env bash
# The GPU check: on a machine with 1-8 NVIDIA GPUs, every quickstart for a few steps on all
# of them (transformers and vLLM with sleep mode, ZeRO-2 and ZeRO-3, the implicit PRM,
# PAV, PPO, the bf16 chat model), then a throughput run of a randomly initialised model at
# real size (Qwen2-1.5B config, bf16, 512-token responses): tokens/s per phase, the weight
# sync's share of a step, peak GPU memory and MFU; and PPO killed after step 3 and resumed,
# against the uninterrupted PPO case. Everything lands in benchmarks/results/gpu/: one log per
# case, throughput/, and a row per case merged into summary.md (a case run replaces its
# earlier row, the other rows and the text around the table stay: benchmarks/gpu_check_rows.py).
#
#   bash scripts/gpu_check.sh            # run it (needs nvidia-smi and the GPUs)
#   bash scripts/gpu_check.sh --dry-run  # print the plan and exit 0 (any machine)
#
# Environment:
#   STEPS         training steps per case (default 4; ppo-resume needs 4 or more)
#   GPUS          GPUs per case (default: all)
#   PYTHON        an interpreter that already has the stack (torch, deepspeed, transformers,
#                 ...): used as is, scripts/setup.sh is not run (default: .venv after setup)
#   CASES         comma-separated case names to run (default: all)
#   CASE_TIMEOUT  seconds one case may run before it is stopped and counted failed (1800)
#   OUT, RUNS     where results and run directories go (benchmarks/results/gpu, runs/gpu_check)
#   EXTRA         overrides added to every training case (e.g. a smaller model for a trial)
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
OUT=${OUT:-benchmarks/results/gpu}
RUNS=${RUNS:-runs/gpu_check}
EXTRA=${EXTRA:-}
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
    "rollout.prompts_per_step=$((GPUS * 4)) data.eval_size=$((GPUS * 16)) $EXTRA"
}

failures=0
ROWS=$OUT/logs/rows.md
row() { echo "| $1 | $2 | $3 | $4 | $RUN_ID |" | tee -a "$ROWS"; }
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
  # a shell function (kill_and_resume) runs in a child bash, which `timeout` can start
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' _ "$@"; fi
  if timeout --signal=TERM --kill-after=30 "$CASE_TIMEOUT" "$@" >"$OUT/logs/$name.log" 2>&1; then
    status=ok
  else
    status="FAILED (exit $?)"
    failures=$((failures + 1))
  fi
  local accuracy
  accuracy=$(grep -o 'step [0-9]*: eval/accuracy [0-9.]*' "$OUT/logs/$name.log" | tail -1 || true)
  if [ "$name" = ppo-resume ] && [ "$status" = ok ]; then
    accuracy="${accuracy:-}; against ppo: $("$PY" -m benchmarks.gpu_check_rows resume-gap \
      "$RUNS/ppo" "$RUNS/ppo-resume" 3 2>&1 | tail -1)"
  fi
  row "$name" "$status" "$(($(date +%s) - start)) s" "${accuracy:-}"
}
# kill_and_resume COMMAND...: the run SIGKILLs itself after step 3 (its checkpoint: step 2),
# then the same command resumes it to the end
kill_and_resume() {
  DENSE_RL_KILL_AFTER_STEP=3 "$@" && { echo "error: the run was not killed" >&2; return 1; }
  "$@" trainer.overwrite=false trainer.resume=auto
}
export -f kill_and_resume
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
  : >"$ROWS"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  RUN_ID="$(git rev-parse --short HEAD 2>/dev/null || echo ?), $(date -u +%Y-%m-%d), ${GPUS}x $GPU_NAME"
  {
    echo "$RUN_ID"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
  } >"$OUT/logs/environment.log"
  # the rows so far go into summary.md however the script ends
  trap '"$PY" -m benchmarks.gpu_check_rows merge "$OUT/summary.md" "$ROWS"' EXIT
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
run ppo-resume kill_and_resume $DS launch/train_rl.py --config configs/quickstart_ppo.yaml \
  $(common ppo-resume) trainer.save_every=2

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
  deepspeed.zero_stage=2 "rollout.backend={name: vllm, sleep_mode: true}"
run_vllm zero3-vllm-sleep $DS launch/train_rl.py --config $Q $(common zero3-vllm-sleep) \
  deepspeed.zero_stage=3 "rollout.backend={name: vllm, sleep_mode: true}"
run_vllm chat-bf16-vllm $DS launch/train_rl.py --config configs/quickstart_chat.yaml \
  $(common chat-bf16-vllm) "rollout.backend={name: vllm, sleep_mode: true}"

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing was run"
  exit 0
fi
echo "gpu_check: $failures case(s) failed; rows merged into $OUT/summary.md"
[ "$failures" = 0 ]
