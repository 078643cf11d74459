"""How a discriminative PRM reads a solution: its step tag, where it is read, and how.

A discriminative PRM (Math-Shepherd, PRM800K-style, Qwen2.5-Math-PRM) reads
`prompt + step_1 <tag> step_2 <tag> ... step_H <tag>` with its own tokenizer and predicts, at
each tag, whether the step before it is good. Two readings are in use:

- `label_tokens` (Math-Shepherd, OpenRLHF): the LM head's logits at the tag position,
  restricted to two label tokens; `p_h = softmax([l_good, l_bad])[0]`.
- `two_class` (Qwen2.5-Math-PRM): a linear `[hidden -> 2]` head on the last hidden state at
  the tag position; `p_h = softmax(head)[1]` (index 1 is "good").

Both reduce to one log-odds per position, `z = logit_good - logit_bad`, and `p_h = sigmoid(z)`
at the h-th tag; training is cross-entropy on the two classes at tag positions only, which is
binary cross-entropy on `z`.

The convention is saved beside the weights as `prm_convention.json`, so any head (the `prm`
reward head, search, evaluation) reads a PRM the way it was trained, whatever the policy's
tokenizer and chat format. Rendering is piecewise (`render_ids`): the prompt, then each step
followed by the tag id, so a tag's position never depends on how the tokenizer merges text
around it, and a step whose text contains the tag string cannot shift the reading.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from rl.core.errors import ConfigError

CONVENTION_FILE = "prm_convention.json"
"""Written beside a PRM's weights, last: its presence marks a complete PRM directory."""

PRMHeadKind = Literal["label_tokens", "two_class"]
PRM_HEAD_KINDS: tuple[str, ...] = ("label_tokens", "two_class")
PromptFormat = Literal["plain", "chat"]
PROMPT_FORMATS: tuple[str, ...] = ("plain", "chat")


@dataclass(frozen=True)
class PRMConvention:
    """How a PRM's input is rendered and where its step scores are read."""

    step_tag: str
    """Appended after every step; must be exactly one token of the PRM's tokenizer."""
    head: PRMHeadKind = "label_tokens"
    """`label_tokens` (two LM-head tokens at each tag) or `two_class` (a 2-way linear head)."""
    good_token: str = "+"
    """`label_tokens`: the token meaning "the step is good" (one token)."""
    bad_token: str = "-"
    """`label_tokens`: the token meaning "the step is wrong" (one token)."""
    prompt_format: PromptFormat = "plain"
    """`plain`: the prompt text as is; `chat`: the tokenizer's chat template with the prompt
    as the user turn and the generation prompt, the steps as the assistant's text."""
    prompt_suffix: str = ""
    """Text between the rendered prompt and the first step."""
    step_separator: str = "\n"
    """Text before every step after the first (after the previous step's tag)."""

    def __post_init__(self) -> None:
        if not self.step_tag:
            raise ConfigError("PRM convention: step_tag is empty")
        if self.head not in PRM_HEAD_KINDS:
            raise ConfigError(
                f"PRM convention: head {self.head!r} is not one of {list(PRM_HEAD_KINDS)}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"PRM convention: prompt_format {self.prompt_format!r} is not one of "
                f"{list(PROMPT_FORMATS)}"
            )
        if self.head == "label_tokens" and self.good_token == self.bad_token:
            raise ConfigError(
                f"PRM convention: good_token and bad_token are both {self.good_token!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "prm", "format_version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> PRMConvention:
        """From `to_dict()` output; ConfigError naming `where` and the first unknown key."""
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in d.items() if k not in ("kind", "format_version")}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown PRM convention key {unknown[0]!r}")
        if "step_tag" not in body:
            raise ConfigError(f"{where}: the PRM convention has no step_tag")
        return cls(**body)


def save_convention(conv: PRMConvention, directory: str | Path) -> Path:
    """Write `prm_convention.json` into `directory`; returns the file."""
    path = Path(directory) / CONVENTION_FILE
    path.write_text(json.dumps(conv.to_dict(), indent=2) + "\n")
    return path


def load_convention(
    directory: str | Path, overrides: dict[str, Any] | None = None
) -> PRMConvention:
    """The convention saved with the PRM in `directory`, with `overrides` (e.g. a user's
    `step_tag` for an off-the-shelf PRM that has no saved convention) applied on top.

    ConfigError, one line, when there is neither a saved convention nor a `step_tag`."""
    path = Path(directory) / CONVENTION_FILE
    base: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**base, **(overrides or {})}
    if "step_tag" not in merged:
        raise ConfigError(
            f"PRM {directory}: no {CONVENTION_FILE} and no step_tag given: pass the PRM's "
            "step tag (e.g. step_tag: ' ки' for Math-Shepherd, '<extra_0>' for Qwen2.5-Math-PRM)"
        )
    return PRMConvention.from_dict(merged, str(path))


def single_token_id(tokenizer: Any, text: str, what: str, model: str) -> int:
    """The id of `text` when the tokenizer reads it as exactly one token; else ConfigError
    naming `what`, the text and the pieces it splits into."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ConfigError(
            f"PRM {model}: {what} {text!r} is {len(ids)} tokens of its tokenizer {pieces}, "
            "not one: pick a single-token tag (or add it as a special token when training)"
        )
    return int(ids[0])


@dataclass(frozen=True)
class TokenIds:
    """The convention's token ids in one tokenizer."""

    tag: int
    good: int | None
    bad: int | None


def token_ids(conv: PRMConvention, tokenizer: Any, model: str = "") -> TokenIds:
    """Check that the tag (and, for `label_tokens`, the label tokens) are single tokens."""
    tag = single_token_id(tokenizer, conv.step_tag, "step tag", model)
    if conv.head != "label_tokens":
        return TokenIds(tag=tag, good=None, bad=None)
    good = single_token_id(tokenizer, conv.good_token, "good token", model)
    bad = single_token_id(tokenizer, conv.bad_token, "bad token", model)
    return TokenIds(tag=tag, good=good, bad=bad)


def render_prompt(conv: PRMConvention, tokenizer: Any, prompt: str) -> str:
    """The prompt as the PRM reads it (before the first step)."""
    if conv.prompt_format == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(text) + conv.prompt_suffix
    return prompt + conv.prompt_suffix


def render_ids(
    conv: PRMConvention, tokenizer: Any, tag_id: int, prompt: str, steps: Sequence[str]
) -> tuple[list[int], list[int]]:
    """(input ids, tag positions) of one solution: the rendered prompt, then each step
    (after `step_separator` from the second on) followed by the tag id.

    Returns ids of length T and H positions (one per step, increasing). With a `plain`
    prompt, the special tokens the tokenizer adds to a text on its own (a BOS) lead the ids, as
    in the PRM's pretraining; a `chat` prompt's template writes its own."""
    ids: list[int] = []
    if conv.prompt_format == "plain":
        ids += tokenizer("", add_special_tokens=True)["input_ids"]
    ids += tokenizer(render_prompt(conv, tokenizer, prompt), add_special_tokens=False)["input_ids"]
    positions: list[int] = []
    for h, step in enumerate(steps):
        text = step if h == 0 else conv.step_separator + step
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tag_id)
        positions.append(len(ids) - 1)
    return ids, positions
