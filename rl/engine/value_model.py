"""A scalar value model: a transformer backbone plus a linear head on every position.

Used as the PAV verifier (`rewards/pav.py`, trained by `launch/train_pav.py`) and meant to be
reused as PPO's critic: nothing here is PAV-specific. `forward` returns one raw scalar per
position (`[B, T]`); what it means is the user's choice (PAV reads `sigmoid` of it as a
probability of success, a critic reads it as a value).

On disk (`save_value_model`), a value model is a directory holding:

- the backbone in Hugging Face format (`AutoModel`: the base model without the LM head,
  `config.json` + weights) and the tokenizer;
- `value_head.pt`: `{"weight": [1, hidden], "bias": [1]}`;
- `value_model.json`: what it is (`{"kind": "value_model", "hidden_size": ..., ...}`).

`value_head.pt` is written last and is what marks a directory as a value model, so a directory
whose save was interrupted is refused by `load_value_model` instead of loading mixed weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl.core.errors import ConfigError
from rl.core.types import position_ids_from_mask
from rl.engine.deepspeed_engine import zero3_init

HEAD_FILE = "value_head.pt"
"""The value head's weights; its presence marks a complete value-model directory."""
META_FILE = "value_model.json"
"""A small description of the value model (kind, hidden size, backbone class)."""
FORMAT_VERSION = 1


class ValueHead(nn.Linear):
    """`Linear(H, 1)` computed in float32 whatever its weights' dtype: hidden states
    `[..., H]` -> `[..., 1]` float32. In bf16 the values would be rounded to 8 significant
    bits (steps of ~0.004 near 1); the weights stay in the model's dtype (DeepSpeed casts
    them), input and weights are cast up for the product. A no-op cast in float32."""

    def forward(self, hidden: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(hidden.float(), self.weight.float(), bias)


class ValueModel(nn.Module):
    """`backbone` (a base transformer returning `last_hidden_state`) + `value_head`, a
    `ValueHead(H, 1)` (float32 values)."""

    def __init__(self, backbone: Any, value_head: ValueHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        self.value_head = value_head if value_head is not None else ValueHead(hidden, 1)
        self.config: Any = backbone.config  # what DeepSpeed and HF helpers look for on a model

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """The backbone's activation checkpointing (Hugging Face's switch)."""
        self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.backbone.is_gradient_checkpointing)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids, attention_mask: [B, T] -> one float32 scalar per position [B, T].

        Position ids default to counting attended tokens only, so left padding does not shift
        them (as the trainer computes them for the policy)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [B, T, H]
        return self.value_head(hidden).squeeze(-1)  # [B, T] float32


def zero_init_(head: nn.Linear) -> nn.Linear:
    """Zero the head in place: a fresh model then predicts 0 everywhere (sigmoid 0.5)."""
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head


def value_model_from_policy(
    policy_path: str | Path,
    dtype: torch.dtype = torch.float32,
    ds_config: dict[str, Any] | None = None,
) -> Any:
    """A `ValueModel` whose backbone is the base model of the causal-LM checkpoint at
    `policy_path` (its LM head is dropped) with a fresh, zero-initialised value head. Under
    a ZeRO-3 `ds_config` the backbone is partitioned over the ranks as it loads
    (`zero3_init`; collective) instead of whole on every rank."""
    from transformers import AutoModel

    try:
        with zero3_init(ds_config):
            backbone = AutoModel.from_pretrained(str(policy_path), dtype=dtype)
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot load a backbone from {policy_path}: {first}") from err
    model = ValueModel(backbone)
    zero_init_(model.value_head)
    return _in_dtype(model, dtype)


def _in_dtype(model: ValueModel, dtype: torch.dtype) -> ValueModel:
    """`model` in `dtype`: the head cast, and the backbone too unless ZeRO-3 partitioned it
    (then it was loaded in `dtype`, and its partitions are DeepSpeed's to cast)."""
    if any(hasattr(p, "ds_id") for p in model.backbone.parameters()):
        model.value_head.to(dtype)
        return model
    return model.to(dtype)


def check_value_model_dir(path: str | Path) -> Path:
    """`path` as a Path if it looks like a saved value model; ConfigError naming it if not."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"value model {path} does not exist")
    if not (p / HEAD_FILE).is_file():
        raise ConfigError(f"{path} is not a value model: no {HEAD_FILE} in {path}")
    return p


def load_value_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    ds_config: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(ValueModel, tokenizer) from a directory written by `save_value_model`, in eval mode;
    under a ZeRO-3 `ds_config` its backbone is partitioned as it loads (collective)."""
    from transformers import AutoModel, AutoTokenizer

    p = check_value_model_dir(path)
    try:
        with zero3_init(ds_config):
            backbone, info = AutoModel.from_pretrained(
                str(p), dtype=dtype, output_loading_info=True
            )
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot load value model {path}: {first}") from err
    if info.get("missing_keys"):  # would be silently random-initialised
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"value model {path}: backbone weights missing: {missing[:3]}")
    head_state = torch.load(p / HEAD_FILE, map_location="cpu", weights_only=True)
    model = ValueModel(backbone)
    try:
        model.value_head.load_state_dict(head_state)
    except RuntimeError as err:  # a head of another width than the backbone
        raise ConfigError(f"value model {path}: {HEAD_FILE} does not fit the backbone") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _in_dtype(model, dtype).eval()
    return model, tokenizer


def split_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A `ValueModel` state dict -> (backbone state, value-head state), prefixes removed."""
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("value_head.") :]: v for k, v in state.items() if k.startswith("value_head.")}
    unknown = [k for k in state if not k.startswith(("backbone.", "value_head."))]
    if unknown or set(head) != {"weight", "bias"}:
        raise ValueError(
            f"not a ValueModel state dict (unexpected keys {unknown[:3]}, head keys {sorted(head)})"
        )
    return backbone, head


def save_value_model(
    model: Any, tokenizer: Any, out_dir: str | Path, state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Write `model` (a `ValueModel`) to `out_dir`; returns `out_dir`.

    `state_dict`: full weights to write instead of `model.state_dict()` (under ZeRO-3 the
    module's own parameters are partitioned: pass `full_state_dict(engine)`; call
    this on one rank only). Everything is written into a temporary sibling directory first.
    A new `out_dir` is created by renaming it; an existing one (which may hold other files,
    e.g. PAV's Monte-Carlo data) has its old `value_head.pt` removed first and the new files
    moved in with `value_head.pt` last, so a reader never loads a mix of old and new weights.
    """
    out = Path(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    backbone_state, head_state = split_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.backbone.save_pretrained(tmp, state_dict=backbone_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "kind": "value_model",
            "format_version": FORMAT_VERSION,
            "hidden_size": int(head_state["weight"].shape[1]),
            "backbone": type(model.backbone).__name__,
            "head_file": HEAD_FILE,
            "output": "one scalar per position (PAV: a logit, sigmoid = P(correct))",
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        torch.save({k: v.detach().cpu().clone() for k, v in head_state.items()}, tmp / HEAD_FILE)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, or move its files into an existing `out`, the head file last."""
    if not out.exists():
        os.rename(tmp, out)
        return
    (out / HEAD_FILE).unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir() if p.name != HEAD_FILE) + [HEAD_FILE]
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
