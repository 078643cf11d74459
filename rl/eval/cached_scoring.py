"""Prefix-cached verifier scoring for test-time search: each token is read once.

Step-level beam search extends every kept beam by one step a round, and a verifier that
re-reads `prompt + all steps so far` for every candidate reads each prefix again in every
round (about 9 verifier tokens per generated token on the quickstart task). Here the
verifier's keys and values (transformers `DynamicCache`) of every scored row are kept, and a
row is read from the end of its longest cached prefix: a candidate `beam + one new step`
reads only the new step's tokens on top of the beam's cache, and every row reads its
problem's prompt from one cache entry made once per problem. Verifier tokens per generated
token drop to about 1 plus each prompt once.

What a model reads is given by a `Reader`:

- `PRMReader`: a discriminative PRM (`rewards.prm_head.PRMHead`, `rl.prm.model.PRMModel`) in
  its own tokenizer and convention: the rendered prompt, then each step followed by the step
  tag (`rl.prm.convention.render_ids`); `P(good)` of step h is read at its tag, so a beam's
  cached row ends after its last tag and a child reads `separator + step + tag`.
- `PAVReader`: a PAV verifier (`rewards.pav.PAVHead`, `rl.engine.value_model.ValueModel`) on
  the policy's own tokens, `Q^pi` read at each step-end token.

The cache is keyed by the verifier's token ids, not by the beam: a row reuses an entry only
when that entry's ids are exactly a prefix of its own, so the cached values equal the
re-reading ones whatever the step segmentation does (a prefix whose re-rendering changed
just finds a shorter cached prefix, at worst the prompt). `HeadScorer` (`rl.eval.search`,
every row read whole through the head) is the reference; tests hold the two to 1e-5 in fp32.

Batching: the cached prefixes of a micro-batch are left padded to the longest, the new tokens
right padded; the attention mask covers both, position ids continue each row's own prefix
length, so padding never shifts a position. Only real new tokens are counted as read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rl.core.errors import ConfigError
from rl.eval.search import Compute, Problem, solutions_batch

Key = tuple[int, ...]
"""A verifier token-id sequence: what a cache entry holds the keys and values of."""


@dataclass(frozen=True)
class Rendered:
    """One row as the verifier reads it."""

    ids: list[int]
    """The verifier's input ids [T] (its own tokenizer)."""
    prompt_length: int
    """The leading ids that render the problem alone (shared by all its rows)."""
    read_at: list[int]
    """[H] the position whose output is the value after each step."""


@dataclass
class Entry:
    """The cache of one token-id sequence of length L."""

    past: list[tuple[Tensor, Tensor]]
    """Per layer (keys, values), each [heads, L, head_dim], on the model's device."""
    outputs: Tensor
    """[L] float32 on the CPU: the model's output (a logit) at every position."""


class Reader(Protocol):
    """What a verifier reads and how one forward pass extends a cache."""

    @property
    def config(self) -> Any:
        """The transformer's config (builds a `DynamicCache` with its layer types)."""
        ...

    @property
    def model(self) -> Any:
        """The verifier module (its parameters' device is where inputs go)."""
        ...

    def render(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> list[Rendered]:
        """Rows (problem i's prompt + policy response ids i) as the verifier reads them."""
        ...

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any
    ) -> Tensor:
        """input_ids, position_ids [B, S] and attention_mask [B, P + S] on top of `cache`
        (P cached positions; extended in place) -> float32 logits [B, S]."""
        ...


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------- readers


class PRMReader:
    """A `prm` head's PRM: its rendering, its tokenizer, its log-odds `z` (sigmoid = p_h).

    `forward` is `PRMModel.forward` with a cache (`label_tokens`: LM-head logit difference of
    the two label tokens; `two_class`: the 2-way head on the last hidden state)."""

    def __init__(self, head: Any, policy_tokenizer: Any, pad_id: int, delimiter: str) -> None:
        self.head = head
        self.policy_tokenizer = policy_tokenizer
        self.pad_id = pad_id
        self.delimiter = delimiter
        self._prompts: dict[str, list[int]] = {}

    @property
    def model(self) -> Any:
        if self.head.model is None:
            raise RuntimeError("prm head: setup(ctx) was not called")
        return self.head.model

    @property
    def config(self) -> Any:
        return self.model.lm.config

    def prompt_ids(self, problem: str) -> list[int]:
        """The rendering of the problem alone (memoised per problem text)."""
        from rl.prm.convention import render_ids

        if problem not in self._prompts:
            model = self.model
            ids, _ = render_ids(
                model.convention, self.head.prm_tokenizer, model.ids.tag, problem, []
            )
            self._prompts[problem] = ids
        return self._prompts[problem]

    def render(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> list[Rendered]:
        from rl.prm.convention import render_ids

        batch = solutions_batch(
            problems, responses, self.policy_tokenizer, self.pad_id, self.delimiter
        )
        texts, steps = self.head.step_texts(batch)  # [B], [B][H_b]
        model = self.model
        out = []
        for text, row_steps in zip(texts, steps, strict=True):
            ids, tags = render_ids(
                model.convention, self.head.prm_tokenizer, model.ids.tag, text, row_steps
            )
            out.append(Rendered(ids, len(self.prompt_ids(text)), tags))
        return out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any
    ) -> Tensor:
        prm = self.model
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": cache,
            "use_cache": True,
        }
        if prm.class_head is None:  # label_tokens
            logits = prm.lm(**kwargs).logits  # [B, S, V]
            return (logits[..., prm.ids.good] - logits[..., prm.ids.bad]).float()  # [B, S]
        hidden = prm.lm.base_model(**kwargs).last_hidden_state  # [B, S, H]
        two = prm.class_head(hidden.to(prm.class_head.weight.dtype)).float()  # [B, S, 2]
        return two[..., 1] - two[..., 0]  # [B, S]


class PAVReader:
    """A `pav` head's verifier: the policy's prompt and response ids, `Q^pi` logit read at
    each step-end token (the trainer's step rule)."""

    def __init__(self, head: Any, policy_tokenizer: Any, delimiter: str) -> None:
        self.head = head
        self.policy_tokenizer = policy_tokenizer
        self.delimiter = delimiter

    @property
    def model(self) -> Any:
        if self.head.model is None:
            raise RuntimeError("pav head: setup(ctx) was not called")
        return self.head.model

    @property
    def config(self) -> Any:
        return self.model.backbone.config

    def render(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> list[Rendered]:
        from rl.rollout.steps import response_step_spans

        out = []
        for problem, response in zip(problems, responses, strict=True):
            n = len(problem.prompt_ids)
            spans = response_step_spans(self.policy_tokenizer, response, self.delimiter)
            out.append(Rendered([*problem.prompt_ids, *response], n, [n + b for _, b in spans]))
        return out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any
    ) -> Tensor:
        model = self.model
        hidden = model.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state  # [B, S, H]
        return model.value_head(hidden).squeeze(-1).float()  # [B, S]


def reader_for(head: Any, policy_tokenizer: Any, pad_id: int, delimiter: str) -> Reader | None:
    """The reader of a head the cache supports (`prm`, `pav` with `terminal: verifier`), else
    None (the head is read whole through `HeadScorer`)."""
    from rewards.pav import PAVHead
    from rewards.prm_head import PRMHead

    if isinstance(head, PRMHead):
        return PRMReader(head, policy_tokenizer, pad_id, delimiter)
    if isinstance(head, PAVHead) and head.terminal == "verifier":
        return PAVReader(head, policy_tokenizer, delimiter)
    return None


# --------------------------------------------------------------------------------- the cache


class PrefixCache:
    """Cache entries by token-id sequence; `longest(ids)` finds the longest cached prefix."""

    def __init__(self) -> None:
        self.entries: dict[Key, Entry] = {}
        self.lengths: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, key: Key, entry: Entry) -> None:
        if key not in self.entries:
            self.lengths[len(key)] += 1
        self.entries[key] = entry

    def longest(self, ids: Sequence[int]) -> tuple[int, Entry | None]:
        """(length, entry) of the longest cached prefix of `ids` (the whole of it included);
        (0, None) when none is cached."""
        for n in sorted((n for n in self.lengths if n <= len(ids)), reverse=True):
            entry = self.entries.get(tuple(ids[:n]))
            if entry is not None:
                return n, entry
        return 0, None

    def keep_only(self, keys: set[Key]) -> None:
        """Drop every entry whose key is not in `keys`."""
        for key in [k for k in self.entries if k not in keys]:
            del self.entries[key]
            self.lengths[len(key)] -= 1
            if not self.lengths[len(key)]:
                del self.lengths[len(key)]


@dataclass(frozen=True)
class Job:
    """A row to read: its ids [T], and its longest cached prefix (`past` of them)."""

    ids: Key
    past: int
    entry: Entry | None


def stacked_past(jobs: Sequence[Job], width: int) -> list[tuple[Tensor, Tensor]] | None:
    """The jobs' cached keys/values left padded (zeros) to `width` positions: per layer
    ([B, heads, width, head_dim], same). None when no job has a cached prefix."""
    some = next((j.entry for j in jobs if j.entry is not None and j.past > 0), None)
    if some is None or width == 0:
        return None
    out = []
    for layer, (k0, v0) in enumerate(some.past):
        keys = k0.new_zeros((len(jobs), k0.shape[0], width, k0.shape[2]))  # [B, h, P, d]
        values = v0.new_zeros((len(jobs), v0.shape[0], width, v0.shape[2]))
        for b, job in enumerate(jobs):
            if job.entry is not None and job.past > 0:
                k, v = job.entry.past[layer]  # [h, p_b, d]
                keys[b, :, width - job.past :] = k
                values[b, :, width - job.past :] = v
        out.append((keys, values))
    return out


def extend_inputs(jobs: Sequence[Job], width: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids [B, S] right padded, attention_mask [B, width + S], position_ids [B, S]) of
    the jobs' new tokens on top of their cached prefixes left padded to `width`."""
    new = max(len(j.ids) - j.past for j in jobs)  # S
    input_ids = torch.full((len(jobs), new), pad_id, dtype=torch.long)
    mask = torch.zeros((len(jobs), width + new), dtype=torch.long)
    positions = torch.zeros((len(jobs), new), dtype=torch.long)
    for b, job in enumerate(jobs):
        s = len(job.ids) - job.past
        input_ids[b, :s] = torch.tensor(job.ids[job.past :], dtype=torch.long)
        mask[b, width - job.past : width + s] = 1
        positions[b] = job.past + torch.arange(new)  # pads continue counting, masked anyway
    return input_ids, mask, positions


def layer_states(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) of a filled `DynamicCache`; ConfigError for a model whose
    cache keeps anything else (a sliding window drops positions, linear attention keeps a
    state): such a verifier is read whole (`--scorer-cache off`)."""
    out = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if getattr(layer, "is_sliding", False) or not (
            isinstance(keys, Tensor) and isinstance(values, Tensor)
        ):
            raise ConfigError(
                f"cached scoring: the verifier's cache layer {type(layer).__name__} does not "
                "keep every position's keys and values; use --scorer-cache off"
            )
        out.append((keys, values))
    return out


def read_jobs(
    reader: Reader, jobs: Sequence[Job], pad_id: int, keep_past: bool = True
) -> list[Entry]:
    """One forward pass over the jobs' new tokens on their cached prefixes -> each job's
    whole-row entry: outputs of all its T positions and, with `keep_past`, its keys/values
    (else none: the row is only ranked, never extended)."""
    from transformers import DynamicCache

    width = max(j.past for j in jobs)  # P
    past = stacked_past(jobs, width)
    input_ids, mask, positions = extend_inputs(jobs, width, pad_id)
    device = device_of(reader.model)
    config = reader.config
    if past is None:
        cache = DynamicCache(config=config)
        mask = mask[:, width:]  # no cached positions at all
        width = 0
    else:
        cache = DynamicCache(ddp_cache_data=past, config=config)
    outputs = reader.forward(
        input_ids.to(device), mask.to(device), positions.to(device), cache
    ).cpu()  # [B, S]
    layers = layer_states(cache)  # [B, h, P + S, d] each
    entries = []
    for b, job in enumerate(jobs):
        s = len(job.ids) - job.past
        rows = slice(width - job.past, width + s)  # the row's own positions, no padding
        kv = (
            [(k[b, :, rows].clone(), v[b, :, rows].clone()) for k, v in layers] if keep_past else []
        )
        before = job.entry.outputs if job.entry is not None else torch.zeros(0)  # [past]
        entries.append(Entry(kv, torch.cat([before[: job.past], outputs[b, :s]])))  # [T]
    return entries


# --------------------------------------------------------------------------------- the scorer


class CachedScorer:
    """A `Scorer` (`rl.eval.search`) that reads every verifier token once (module docstring).

    `values` caches every problem's prompt and, with `keep` (beam search), every row it
    scores; `retain` (after each round) keeps the rows that stay beams and their prompts.
    Without `keep` (best-of-N) rows are only read: what is held is the prompts.
    `compute.verifier_tokens` counts the tokens fed to the model (prompts once, then only the
    uncached ends of rows)."""

    def __init__(self, reader: Reader, pad_id: int = 0, batch_size: int = 32) -> None:
        self.reader = reader
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.cache = PrefixCache()
        self.compute = Compute()
        self._row_keys: dict[tuple[Key, Key], tuple[Key, Key]] = {}
        """(prompt ids, response ids) -> (its row's key, its prompt's key)."""

    @torch.no_grad()
    def values(
        self, problems: Sequence[Problem], responses: Sequence[list[int]], keep: bool = True
    ) -> list[list[float]]:
        rendered = self.reader.render(problems, responses)
        self.read([tuple(r.ids[: r.prompt_length]) for r in rendered], store=True)  # prompts
        outputs = self.read([tuple(r.ids) for r in rendered], store=keep)  # key -> [T]
        out = []
        for problem, response, r in zip(problems, responses, rendered, strict=True):
            key, prompt = tuple(r.ids), tuple(r.ids[: r.prompt_length])
            if keep:
                self._row_keys[(tuple(problem.prompt_ids), tuple(response))] = (key, prompt)
            z = outputs.get(key, torch.zeros(0))  # [T]
            out.append(torch.sigmoid(z[r.read_at]).tolist())  # [H]
        return out

    def read(self, rows: Sequence[Key], store: bool) -> dict[Key, Tensor]:
        """Each row's outputs [T], reading every row not cached yet from its longest cached
        prefix, `batch_size` rows a forward pass; adds the tokens fed to `compute`. With
        `store`, the rows read are cached (else only their outputs are kept)."""
        outputs: dict[Key, Tensor] = {}
        jobs: dict[Key, Job] = {}
        for ids in rows:
            if not ids or ids in jobs or ids in outputs:
                continue
            past, entry = self.cache.longest(ids)
            if past == len(ids) and entry is not None:
                outputs[ids] = entry.outputs
            else:
                jobs[ids] = Job(ids, past, entry)
        todo = list(jobs.values())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            entries = read_jobs(self.reader, chunk, self.pad_id, keep_past=store)
            for job, entry in zip(chunk, entries, strict=True):
                outputs[job.ids] = entry.outputs
                if store:
                    self.cache.put(job.ids, entry)
            self.compute.verifier_tokens += sum(len(j.ids) - j.past for j in chunk)
        return outputs

    def retain(self, problems: Sequence[Problem], responses: Sequence[list[int]]) -> None:
        keep: set[Key] = set()
        kept_rows = {}
        for problem, response in zip(problems, responses, strict=True):
            row = (tuple(problem.prompt_ids), tuple(response))
            if row in self._row_keys:
                kept_rows[row] = self._row_keys[row]
                keep.update(self._row_keys[row])
        self._row_keys = kept_rows
        self.cache.keep_only(keep)
