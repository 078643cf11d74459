"""Forward passes over (prompt + response) batches shared by the policy, reference, PRM
and critic: log-probs (and entropy) of the response tokens, without ever holding float32
logits over [batch, tokens, vocabulary].

Any batch object with `input_ids [B, Tp + Tr]`, `attention_mask [B, Tp + Tr]` and
`prompt_length` (Tp) works: `rl.core.types.RolloutBatch` and `HeadBatch` both do.

How memory stays bounded (a 152k vocabulary makes full logits the largest tensor of a step):
- The model runs with no logits kept; its decoder's last hidden states are read at the
  response positions only (`Tp - 1 .. T - 2`, the positions that predict response tokens).
- The output layer runs over `chunk_tokens` positions at a time; each chunk's logits are
  upcast to float32, reduced to the sampled token's log-prob and the entropy, and freed.
- The backward pass recomputes each chunk's logits and writes their gradient by hand
  (`_ChunkLogprobs`), so no chunk's logits or softmax stay alive between the passes.
- An output layer partitioned by ZeRO-3 runs as its own module, one chunk at a time
  (`_partitioned_chunks`), so DeepSpeed gathers its weight for each call as it does for any
  layer; with gradients on, each chunk is checkpointed (only its hidden states are kept, the
  logits are recomputed in the backward pass, when DeepSpeed gathers the weight again and
  reduces its gradient); without them, the weight is gathered once for all the chunks.
Models whose logits are not a bias-free output layer of the last hidden state (a final
soft-cap or a logit scale in their config) take the plain path: the model's forward with
`logits_to_keep` (response positions only), then the same chunked reduction on those
logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rl.algos.losses import logprobs_and_entropy
from rl.core.types import position_ids_from_mask

CHUNK_TOKENS = 128
"""Response positions per chunk of the output layer (memory ~ chunk x vocabulary x 4 B)."""

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config keys of models whose logits are more than the output layer's (plain path)."""


class TokenBatch(Protocol):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int


@dataclass
class _Tokens:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int


def trim_padding(batch: TokenBatch) -> tuple[_Tokens, int]:
    """The batch without the columns no row attends to: leading prompt padding and
    trailing response padding (a micro-batch is padded to the longest row of the whole
    step). Returns (trimmed batch, Tr' its response length). Positions come from the
    attention mask, so the model computes the same thing on fewer columns."""
    tp, total = batch.prompt_length, batch.input_ids.shape[1]
    bounds = _attended_bounds(batch)
    if bounds is None:
        return _Tokens(batch.input_ids, batch.attention_mask, tp), total - tp
    first, last = bounds
    lead = min(first, tp - 1)  # keep one prompt column: it predicts the first response token
    end = max(last + 1, tp)
    cut = slice(lead, end)
    trimmed = _Tokens(batch.input_ids[:, cut], batch.attention_mask[:, cut], tp - lead)
    return trimmed, end - tp


def _attended_bounds(batch: TokenBatch) -> tuple[int, int] | None:
    """The first and last column any row attends to (None: no column): from the batch's
    `column_spans` when it has them (no host read), else from its mask (one read)."""
    spans = getattr(batch, "column_spans", None)
    if spans is not None:
        rows = [span for span in spans if span is not None]
        return (min(s[0] for s in rows), max(s[1] for s in rows)) if rows else None
    used = batch.attention_mask.bool().any(dim=0).nonzero().flatten()  # [n used columns]
    if used.numel() == 0:
        return None
    first, last = used[[0, -1]].tolist()  # one host read for both
    return first, last


def padding_counts(
    attention_mask: torch.Tensor, prompt_length: int, micro_size: int
) -> tuple[float, float, float]:
    """(attended tokens, positions forwarded with `trim_padding`, positions forwarded
    without it) over the micro-batches of `micro_size` consecutive rows: the padding share
    of a forward pass is 1 - tokens / positions. attention_mask: [B, Tp + Tr]."""
    mask = attention_mask.bool().cpu()  # one host copy
    tokens, trimmed, full = float(mask.sum()), 0.0, 0.0
    for start in range(0, mask.shape[0], micro_size):
        micro = mask[start : start + micro_size]
        batch = _Tokens(micro.long(), micro.long(), prompt_length)
        kept, _ = trim_padding(batch)
        trimmed += micro.shape[0] * kept.input_ids.shape[1]
        full += micro.numel()
    return tokens, trimmed, full


def _unwrap(model: Any) -> Any:
    """The Hugging Face model inside a DeepSpeed engine (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _splits_cleanly(hf_model: Any) -> bool:
    """True when logits = output layer(last hidden state), so the two can run apart."""
    config = hf_model.config
    return hasattr(hf_model, "get_decoder") and not any(
        getattr(config, key, None) for key in LOGIT_TRANSFORMS
    )


def _response_hidden(model: Any, hf_model: Any, batch: TokenBatch) -> torch.Tensor:
    """Last hidden states at the positions that predict response tokens: [b, Tr, H].

    The model runs its own forward (through the DeepSpeed engine when given one, so ZeRO-3
    gathers parameters as usual) with no logits kept; a hook on its decoder reads the
    hidden states."""
    captured: list[torch.Tensor] = []
    hook = hf_model.get_decoder().register_forward_hook(
        lambda module, args, out: captured.append(out.last_hidden_state)
    )
    try:
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask),
            use_cache=False,
            logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch.input_ids.device),
        )
    finally:
        hook.remove()
    return captured[-1][:, batch.prompt_length - 1 : -1]  # [b, Tr, H]


def _response_logits(model: Any, batch: TokenBatch) -> torch.Tensor:
    """The model's own forward, logits kept only at response positions: [b, Tr, V]."""
    tr = batch.input_ids.shape[1] - batch.prompt_length
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
        logits_to_keep=tr + 1,
    ).logits  # [b, Tr + 1, V]
    return logits[:, :-1]  # [b, Tr, V]


class _ChunkLogprobs(torch.autograd.Function):
    """Sampled-token log-probs and entropy of the response, `chunk` positions at a time, from
    hidden states and a bias-free output layer `W` (or from logits when `W` is None), with a
    hand-written backward that recomputes each chunk's logits instead of keeping them:
    memory ~3 float32 chunk logits.

    Backward, with z = logits / T, p = softmax(z), lse = logsumexp(z), H = entropy:
        d log p_y / dz = onehot(y) - p,    dH / dz = -p * (z - lse + H)
    and z = h W^T / T gives dh = dz W / T and dW = dz^T h / T.
    The matrix products run in the model's dtype (no float32 copy of `W`); dW is summed over
    the chunks in one float32 buffer and rounded to `W`'s dtype once (summed by autograd,
    chunk by chunk in bf16, it would lose the small chunks' contributions).
    """

    @staticmethod
    def forward(
        ctx: Any, source: torch.Tensor, weight: torch.Tensor | None, ids: torch.Tensor,
        temperature: float, entropy: bool, chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        logps, ents = [], []
        for start in range(0, ids.shape[1], chunk):
            cut = slice(start, start + chunk)
            part = source[:, cut]
            logits = part if weight is None else part @ weight.T  # [b, c, V]
            logp, ent = logprobs_and_entropy(logits, ids[:, cut], temperature, entropy)
            logps.append(logp)
            ents.append(ent if ent is not None else logp.new_zeros(logp.shape))
        logp_all, ent_all = torch.cat(logps, dim=1), torch.cat(ents, dim=1)  # [b, Tr] each
        ctx.save_for_backward(source, weight, ids, logp_all, ent_all)
        ctx.temperature, ctx.chunk, ctx.entropy = temperature, chunk, entropy
        return logp_all, (ent_all if entropy else logp_all.new_zeros(0))

    @staticmethod
    def backward(
        ctx: Any, grad_logp: torch.Tensor, grad_ent: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        source, weight, ids, logp, ent = ctx.saved_tensors
        grad_source = torch.empty_like(source)
        grad_weight = None if weight is None else torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, ids.shape[1], ctx.chunk):
            cut = slice(start, start + ctx.chunk)
            grad_z = _chunk_grad_logits(
                source[:, cut],
                weight,
                ids[:, cut],
                logp[:, cut],
                ent[:, cut] if ctx.entropy else None,
                grad_logp[:, cut],
                grad_ent[:, cut] if ctx.entropy else None,
                ctx.temperature,
            )  # [b, c, V] float32
            if weight is None:
                grad_source[:, cut] = grad_z.to(source.dtype)
                continue
            flat = grad_z.reshape(-1, grad_z.shape[-1]).to(weight.dtype)  # [b*c, V]
            part = source[:, cut]
            grad_source[:, cut] = (flat @ weight).reshape(part.shape).to(source.dtype)
            assert grad_weight is not None
            grad_weight += (flat.T @ part.reshape(-1, part.shape[-1]).to(weight.dtype)).float()
        out_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_source, out_weight, None, None, None, None


def _chunk_grad_logits(
    source: torch.Tensor,
    weight: torch.Tensor | None,
    ids: torch.Tensor,
    logp: torch.Tensor,
    ent: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """d loss / d logits of one chunk (its logits recomputed): [b, c, V] float32."""
    z = _chunk_logits(source, weight, temperature)  # [b, c, V]
    lse = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logp  # [b, c], log p_y = z_y - lse
    probs = (z - lse.unsqueeze(-1)).exp()  # [b, c, V]
    grad_z = -probs * grad_logp.unsqueeze(-1)
    grad_z.scatter_add_(-1, ids.unsqueeze(-1), grad_logp.unsqueeze(-1))
    if ent is not None and grad_ent is not None:
        grad_z -= grad_ent.unsqueeze(-1) * probs * (z - (lse - ent).unsqueeze(-1))
    return grad_z / temperature  # d/d logits


def _chunk_logits(
    source: torch.Tensor, weight: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """float32 logits / temperature of one chunk: [b, c, V]."""
    logits = source if weight is None else source @ weight.T
    return logits.float() / temperature


def _output_weight(hf_model: Any) -> torch.Tensor | None:
    """The output layer's weight when the chunks may use it directly (a bias-free linear
    layer whose parameters are not partitioned by ZeRO-3), else None."""
    output_layer = hf_model.get_output_embeddings()
    weight = getattr(output_layer, "weight", None)
    biased = getattr(output_layer, "bias", None) is not None
    if biased or weight is None or hasattr(weight, "ds_id"):
        return None
    return weight


def _partitioned_output_layer(hf_model: Any) -> torch.nn.Module | None:
    """The output layer when it is a bias-free linear layer partitioned by ZeRO-3."""
    output_layer = hf_model.get_output_embeddings()
    weight = getattr(output_layer, "weight", None)
    if getattr(output_layer, "bias", None) is not None or not hasattr(weight, "ds_id"):
        return None
    return output_layer


def _layer_logprobs(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk through the output layer as a module: (log-probs, entropy or zeros) [b, c]."""
    logp, ent = logprobs_and_entropy(layer(hidden), ids, temperature, entropy)
    return logp, (ent if ent is not None else torch.zeros_like(logp))


def _partitioned_chunks(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    entropy: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy `[b, Tr]` through a ZeRO-3 partitioned output layer `layer`,
    `chunk` positions at a time (see the module docstring)."""
    if not torch.is_grad_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters([layer.weight]):  # once, read-only
            return _ChunkLogprobs.apply(hidden, layer.weight, ids, temperature, entropy, chunk)
    logps, ents = [], []
    for start in range(0, ids.shape[1], chunk):
        cut = slice(start, start + chunk)
        run = partial(_layer_logprobs, layer, ids=ids[:, cut], temperature=temperature)
        logp, ent = checkpoint(run, hidden[:, cut], entropy=entropy, use_reentrant=False)
        logps.append(logp)
        ents.append(ent)
    return torch.cat(logps, dim=1), torch.cat(ents, dim=1)


def response_logprobs_and_entropy(
    model: Any,
    batch: TokenBatch,
    temperature: float = 1.0,
    *,
    entropy: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[b, Tr]` of the response tokens under `model` (a DeepSpeed engine or a
    Hugging Face model) at `temperature`, and their entropy `[b, Tr]` when asked; float32.
    Gradients flow when enabled (to the log-probs, and to the entropy). The forward runs
    on the batch without its padding columns (`trim_padding`); positions past every row's
    end come back as 0."""
    width = batch.input_ids.shape[1] - batch.prompt_length  # Tr
    trimmed, kept = trim_padding(batch)
    logp, ent = _logprobs_and_entropy(model, trimmed, temperature, entropy, chunk_tokens)
    pad = (0, width - kept)  # [b, Tr'] -> [b, Tr]
    return F.pad(logp, pad), (F.pad(ent, pad) if ent is not None else None)


def _logprobs_and_entropy(
    model: Any, batch: TokenBatch, temperature: float, entropy: bool, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_logprobs_and_entropy` on a batch as given: [b, Tr] each."""
    hf_model = _unwrap(model)
    ids = batch.input_ids[:, batch.prompt_length :]  # [b, Tr]
    clean = _splits_cleanly(hf_model)
    weight = _output_weight(hf_model) if clean else None
    partitioned = _partitioned_output_layer(hf_model) if clean else None
    if weight is not None or partitioned is not None:
        source = _response_hidden(model, hf_model, batch)  # [b, Tr, H]
    else:  # the model's own output layer, logits at response positions only
        source = _response_logits(model, batch)  # [b, Tr, V]
    if ids.shape[1] == 0:  # no response tokens
        empty = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        return empty, (empty.clone() if entropy else None)
    if partitioned is not None:
        args = (partitioned, source, ids, temperature, entropy, chunk_tokens)
        logp, ent = _partitioned_chunks(*args)
    else:
        logp, ent = _ChunkLogprobs.apply(source, weight, ids, temperature, entropy, chunk_tokens)
    return logp, (ent if entropy else None)


def response_logprobs(model: Any, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs `[b, Tr]` of the response tokens under `model` (gradient kept if enabled)."""
    return response_logprobs_and_entropy(model, batch, temperature)[0]
