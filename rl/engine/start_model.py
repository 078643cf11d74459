"""The tiny starting policies for the built-in arithmetic task, built locally (no hub).

`ensure_start_model(cache_root, cfg, kind=...)` returns a saved Hugging Face checkpoint
directory (model + tokenizer, loadable with AutoTokenizer / AutoModelForCausalLM). Two kinds:

`arith-tiny` (the default; built here):

- tokenizer: character level over printable ASCII and "\\n" (made with the `tokenizers`
  library), with <pad>/<bos>/<eos> and a chat template that renders a user message as
  "<bos>{content}\\n" and an assistant message as "{content}<eos>";
  `add_generation_prompt` adds nothing.
- model: a random-init LlamaConfig decoder (tied embeddings), warmed up by supervised
  fine-tuning on `rl.tasks.arith.demonstration` responses to TRAIN-split prompts, with
  `demo_error_rate` > 0 so the start policy makes step errors that RL can fix. The loss is
  the mean cross-entropy over response tokens (the <eos> included), prompt tokens masked.

`chat-tiny`: a byte-level BPE tokenizer, ChatML template, Qwen2 model and Qwen-style
generation defaults (see `rl.engine.chat_model`), warmed up by the same SFT on the task's
chat-format demonstrations (answers as `\\boxed{N}`, ending with <|im_end|>).

The checkpoint is cached under `cache_root` by a hash of the configs, built once under a
file lock (concurrent processes wait for the first, saying so once a minute) into a temp dir
renamed into place.

Builds of one recipe are bit-identical on one machine but not across machines (CPU kernels
differ by instruction set, and library versions change the BPE merges or the summation
order), and a tiny model's SFT turns such differences into another policy. So the recipes
the quickstarts and the benchmark regimes use are **shipped** with the package
(`rl/engine/start_models/<kind>-<key>/`, a few MB each) and their weights digests recorded in
`rl/engine/start_models/digests.json`: `ensure_start_model` returns the shipped copy when the
recipe has one (`source="shipped"`, the default) and builds only other recipes (or any
recipe with `source="build"`). A copy whose digest is not the recorded one is reported by
`describe` (the runs print it at start).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rl.engine.tiny_config import TinyModelConfig
from rl.tasks.arith import STEP_DELIMITER, ArithConfig, ArithProblem, demo_lines, sample_problems

SHIPPED_ROOT = Path(__file__).with_name("start_models")
"""Start models shipped with the package, one directory per recipe (`<kind>-<key>`)."""

DIGESTS_FILE = SHIPPED_ROOT / "digests.json"
"""`{"<kind>-<key>": {"weights_sha256": ..., "about": ...}}`: the weights each recorded
recipe must have (shipped or not)."""

LOCK_REPORT_S = 60.0
"""How often a process waiting for another's start-model build says so."""

SOURCES: tuple[str, ...] = ("shipped", "build")
"""Where `ensure_start_model` takes a recipe's weights from (see the module docstring)."""

BUILD_VERSION = 2
"""Bumped when the build procedure changes, so old cached checkpoints are not reused."""

ARITH_TINY, CHAT_TINY = "arith-tiny", "chat-tiny"
KINDS: tuple[str, ...] = (ARITH_TINY, CHAT_TINY)
"""The start models `ensure_start_model` can build (`model.path=builtin:<kind>`)."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ bos_token + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)
"""User (or system) turn: "<bos>{content}\\n"; assistant turn: "{content}<eos>"."""


def build_tokenizer(task_cfg: ArithConfig | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character or "\\n".

    The vocabulary covers every task config (digits, "+-*=", "Answer: ", spaces, "\\n"), so
    `task_cfg` is accepted for API symmetry only.

    Ids: 0 <pad>, 1 <bos>, 2 <eos>, then the characters. No special tokens are added by
    `tok(text)`; the chat template adds <bos>/<eos>.
    """
    del task_cfg
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS] + chars)}
    # BPE without merges splits a string into its characters (no pre-tokenizer needed).
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",
        model_max_length=TinyModelConfig.max_position_embeddings,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(cfg: TinyModelConfig, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A random-init Llama decoder sized by `cfg`, with tied input/output embeddings."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def prompt_text(tok: PreTrainedTokenizerFast, prompt: str) -> str:
    """The prompt as the policy sees it: the chat template over one user message."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text


def sft_batch(
    tok: PreTrainedTokenizerFast, prompts: list[str], responses: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each [B, T]; labels -100 off-response.

    Each sequence is the chat-template prompt, then the response and <eos>.
    """
    seqs: list[list[int]] = []
    n_prompt: list[int] = []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tok(prompt_text(tok, p), add_special_tokens=False).input_ids
        r_ids = tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs.append(p_ids + r_ids)
        n_prompt.append(len(p_ids))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # [B, T]
    for i, (s, k) in enumerate(zip(seqs, n_prompt, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, k : len(s)] = torch.tensor(s[k:])
    return ids, mask, labels


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% of `total`, then cosine decay to 10% of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


Example = Callable[[ArithProblem, random.Random, TinyModelConfig], tuple[str, str]]
"""(problem, rng, recipe) -> (user message, demonstration response)."""


def arith_example(
    problem: ArithProblem, rng: random.Random, cfg: TinyModelConfig
) -> tuple[str, str]:
    """(prompt, demonstration with `cfg.demo_errors()`) of one arith-tiny SFT example."""
    return problem.prompt, STEP_DELIMITER.join(demo_lines(problem, rng, cfg.demo_errors()))


def sft(
    model: Any,
    tok: PreTrainedTokenizerFast,
    cfg: TinyModelConfig,
    show_progress: bool = True,
    example: Example = arith_example,
) -> list[float]:
    """Warm `model` up on train-split demonstrations (`example` per problem) in place;
    returns the per-step losses."""
    rng = random.Random(f"sft/{cfg.seed}")
    problems = sample_problems("train", cfg.sft_steps * cfg.sft_batch_size, cfg.task, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.01)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.sft_steps), desc="SFT start model", disable=not show_progress)
    for step in bar:
        batch = problems[step * cfg.sft_batch_size : (step + 1) * cfg.sft_batch_size]
        pairs = [example(p, rng, cfg) for p in batch]
        ids, mask, labels = sft_batch(tok, [u for u, _ in pairs], [r for _, r in pairs])
        for group in opt.param_groups:
            group["lr"] = cfg.sft_lr * _lr_factor(step, cfg.sft_steps)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def loss_curve(losses: list[float], points: int = 12) -> dict[str, Any]:
    """`losses` (one per SFT step) as the means of `points` equal spans of steps, for
    build_info.json: whether SFT converged or was still leaving a plateau when it stopped
    is what most often makes two builds of one recipe different policies."""
    every = max(1, -(-len(losses) // points))  # ceil
    spans = [losses[i : i + every] for i in range(0, len(losses), every)]
    return {"every_steps": every, "mean_loss": [round(sum(s) / len(s), 4) for s in spans]}


def cache_key(cfg: TinyModelConfig, kind: str = ARITH_TINY) -> str:
    """A short hash of the configs, the kind and the build version: the checkpoint's cache
    name (arith-tiny's hash leaves the kind out, so existing caches stay valid)."""
    recipe: dict[str, Any] = {"version": BUILD_VERSION, "cfg": asdict(cfg)}
    if cfg.task.operand_min == 0:  # a field added later: at its default, keep the old hashes
        del recipe["cfg"]["task"]["operand_min"]
    if kind != ARITH_TINY:
        recipe["kind"] = kind
    blob = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def start_model_dir(cache_root: Path, cfg: TinyModelConfig, kind: str = ARITH_TINY) -> Path:
    """Where the start checkpoint for `cfg` lives (complete once `build_info.json` exists)."""
    if kind not in KINDS:
        raise ValueError(f"unknown start model {kind!r}; valid: {', '.join(KINDS)}")
    return Path(cache_root) / f"{kind}-{cache_key(cfg, kind)}"


def recorded_digests() -> dict[str, dict[str, str]]:
    """The recorded weights digests by start-model name (`<kind>-<key>`)."""
    if not DIGESTS_FILE.exists():
        return {}
    recorded: dict[str, dict[str, str]] = json.loads(DIGESTS_FILE.read_text())
    return recorded


def shipped_model_dir(cfg: TinyModelConfig, kind: str = ARITH_TINY) -> Path | None:
    """The shipped copy of the recipe `cfg` (None when the package ships none)."""
    shipped = SHIPPED_ROOT / start_model_dir(Path("."), cfg, kind).name
    return shipped if (shipped / "build_info.json").exists() else None


def describe(checkpoint: Path) -> tuple[str, bool]:
    """(one line naming a start model, its origin and weights digest; whether the digest is
    the recorded one, or none is recorded). The line is what runs print at start and what
    tests report when a quickstart does not learn."""
    checkpoint = Path(checkpoint)
    origin = "shipped copy" if checkpoint.parent == SHIPPED_ROOT else "built here"
    digest = weights_digest(checkpoint)
    want = recorded_digests().get(checkpoint.name, {}).get("weights_sha256")
    line = f"start model {checkpoint.name} ({origin}): weights digest {digest}"
    if want is None:
        return line + " (no digest recorded for this recipe)", True
    if digest == want:
        return line + " (the recorded one)", True
    return (
        line + f", NOT the recorded {want}: another build of this recipe (CPU kernels or "
        "library versions differ), so published numbers for it do not apply",
        False,
    )


def wait_for_start_model(
    cache_root: Path,
    cfg: TinyModelConfig,
    kind: str = ARITH_TINY,
    poll_s: float = 2.0,
    source: str = "shipped",
    report: Callable[[str], None] = print,
) -> Path:
    """Block until another process has finished building the start checkpoint (or return the
    shipped copy). Polls the file system rather than waiting in a collective, whose timeout
    (10 min under gloo) a first build on a slow or busy machine can exceed; says once a
    minute what it waits for."""
    shipped = shipped_model_dir(cfg, kind) if source == "shipped" else None
    if shipped is not None:
        return shipped
    final = start_model_dir(cache_root, cfg, kind)
    start = last = time.monotonic()
    while not (final / "build_info.json").exists():
        time.sleep(poll_s)
        if time.monotonic() - last >= LOCK_REPORT_S:
            last = time.monotonic()
            lock = final.parent / f"{final.name}.lock"
            report(
                f"waiting {last - start:.0f} s for {final} (built by rank 0; on several "
                f"nodes model.cache_dir must be shared; lock {lock}: {lock_holder(lock)})"
            )
    return final


def lock_holder(lock: Path) -> str:
    """Who holds a start-model build lock, as its holder wrote it in the lock file."""
    try:
        text = lock.read_text().strip()
    except OSError:
        return "no lock file yet"
    return text or "unknown holder"


def _acquire(lock: Any, path: Path, report: Callable[[str], None]) -> None:
    """Take the exclusive `fcntl` lock on the open file `lock`, saying once a minute who
    holds it. An flock dies with its process, so a killed builder never leaves it stale."""
    start = last = time.monotonic()
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(1.0)
        if time.monotonic() - last >= LOCK_REPORT_S:
            last = time.monotonic()
            report(
                f"waiting {last - start:.0f} s for the start-model build lock {path} "
                f"({lock_holder(path)})"
            )
    lock.seek(0)
    lock.truncate()
    lock.write(f"held by pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
    lock.flush()


def ensure_start_model(
    cache_root: Path,
    cfg: TinyModelConfig | None = None,
    show_progress: bool = True,
    kind: str = ARITH_TINY,
    source: str = "shipped",
    report: Callable[[str], None] = print,
) -> Path:
    """The directory of the SFT start checkpoint for `cfg`: the shipped copy when the recipe
    has one and `source == "shipped"`, else built into `cache_root` on first use.

    The build runs under an exclusive `fcntl` lock on `<cache_root>/<name>.lock` (its holder
    writes its pid there; waiters report it once a minute), into a temp dir that is renamed
    into place, so concurrent callers build once and never see a partial checkpoint. Uses 2
    torch threads while building.
    """
    cfg = cfg or TinyModelConfig()
    if source not in SOURCES:
        raise ValueError(f"unknown start-model source {source!r}; valid: {', '.join(SOURCES)}")
    shipped = shipped_model_dir(cfg, kind) if source == "shipped" else None
    if shipped is not None:
        return shipped
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    final = start_model_dir(cache_root, cfg, kind)
    if (final / "build_info.json").exists():
        return final
    lock_path = cache_root / f"{final.name}.lock"
    with open(lock_path, "a+") as lock:
        _acquire(lock, lock_path, report)
        if (final / "build_info.json").exists():  # another process built it meanwhile
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_root))
        try:
            _build(tmp, cfg, kind, show_progress)
            if final.exists():  # a stale partial dir (no build_info.json): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return final


def _build(out: Path, cfg: TinyModelConfig, kind: str, show_progress: bool) -> None:
    """Build tokenizer + model, run SFT and save both (and build_info.json) into `out`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t0 = time.time()
        if kind == CHAT_TINY:
            from rl.engine import chat_model

            tok = chat_model.build_chat_tokenizer(cfg)
            model: Any = chat_model.build_chat_model(cfg, tok)
            losses = sft(model, tok, cfg, show_progress, chat_model.chat_example)
        else:
            tok = build_tokenizer(cfg.task)
            model = build_model(cfg, tok)
            losses = sft(model, tok, cfg, show_progress)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if kind == CHAT_TINY:
            _set_tokenizer_class(out, "Qwen2Tokenizer")
        info = {
            "kind": kind,
            "config": asdict(cfg),
            "build_version": BUILD_VERSION,
            "sft_seconds": round(time.time() - t0, 1),
            "final_sft_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "sft_loss_curve": loss_curve(losses),
            "weights_sha256": weights_digest(out),
        }
        (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 (first 16 hex digits) over the checkpoint's `*.safetensors` files, in name
    order: which copy of a start model a report or run used. The cache key names the recipe
    only, and two builds of one recipe on different machines or library versions can differ
    (float summation order), so results record this beside the key."""
    digest = hashlib.sha256()
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        with open(shard, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _set_tokenizer_class(out: Path, name: str) -> None:
    """Record the tokenizer class a checkpoint of this model type ships (AutoTokenizer
    picks it by model type anyway; the file then says what loads)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2) + "\n")
