"""Training a discriminative PRM on step labels: the pipeline behind `launch/train_prm.py`.

What is implemented (Math-Shepherd / PRM800K / Qwen2.5-Math-PRM style, see
docs/prm.md "Training a PRM"):

1. The step-label dataset (`prm.data`, TRL's stepwise format) is read with
   `rl.prm.data.read_step_dataset`. `prm.val_fraction` of its *prompts* (with all their
   solutions) are held out in a seeded order; they are always fully labelled and only measure.
2. With `prm.budget_frac` < 1 only part of the training pool is labelled
   (`rl.prm.active`: ActPRM-style uncertainty under an ensemble of heads, or `uniform`); the
   other solutions are counted as skipped and never trained on.
3. The PRM is the policy (`model.path`) read under a `PRMConvention`
   (`rl.prm.convention`): `prompt + step_1 <tag> step_2 <tag> ...`, with the log-odds of
   "good" at every tag from two label tokens of the LM head (`label_tokens`) or a fresh
   2-way linear head (`two_class`). `prm.add_tag_token` adds the tag as a new special token
   (embeddings resized); otherwise a tag that is not one token is a one-line ConfigError.
4. Loss: binary cross-entropy on the log-odds at the tags only, averaged over the tags of
   the *global* micro-batch (all ranks), one optimizer step per micro-batch, AdamW at
   `prm.lr`. Targets are the binary `labels`, or the data's `label_values` (soft) where
   present with `prm.soft_labels`.
5. Validation loss (BCE on the binary labels), step AUC (every held-out
   step's P(good) against its label) and ProcessBench first-error F1
   (`rl.eval.prm.processbench_scores`, first step with P(good) < 0.5 against the first
   step labelled bad), after every `prm.validate_every`-th epoch and the last. The epoch
   `prm.keep` selects (lowest validation loss, highest validation F1, or the last) is
   saved with `save_prm` to `prm.output_dir`, with `train_prm_metrics.json`.

Departures from the papers: one pass of plain BCE at the tags (no LM loss beside it, no
label smoothing); the validation split is by prompt, not a separate benchmark; the whole
network is fine-tuned (only an untied LM head, which `two_class` never reads, is frozen).
The pieces (rendering, loss, scores, passes) are in `rl.prm.fitting`. The training loop runs
on a DeepSpeed engine in the launcher and on a plain torch optimizer (`TorchEngine`) when
called as a library function on one process (`rl.prm.active.train_with_budget`); both go
through the same code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rl.config import Config, PRMConfig
from rl.core.errors import ConfigError, DataError
from rl.engine import deepspeed_engine as eng
from rl.prm.active import budget_run
from rl.prm.fitting import (
    convention_of,
    deepspeed_engine_factory,
    prepare_tokenizer,
    split_examples,
)

METRICS_FILE = "train_prm_metrics.json"


# ----------------------------------------------------------------------------------------------
# The launcher's pipeline
# ----------------------------------------------------------------------------------------------


def check_prm_config(prm: PRMConfig) -> None:
    """ConfigError naming the `prm.*` key whose value cannot work (before any model work;
    the bounds of single fields are checked when the config loads)."""
    if prm.data is None:
        raise ConfigError("prm.data: the step-label dataset is required (a .jsonl or directory)")
    if not Path(prm.data).exists():
        raise ConfigError(f"prm.data: {prm.data} does not exist")
    convention_of(prm)


def read_examples(prm: PRMConfig) -> list[Any]:
    """The dataset through helper A's reader (`rl.prm.data.read_step_dataset`)."""
    from rl.prm.data import read_step_dataset

    assert prm.data is not None  # check_prm_config
    examples = list(read_step_dataset(prm.data, format=prm.data_format))
    if not examples:
        raise DataError(f"prm.data: {prm.data} holds no solutions")
    return examples


def run(cfg: Config, dist: eng.DistInfo) -> dict[str, Any]:
    """Read, split, (select), train, save; returns the metrics written to METRICS_FILE."""
    from rl.engine.models import load_policy
    from rl.prm.model import save_prm
    from rl.setup import seed_everything

    prm = cfg.prm
    check_prm_config(prm)
    seed = cfg.seed if prm.seed is None else prm.seed
    conv = convention_of(prm)
    examples = read_examples(prm)
    seed_everything(seed)
    lm, tokenizer, model_path = load_policy(cfg, dist)
    ids, grew = prepare_tokenizer(conv, tokenizer, prm.add_tag_token, model_path)
    train_idx, val_idx = split_examples(examples, prm.val_fraction, seed)
    if not train_idx:
        raise DataError("prm.data: no training solutions left after holding out validation")
    start = time.perf_counter()
    outcome = budget_run(
        [examples[i] for i in train_idx],
        [examples[i] for i in val_idx],
        prm,
        seed,
        lm=lm,
        tokenizer=tokenizer,
        conv=conv,
        ids=ids,
        grew=grew,
        dist=dist,
        make_engine=deepspeed_engine_factory(cfg, dist, prm.micro_batch_size),
        make_selector_engine=deepspeed_engine_factory(cfg, dist, prm.micro_batch_size),
        progress=cfg.logging.progress_bar,
        log=tqdm.write,
    )
    train_s = time.perf_counter() - start
    out = Path(prm.output_dir)
    metrics: dict[str, Any] = {}
    if dist.is_main:
        save_prm(outcome.fit.engine.module, tokenizer, out, state_dict=outcome.fit.kept_state)
        metrics = outcome.metrics | {
            "base_model": model_path,
            "data": prm.data,
            "time": {"train_s": train_s},
            "prm": {k: getattr(prm, k) for k in prm.__dataclass_fields__},
        }
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        print(summary_line(metrics, out), flush=True)
    eng.barrier()
    return metrics


def summary_line(metrics: dict[str, Any], out: Path) -> str:
    """One line: data, labels bought, epochs, the kept epoch's validation scores, where."""
    kept = metrics["epochs"][metrics["kept_epoch"] - 1] if metrics["kept_epoch"] else {}

    def num(key: str) -> str:
        value = kept.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    sel = metrics["selection"]
    scores = (
        f"val loss {num('val_loss')}, step AUC {num('val_auc')}, first-error F1 {num('val_f1')}"
        if "val_loss" in kept
        else "no validation set"
    )
    return (
        f"prm: {sel['pool_solutions']} training solutions, {sel['labelled_solutions']} labelled "
        f"({sel['teacher_labels']} step labels; {sel['skipped_solutions']} skipped, "
        f"selection {sel['selection']}), {metrics['val_solutions']} held out; "
        f"{len(metrics['epochs'])} epochs, kept epoch {metrics['kept_epoch']}: {scores} -> {out}"
    )
