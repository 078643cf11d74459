"""The PAV pipeline behind `launch/train_pav.py`: Monte-Carlo labels, then the verifier.

1. Data (`rl.pav.data`): the first `pav.prompts` prompts of a seeded order of the training
   split, split over the ranks; `pav.samples_per_prompt` solutions each from the base policy
   (the configured rollout backend, at `rollout.temperature` / `rollout.top_p`), and `Q^pi` of
   every step prefix from `pav.n_mc` continuations, judged by the first reward function
   (`reward.functions[0]`, the verifier). Generation runs on a full copy of the base policy on
   every rank (no ZeRO: each rank generates on its own, at its own pace); records are appended
   to `<pav.output_dir>/mc_data.rank{r}.jsonl`, and a restarted run skips the prompts done.
2. Verifier: a `ValueModel` initialised from the base policy, or from `pav.init_model`
   when set (same tokenizer; fresh zero head),
   wrapped as a DeepSpeed engine with the run's `deepspeed` settings, trained for
   `pav.epochs` epochs at `pav.lr` (AdamW, no warm-up) with binary cross-entropy on the soft
   labels at every labelled position (the last prompt token, every step-end token). Losses are
   means over the labelled positions of the *global* micro-batch (all ranks), one optimizer
   step per micro-batch. `pav.val_fraction` of the prompts (with all their solutions) are held
   out; each epoch logs train/val BCE and val accuracy (`Q > 0.5` vs `label > 0.5`) against a
   constant predictor (the mean training label) and the labels' own entropy (the floor).
3. The verifier of the epoch `pav.keep` selects (`best`: the lowest validation BCE; `last`)
   is saved by rank 0 with `rl.engine.value_model.save_value_model` into `pav.output_dir`,
   with `train_pav_metrics.json` (every epoch's metrics and `kept_epoch`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rewards.base import RewardSpec
from rewards.build import make_verifier
from rl.config import Config, to_dict
from rl.core.batching import plan_micro_batches
from rl.core.errors import ConfigError, DataError
from rl.data.prompts import PromptRow, PromptSampler, seeded, val_prompt_set
from rl.engine import deepspeed_engine as eng
from rl.engine.models import enable_gradient_checkpointing, run_dtype
from rl.pav.active import (
    SELECT_RULES,
    UNCERTAINTY_KINDS,
    ActiveResult,
    LabelFn,
    SampleFn,
    label_rounds,
    make_selector,
    pool_source,
)
from rl.pav.data import (
    DATA_GLOB,
    META_FILE,
    SolutionRecord,
    append_records,
    check_meta,
    complete_prompts,
    generate_mc_data,
    mc_label,
    read_records,
    sample_candidates,
)
from rl.pav.fitting import (
    evaluate,
    make_value_engine,
    soft_bce,
    train_epoch,
    value_ds_config,
)
from rl.rollout.backend import RolloutBackend
from rl.setup import (
    check_shared_dir,
    make_rollout,
    prompt_rows,
    seed_everything,
    training_sampling,
)

METRICS_FILE = "train_pav_metrics.json"


def check_pav_config(cfg: Config) -> None:
    """ConfigError naming the `pav.*` key whose value cannot work (the bounds of single
    fields are checked when the config loads)."""
    pav = cfg.pav
    if pav.keep not in KEEP_RULES:
        raise ConfigError(f"pav.keep: {pav.keep!r} is not one of {', '.join(KEEP_RULES)}")
    if not cfg.reward.functions:
        raise ConfigError("reward.functions: PAV needs a verifier (the first reward function)")
    if pav.label_select not in SELECT_RULES:
        raise ConfigError(
            f"pav.label_select: {pav.label_select!r} is not one of {', '.join(SELECT_RULES)}"
        )
    if pav.uncertainty not in UNCERTAINTY_KINDS:
        raise ConfigError(
            f"pav.uncertainty: {pav.uncertainty!r} is not one of {', '.join(UNCERTAINTY_KINDS)}"
        )
    if pav.label_pool is not None and not Path(pav.label_pool).is_dir():
        raise ConfigError(f"pav.label_pool: {pav.label_pool} is not a directory")


# ----------------------------------------------------------------------------------------------
# Data phase
# ----------------------------------------------------------------------------------------------


def select_prompts(cfg: Config, tokenizer: Any) -> list[PromptRow]:
    """The first `pav.prompts` prepared training prompts in a seeded order, drawn from the same
    rows as the RL trainer's (so a larger `pav.prompts` extends a smaller run's data)."""
    kept, _ = prompt_rows(cfg, tokenizer, "train")
    if not kept:
        raise DataError(f"{cfg.data.train}: no usable training prompts for PAV data")
    order = PromptSampler(len(kept), cfg.seed).take(min(cfg.pav.prompts, len(kept)))
    return [kept[i] for i in order]


def data_meta(cfg: Config, model_path: str) -> dict[str, Any]:
    """The settings MC data depends on; a restart with other values is refused."""
    return {
        "model": model_path,
        "data": [cfg.data.train, cfg.data.train_split, cfg.data.train_size, cfg.data.task],
        "seed": cfg.seed,
        "samples_per_prompt": cfg.pav.samples_per_prompt,
        "n_mc": cfg.pav.n_mc,
        "sampling": [cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p],
        "verifier": [cfg.reward.functions[0].fn, cfg.reward.functions[0].kwargs],
        "step_delimiter": cfg.reward.step_delimiter,
    }


def make_data(
    cfg: Config,
    dist: eng.DistInfo,
    policy: Any,
    tokenizer: Any,
    model_path: str,
    rows: list[PromptRow],
) -> tuple[RolloutBackend, int]:
    """Generate this rank's missing MC records. Returns (the rollout backend, which the caller
    closes last: a vLLM engine's shutdown ends the process group; prefixes rolled out here)."""
    out = Path(cfg.pav.output_dir)
    meta = data_meta(cfg, model_path)
    check_meta(out, meta)
    eng.barrier()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    done = complete_prompts(read_records(out.glob(DATA_GLOB)), cfg.pav.samples_per_prompt)
    eng.barrier()  # every rank has read the files before any rank appends to its own
    todo = [r for r in rows if r.index not in done]
    mine = todo[dist.rank :: dist.world_size]
    if dist.is_main and done:
        print(
            f"pav: resuming: {len(rows) - len(todo)}/{len(rows)} prompts already done", flush=True
        )
    rollout = open_rollout(cfg, dist, policy, tokenizer, model_path)
    n_prefixes = label_in_full(cfg, dist, rollout, policy, tokenizer, mine, "pav data")
    eng.barrier()
    return rollout, n_prefixes


def open_rollout(
    cfg: Config, dist: eng.DistInfo, policy: Any, tokenizer: Any, model_path: str
) -> RolloutBackend:
    """The base policy's rollout backend on this rank (no ZeRO), RNGs seeded per rank."""
    rollout = make_rollout(cfg, tokenizer, model_path, policy, dist, zero_stage=0)
    if cfg.rollout.backend == "transformers":
        from deepspeed.accelerator import get_accelerator

        policy.to(get_accelerator().device_name(dist.local_rank))
    # after the engine: vLLM reseeds global RNGs (a tensor-parallel engine's requests carry
    # their own seeds, the same on each of its ranks)
    seed_everything(cfg.seed * 1000 + dist.rank)
    return rollout


def first_verifier(cfg: Config) -> Any:
    """The first reward function, which judges solutions and rollouts."""
    spec = cfg.reward.functions[0]
    return make_verifier(RewardSpec(spec.fn, 1.0, dict(spec.kwargs)))


def label_in_full(
    cfg: Config,
    dist: eng.DistInfo,
    rollout: RolloutBackend,
    policy: Any,
    tokenizer: Any,
    mine: list[PromptRow],
    desc: str,
) -> int:
    """Sample and Monte-Carlo label every solution of this rank's prompts `mine`, appending
    them to its data file; returns the prefixes rolled out."""
    out = Path(cfg.pav.output_dir)
    per_batch = max(1, cfg.rollout.generation_batch_size // cfg.pav.samples_per_prompt)
    bar = None
    if dist.is_main and cfg.logging.progress_bar and mine:
        bar = tqdm(total=0, desc=f"{desc} (rank 0)", unit="prefix")
    n_prefixes = generate_mc_data(
        rollout,
        policy,
        tokenizer,
        mine,
        out / f"mc_data.rank{dist.rank}.jsonl",
        first_verifier(cfg),
        training_sampling(cfg),
        samples_per_prompt=cfg.pav.samples_per_prompt,
        n_mc=cfg.pav.n_mc,
        delimiter=cfg.reward.step_delimiter,
        prompts_per_batch=per_batch,
        bar=bar,
    )
    if bar is not None:
        bar.close()
    return n_prefixes


def is_active(cfg: Config) -> bool:
    """Whether `train_pav` labels in rounds (rl/pav/active.py) rather than all at once."""
    return cfg.pav.label_fraction < 1.0 or cfg.pav.label_pool is not None


def active_meta(cfg: Config) -> dict[str, Any]:
    """The active-labelling settings a restart must keep (absent from a plain run's meta)."""
    pav = cfg.pav
    return {
        "active": {
            "label_fraction": pav.label_fraction,
            "label_select": pav.label_select,
            "uncertainty": pav.uncertainty,
            "label_round_prompts": pav.label_round_prompts,
            "ensemble_heads": pav.ensemble_heads,
            "selector_epochs": pav.selector_epochs,
            "label_pool": pav.label_pool,
            "val_fraction": pav.val_fraction,
        }
    }


def make_active_data(
    cfg: Config,
    dist: eng.DistInfo,
    policy: Any,
    tokenizer: Any,
    model_path: str,
    rows: list[PromptRow],
    init_path: str,
) -> tuple[RolloutBackend | None, set[int], ActiveResult, int]:
    """Active labelling (rl/pav/active.py): the held-out prompts in full, then the training
    prompts in rounds; the selection ensemble starts from `init_path`. Returns (the rollout
    backend or None with a label pool, the held-out prompts, what was bought, held-out
    prefixes rolled out)."""
    pav = cfg.pav
    out = Path(pav.output_dir)
    meta = data_meta(cfg, model_path)
    check_meta(out, meta | active_meta(cfg))
    eng.barrier()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).write_text(json.dumps(meta | active_meta(cfg), indent=2) + "\n")
    val_prompts = val_prompt_set([r.index for r in rows], pav.val_fraction, cfg.seed)
    val_rows = [r for r in rows if r.index in val_prompts]
    train_rows = [r for r in rows if r.index not in val_prompts]
    done = complete_prompts(read_records(out.glob(DATA_GLOB)), pav.samples_per_prompt)
    eng.barrier()
    todo_val = [r for r in val_rows if r.index not in done]
    rollout: RolloutBackend | None = None
    val_prefixes = 0
    if pav.label_pool is not None:
        sample, label = pool_source(pav.label_pool, meta)
        if dist.is_main and todo_val:
            append_records(out / "mc_data.rank0.jsonl", label(sample(todo_val)))
    else:
        rollout = open_rollout(cfg, dist, policy, tokenizer, model_path)
        mine_val = todo_val[dist.rank :: dist.world_size]
        val_prefixes = label_in_full(
            cfg, dist, rollout, policy, tokenizer, mine_val, "pav val data"
        )
        sample, label = rollout_source(cfg, rollout, policy, tokenizer, rows)
    eng.barrier()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    make = None
    if pav.label_select == "uncertainty" and pav.label_fraction < 1.0:

        def make() -> Any:
            return make_selector(cfg, dist, init_path, pad_id)

    n_rounds = math.ceil(len(train_rows) / pav.label_round_prompts)
    bar = None
    if dist.is_main and cfg.logging.progress_bar and n_rounds:
        bar = tqdm(total=n_rounds, desc="pav active labelling", unit="round")
    result = label_rounds(cfg, dist, train_rows, sample, label, make, bar)
    if bar is not None:
        bar.close()
    return rollout, val_prompts, result, val_prefixes


def rollout_source(
    cfg: Config, rollout: RolloutBackend, policy: Any, tokenizer: Any, rows: list[PromptRow]
) -> tuple[SampleFn, LabelFn]:
    """Candidates sampled from the base policy and labelled by Monte-Carlo rollouts."""
    pav = cfg.pav
    verifier, sampling = first_verifier(cfg), training_sampling(cfg)
    by_index = {r.index: r for r in rows}

    def sample(mine: list[PromptRow]) -> list[SolutionRecord]:
        return sample_candidates(
            rollout,
            policy,
            tokenizer,
            mine,
            verifier,
            sampling,
            pav.samples_per_prompt,
            cfg.reward.step_delimiter,
        )

    def label(candidates: list[SolutionRecord]) -> list[SolutionRecord]:
        return mc_label(
            rollout, policy, tokenizer, candidates, by_index, verifier, sampling, pav.n_mc
        )[0]

    return sample, label


def split_by_prompt(
    records: Sequence[SolutionRecord], val_fraction: float, seed: int
) -> tuple[list[SolutionRecord], list[SolutionRecord]]:
    """(train, val): `val_fraction` of the prompts, with all their solutions, held out (at
    least one prompt when the fraction is positive and there are two or more)."""
    records = [r for r in records if r.labels]  # a solution without steps has no label
    val_prompts = val_prompt_set({r.prompt_index for r in records}, val_fraction, seed)
    return split_records(records, val_prompts)


def split_records(
    records: Sequence[SolutionRecord], val_prompts: set[int]
) -> tuple[list[SolutionRecord], list[SolutionRecord]]:
    """(train, val) by prompt, each sorted by (prompt, sample); records without labels
    dropped."""
    ordered = sorted((r for r in records if r.labels), key=lambda r: (r.prompt_index, r.sample))
    train = [r for r in ordered if r.prompt_index not in val_prompts]
    val = [r for r in ordered if r.prompt_index in val_prompts]
    return train, val


# ----------------------------------------------------------------------------------------------
# Verifier training
# ----------------------------------------------------------------------------------------------


def constant_baselines(
    train: Sequence[SolutionRecord], val: Sequence[SolutionRecord]
) -> dict[str, float]:
    """Val BCE/accuracy of predicting the mean training label everywhere, and the val labels'
    mean entropy (the lowest BCE any model can reach on soft labels)."""
    p = sum(sum(r.labels) for r in train) / max(1, sum(len(r.labels) for r in train))
    p = min(max(p, 1e-6), 1 - 1e-6)
    ys = [y for r in val for y in r.labels]
    if not ys:
        return {}
    return {
        "val_bce_constant": sum(soft_bce(p, y) for y in ys) / len(ys),
        "val_acc_constant": sum((p > 0.5) == (y > 0.5) for y in ys) / len(ys),
        "val_bce_floor": sum(soft_bce(y, y) for y in ys) / len(ys),
        "train_label_mean": p,
    }


KEEP_RULES = ("best", "last")


@dataclass
class VerifierRun:
    engine: Any
    history: list[dict[str, float]]
    kept_epoch: int
    """The epoch whose weights `kept_state` holds (0: no training epoch ran)."""
    kept_state: dict[str, torch.Tensor] | None
    """Full weights of the kept epoch on rank 0 (None elsewhere)."""


def is_better(row: dict[str, float], best_bce: float | None) -> bool:
    """Whether an epoch's metrics `row` beat the best validation BCE so far (None: no epoch
    yet). A row without `val_bce` (no validation set) always counts as better, so the last
    epoch is kept."""
    if "val_bce" not in row or best_bce is None:
        return True
    return row["val_bce"] < best_bce


def cpu_copy(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A copy of gathered weights on the CPU that later optimizer steps cannot change (on a
    CPU run without ZeRO-3 the gathered tensors are the live parameters)."""
    if state is None:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def train_verifier(
    cfg: Config,
    dist: eng.DistInfo,
    init_path: str,
    train: list[SolutionRecord],
    val: list[SolutionRecord],
    pad_id: int,
) -> VerifierRun:
    """Build the verifier engine from the checkpoint at `init_path` (fresh value head) and
    train it; returns it with per-epoch metrics and the weights `pav.keep` selects (the epoch
    with the lowest validation BCE, or the last). Collective: every rank calls it."""
    from rl.engine.value_model import value_model_from_policy

    pav = cfg.pav
    ds_config = value_ds_config(cfg, dist)
    model = value_model_from_policy(init_path, run_dtype(cfg), ds_config)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    engine = make_value_engine(cfg, dist, model, ds_config)
    steps = len(
        plan_micro_batches(list(range(len(train))), dist.world_size, 0, pav.micro_batch_size)
    )
    bar = None
    if dist.is_main and cfg.logging.progress_bar and pav.epochs:
        bar = tqdm(total=steps * pav.epochs, desc="pav verifier", unit="step")
    history: list[dict[str, float]] = []
    kept_epoch, kept_state, best_bce = 0, None, None
    for epoch in range(1, pav.epochs + 1):
        order = torch.randperm(len(train), generator=seeded(cfg.seed + epoch)).tolist()
        row: dict[str, float] = {"epoch": epoch}
        row["train_bce"] = train_epoch(
            engine, train, order, dist, pav.micro_batch_size, pad_id, bar
        )
        if val:
            scores = evaluate(engine, val, dist, pav.micro_batch_size, pad_id)
            row["val_bce"], row["val_acc"] = scores["bce"], scores["acc"]
        history.append(row)
        if dist.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
            tqdm.write(f"pav epoch {epoch}/{pav.epochs}: {shown}")
        # every rank sees the same row (the BCE is all-reduced), so they agree on gathering
        if pav.keep == "best" and val and epoch < pav.epochs and is_better(row, best_bce):
            kept_epoch, best_bce = epoch, row.get("val_bce")
            kept_state = cpu_copy(eng.full_state_dict(engine))
    if bar is not None:
        bar.close()
    if pav.keep == "last" or kept_epoch == 0 or is_better(history[-1], best_bce):
        kept_epoch, kept_state = pav.epochs, eng.full_state_dict(engine)  # collective
    return VerifierRun(engine, history, kept_epoch, kept_state)


def verifier_init(cfg: Config, tokenizer: Any, model_path: str) -> str:
    """The checkpoint the verifier starts from: `pav.init_model`, or the base policy's
    `model_path` when unset. ConfigError naming `pav.init_model` when it cannot be loaded or
    its tokenizer's vocabulary is not the base policy's (the verifier reads the policy's
    tokens at training and at RL time)."""
    init = cfg.pav.init_model
    if init is None:
        return model_path
    from transformers import AutoTokenizer

    try:
        init_tokenizer = AutoTokenizer.from_pretrained(init)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"pav.init_model: cannot load a tokenizer from {init}: {first}") from err
    if init_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"pav.init_model: {init} has another tokenizer than the base policy "
            f"({len(init_tokenizer)} vs {len(tokenizer)} tokens, or the same count mapped "
            "differently); the verifier must read the policy's tokens"
        )
    return init


# ----------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------


def collect_records(
    cfg: Config,
    dist: eng.DistInfo,
    policy: Any,
    tokenizer: Any,
    model_path: str,
    rows: list[PromptRow],
    init_path: str,
) -> tuple[
    RolloutBackend | None, list[SolutionRecord], list[SolutionRecord], int, dict[str, Any] | None
]:
    """The data phase, plain or active: (rollout backend to close last, train records, val
    records, prefixes rolled out by rank 0, active-labelling counts or None). `init_path`:
    the checkpoint the active-labelling selector starts from (`verifier_init`)."""
    out = Path(cfg.pav.output_dir)
    selected = {r.index for r in rows}
    if not is_active(cfg):
        rollout, n_prefixes = make_data(cfg, dist, policy, tokenizer, model_path, rows)
        records = [r for r in read_records(out.glob(DATA_GLOB)) if r.prompt_index in selected]
        train, val = split_by_prompt(records, cfg.pav.val_fraction, cfg.seed)
        return rollout, train, val, n_prefixes, None
    maybe_rollout, val_prompts, bought, val_prefixes = make_active_data(
        cfg, dist, policy, tokenizer, model_path, rows, init_path
    )
    records = [r for r in read_records(out.glob(DATA_GLOB)) if r.prompt_index in selected]
    train, val = split_records(records, val_prompts)
    active = asdict(bought) | {
        "mc_rollouts_val": sum(cfg.pav.n_mc * max(0, len(r.labels) - 1) for r in val)
    }
    return maybe_rollout, train, val, val_prefixes, active


def run(cfg: Config, dist: eng.DistInfo) -> dict[str, Any]:
    """Data, then verifier, then save; returns the metrics written to `METRICS_FILE`."""
    from rl.engine.models import load_policy
    from rl.engine.value_model import save_value_model

    check_pav_config(cfg)
    out = Path(cfg.pav.output_dir)
    check_shared_dir(out, dist, "pav.output_dir")  # every rank writes data rank 0 reads
    seed_everything(cfg.seed)
    policy, tokenizer, model_path = load_policy(cfg, dist)
    init_path = verifier_init(cfg, tokenizer, model_path)  # fail before the rollouts
    rows = select_prompts(cfg, tokenizer)
    start = time.perf_counter()
    rollout, train, val, n_prefixes, active = collect_records(
        cfg, dist, policy, tokenizer, model_path, rows, init_path
    )
    data_s = time.perf_counter() - start
    del policy
    if rollout is not None:  # done generating: a sleep-mode vLLM engine frees its memory
        rollout.prepare_for_update()
    if not train:
        raise DataError(f"pav: no labelled training solutions in {out}")
    start = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    verifier = train_verifier(cfg, dist, init_path, train, val, pad_id)
    train_s = time.perf_counter() - start
    metrics: dict[str, Any] = {}
    if dist.is_main:
        save_value_model(verifier.engine.module, tokenizer, out, state_dict=verifier.kept_state)
        metrics = {
            "prompts": len(rows),
            "solutions": {"train": len(train), "val": len(val)},
            "labels": {
                "train": sum(len(r.labels) for r in train),
                "val": sum(len(r.labels) for r in val),
            },
            "outcome_mean": sum(r.labels[-1] for r in train + val) / max(1, len(train + val)),
            "epochs": verifier.history,
            "kept_epoch": verifier.kept_epoch,
            "baselines": constant_baselines(train, val),
            "time": {"data_s": data_s, "train_s": train_s, "prefixes_rank0": n_prefixes},
            "base_model": model_path,
            "verifier_init": init_path,
            "pav": to_dict(cfg)["pav"],
        }
        if active is not None:
            metrics["active"] = active
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        print(summary_line(metrics, out), flush=True)
    eng.barrier()
    if rollout is not None:
        rollout.close()
    return metrics


def kept_row(metrics: dict[str, Any]) -> dict[str, float]:
    """The saved epoch's row of `train_pav_metrics.json` (`{}` when no epoch ran); files
    written before `kept_epoch` existed saved the last epoch."""
    epochs = metrics.get("epochs") or []
    kept = metrics.get("kept_epoch", len(epochs))
    return epochs[kept - 1] if kept else {}


def summary_line(metrics: dict[str, Any], out: Path) -> str:
    """One line: data size and time, training time, the saved epoch's validation scores,
    where saved."""
    last = kept_row(metrics)
    base = metrics["baselines"]
    scores = (
        f"val BCE {last['val_bce']:.4f} (constant {base['val_bce_constant']:.4f}, floor "
        f"{base['val_bce_floor']:.4f}), val acc {last['val_acc']:.3f} "
        f"(constant {base['val_acc_constant']:.3f})"
        if "val_bce" in last
        else "no validation set"
    )
    t = metrics["time"]
    sols = metrics["solutions"]
    active = metrics.get("active")
    bought = (
        f"; active labelling: {active['labelled']}/{active['candidates']} training solutions "
        f"labelled, {active['mc_rollouts']}/{active['mc_rollouts_all_candidates']} rollouts"
        if active
        else ""
    )
    return (
        f"pav: {metrics['prompts']} prompts, {sols['train'] + sols['val']} solutions, "
        f"{metrics['labels']['train'] + metrics['labels']['val']} labels "
        f"(data {t['data_s']:.0f} s); verifier {len(metrics['epochs'])} epochs "
        f"({t['train_s']:.0f} s), kept epoch {metrics['kept_epoch']}: {scores}{bought} -> {out}"
    )
