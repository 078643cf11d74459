"""A discriminative PRM as a module: a causal LM read at step tags (`rl.prm.convention`).

`PRMModel.forward(input_ids, attention_mask) -> [B, T]` is the log-odds `z` that the step
ending at each position is good, `logit_good - logit_bad`: from the LM head's two label
tokens (`label_tokens`) or from a 2-way linear head on the last hidden state (`two_class`).
Callers read it at tag positions (`step_log_odds`); `sigmoid(z)` is `p_h`.

On disk (`save_prm`): the causal LM in Hugging Face format with its tokenizer, `prm_head.pt`
for `two_class` (`{"weight": [2, hidden], "bias": [2]}`, row 1 "good"), and
`prm_convention.json`, written last, which marks the directory complete. `load_prm` reads
such a directory, or any Hugging Face causal LM given a convention (an off-the-shelf PRM).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rl.core.errors import ConfigError
from rl.core.types import position_ids_from_mask
from rl.prm.convention import (
    CONVENTION_FILE,
    PRMConvention,
    TokenIds,
    load_convention,
    render_ids,
    save_convention,
    token_ids,
)

HEAD_FILE = "prm_head.pt"
"""`two_class` PRMs: the 2-way head's weights (row 0 "bad", row 1 "good")."""


class PRMModel(nn.Module):
    """`lm` (a Hugging Face causal LM) read as a PRM under `convention`."""

    def __init__(
        self,
        lm: Any,
        convention: PRMConvention,
        ids: TokenIds,
        class_head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.convention = convention
        self.ids = ids
        self.config: Any = lm.config  # what DeepSpeed and HF helpers look for on a model
        if convention.head == "two_class" and class_head is None:
            class_head = nn.Linear(int(lm.config.hidden_size), 2)
        self.class_head = class_head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids, attention_mask: [B, T] -> float32 log-odds of "good" [B, T]."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if self.class_head is None:  # label_tokens
            logits = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).logits  # [B, T, V]
            assert self.ids.good is not None and self.ids.bad is not None
            return (logits[..., self.ids.good] - logits[..., self.ids.bad]).float()  # [B, T]
        hidden = self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [B, T, H] (after the final norm; the LM head is not run)
        two = self.class_head(hidden.to(self.class_head.weight.dtype)).float()  # [B, T, 2]
        return two[..., 1] - two[..., 0]  # [B, T]


def collate_solutions(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad rendered solutions `(ids, tag positions)` into
    (input_ids [N, T], attention_mask [N, T], tag_positions [N, H] with -1 padding)."""
    n = len(rows)
    t = max((len(ids) for ids, _ in rows), default=1)
    h = max((len(pos) for _, pos in rows), default=1) or 1
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    positions = torch.full((n, h), -1, dtype=torch.long)
    for i, (ids, pos) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
        positions[i, : len(pos)] = torch.tensor(pos, dtype=torch.long)
    return input_ids, mask, positions


def gather_steps(per_position: Tensor, positions: Tensor) -> Tensor:
    """per_position [N, T], positions [N, H] (-1 padding) -> [N, H] (0 at padding)."""
    picked = per_position.gather(1, positions.clamp(min=0))  # [N, H]
    return torch.where(positions >= 0, picked, torch.zeros_like(picked))


@torch.no_grad()
def step_probabilities(
    model: PRMModel,
    tokenizer: Any,
    prompts: Sequence[str],
    steps: Sequence[Sequence[str]],
    micro_batch_size: int = 16,
) -> list[list[float]]:
    """P(good) of every step of every solution: prompts [N], steps [N][H_i] -> [N][H_i]."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = []
    for start in range(0, len(prompts), micro_batch_size):
        rows = [
            render_ids(model.convention, tokenizer, model.ids.tag, p, s)
            for p, s in zip(
                prompts[start : start + micro_batch_size],
                steps[start : start + micro_batch_size],
                strict=True,
            )
        ]
        input_ids, mask, positions = collate_solutions(rows, pad)
        z = model(input_ids.to(device), mask.to(device)).cpu()  # [n, T]
        p = torch.sigmoid(gather_steps(z, positions))  # [n, H]
        out += [p[i, : len(pos)].tolist() for i, (_, pos) in enumerate(rows)]
    return out


def check_prm_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"PRM {path} does not exist")
    return p


def load_prm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
) -> tuple[PRMModel, Any]:
    """(PRMModel in eval mode, tokenizer) from a directory written by `save_prm`, or from any
    causal LM directory/hub name with `overrides` supplying its convention (`step_tag`, ...).
    Every convention problem is a one-line ConfigError before the weights are read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    conv = load_convention(local, overrides)  # a hub name has no saved convention
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot load PRM {path}: {first}") from err
    ids = token_ids(conv, tokenizer, str(path))
    head: nn.Linear | None = None
    if conv.head == "two_class":
        file = local / HEAD_FILE
        if not file.is_file():
            raise ConfigError(f"PRM {path}: convention head two_class but no {HEAD_FILE}")
        state = torch.load(file, map_location="cpu", weights_only=True)
        head = nn.Linear(int(state["weight"].shape[1]), 2)
        head.load_state_dict(state)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, output_loading_info=True
    )
    lm, info = loaded
    if info.get("missing_keys"):  # would be silently random-initialised
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"PRM {path}: weights missing: {missing[:3]}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = PRMModel(lm, conv, ids, head)
    model.to(dtype).eval()
    return model, tokenizer


def save_prm(
    model: PRMModel,
    tokenizer: Any,
    out_dir: str | Path,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write `model` to `out_dir` (replaced whole); `state_dict`: full weights to write
    instead of the module's own (`full_state_dict(engine)` under ZeRO-3; call on one rank).
    Written into a temporary sibling, then renamed, so a reader never sees half a PRM."""
    out = Path(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    lm_state = {k[len("lm.") :]: v for k, v in state.items() if k.startswith("lm.")}
    head_state = {
        k[len("class_head.") :]: v.detach().cpu().clone()
        for k, v in state.items()
        if k.startswith("class_head.")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.lm.save_pretrained(tmp, state_dict=lm_state)
        tokenizer.save_pretrained(tmp)
        if head_state:
            torch.save(head_state, tmp / HEAD_FILE)
        save_convention(model.convention, tmp)  # last: marks the directory complete
        if out.exists():
            (out / CONVENTION_FILE).unlink(missing_ok=True)
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
