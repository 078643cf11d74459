"""Export a training checkpoint's policy (DeepSpeed ZeRO-1/2, `checkpoints/step_*`) to a
Hugging Face directory, for `launch/search.py --policy` or any `model.path`.

    python benchmarks/export_policy.py --checkpoint RUN/checkpoints/step_00000040 \\
        --start START_MODEL_DIR --out runs/policies/NAME

The architecture, tokenizer and generation config are the start model's (the one the run
began from); the weights are the checkpoint's fp32 master weights, consolidated over the
ranks by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (what the `zero_to_fp32.py`
written next to the checkpoints does). The trainer writes the same thing to `final/` when
`trainer.save_final_model` is on; this is for runs that saved checkpoints only.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoints/step_*")
    parser.add_argument("--start", type=Path, required=True, help="the run's start model")
    parser.add_argument("--out", type=Path, required=True, help="Hugging Face directory")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    ckpt = args.checkpoint.resolve()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    model = AutoModelForCausalLM.from_pretrained(args.start, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"checkpoint does not fit the start model: {missing=} {unexpected=}")
    # The rank-0 module copy must agree with the consolidated master weights.
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    drift = max(float((module["module"][k].float() - v).abs().max()) for k, v in state.items())
    changed = max(
        float((p - q).abs().max())
        for p, q in zip(
            model.state_dict().values(),
            AutoModelForCausalLM.from_pretrained(args.start, dtype=torch.float32)
            .state_dict()
            .values(),
            strict=True,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.start).save_pretrained(args.out)
    print(
        f"{args.out}: {len(state)} tensors from {ckpt.name} "
        f"(max |master - module copy| {drift:.2e}, max |change from start| {changed:.2e})"
    )


if __name__ == "__main__":
    main()
