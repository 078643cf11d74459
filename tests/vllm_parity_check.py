"""Run as a plain `python` job (one rank): a real vLLM CPU engine against the trainer.

After the policy's weights change (a stand-in for an optimizer step) and `sync_weights`:
vLLM's greedy outputs must equal transformers' greedy outputs for the same weights, and
vLLM's sampled-token log-probs must match the trainer's own within 1e-4 (fp32). Writes
`<out>/vllm_parity.json` with what it measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rl.config import load_config
from rl.engine.deepspeed_engine import init_distributed, shutdown
from rl.rollout.backend import SamplingSettings, TransformersRollout
from rl.trainer.loop import Trainer

REPO = Path(__file__).resolve().parent.parent


def greedy(backend, model, rows, max_new: int) -> list[list[int]]:
    out = backend.generate_tokens(
        model, [r.prompt_ids for r in rows], SamplingSettings(max_new, 1.0, 1.0, greedy=True)
    )
    responses = out.input_ids[:, out.prompt_length :]
    return [r[m.bool()].tolist() for r, m in zip(responses, out.response_mask, strict=True)]


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    trainer = Trainer(cfg, init_distributed())
    trainer.rollout.sync_weights(trainer.engine)
    rows = trainer.eval_rows[:32]
    max_new = cfg.rollout.max_new_tokens
    before = greedy(trainer.rollout, None, rows, max_new)

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy as an update would, far enough to change outputs
        for param in trainer.engine.module.parameters():
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=gen))
    trainer.rollout.sync_weights(trainer.engine)
    after = greedy(trainer.rollout, None, rows, max_new)
    reference = TransformersRollout(trainer.tokenizer, 64, synced_gpus=False)
    transformers_greedy = greedy(reference, trainer.engine.module, rows, max_new)

    batch = trainer.collect()  # sampled at T=1 by vLLM, with its log-probs
    trainer_logp = trainer.compute_logprobs(batch).old
    assert batch.behaviour_logprobs is not None
    diff = (batch.behaviour_logprobs - trainer_logp).abs() * batch.response_mask
    result = {
        "n_prompts": len(rows),
        "greedy_equal": after == transformers_greedy,
        "greedy_changed_by_sync": sum(a != b for a, b in zip(before, after, strict=True)),
        "logprob_max_abs_diff": float(diff.max()),
        "sampled_tokens": int(batch.response_mask.sum()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vllm_parity.json").write_text(json.dumps(result))
    trainer.rollout.close()
    shutdown()


if __name__ == "__main__":
    main()
