"""One training step of every one-node recipe (configs/recipes/*/*_1x8.yaml) under
`deepspeed --num_gpus 2`, on a randomly initialised model of the recipe's architecture shrunk
to 2 layers (tests/shrunk_models.py) and a few local rows in the recipe's data columns. The
recipe's own settings stay: algorithm, credit, heads, ZeRO stage, dtype, gradient
checkpointing, optimizer. What a CPU cannot run is swapped, and only that: the vLLM backend
for transformers generation, 8 GPUs for 2 ranks, the batch sizes, the hub data for local
rows, and a second reward function that varies on random text (so the step has a gradient).
The PAV recipes train their verifier first with `launch/train_pav.py`, as their comments say.
The two-node recipes differ from these only in scale (tests/test_recipes.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rl.config import load_config
from tests.launcher import REPO, TRAIN_PAV, launch, read_metrics
from tests.shrunk_models import build_shrunk_model, write_gsm8k_style_data, write_math_style_data

pytestmark = pytest.mark.e2e

ONE_NODE = sorted((REPO / "configs" / "recipes").rglob("*_1x8.yaml"))
IDS = [str(r.relative_to(REPO / "configs" / "recipes")) for r in ONE_NODE]
VARYING_REWARD = "{fn: 'tests.reward_fns:digit_fraction', weight: 0.5}"
HEAD_METRIC = {"grpo": None, "prime": "head/implicit_prm/", "pav": "head/pav/", "ppo": "critic/"}
"""A metric prefix each recipe's extra model must log (the implicit PRM, the PAV verifier's
head, the critic)."""


@pytest.fixture(scope="module")
def shrunk_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One shrunk model per architecture the recipes name."""
    root = tmp_path_factory.mktemp("shrunk")
    names = sorted({load_config(r).model.path for r in ONE_NODE})
    return {name: build_shrunk_model(name, root / name.replace("/", "--")) for name in names}


def cpu_overrides(recipe: Path, model: Path, data: Path, out: Path) -> list[str]:
    """What a 2-rank CPU step changes in `recipe` (see the module docstring)."""
    cfg = load_config(recipe)
    functions = ", ".join(f"{{fn: {f.fn}, weight: {f.weight}}}" for f in cfg.reward.functions)
    return [
        f"model.path={model}",
        f"data.train={data}",
        f"data.eval={data}",
        "data.eval_size=4",
        "cluster.gpus_per_node=2",
        "rollout.backend=transformers",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=16",
        "trainer.max_steps=1",
        "trainer.micro_batch_size=2",
        "trainer.forward_micro_batch_size=2",
        "trainer.eval_every=0",
        f"reward.functions=[{functions}, {VARYING_REWARD}]",
        f"output_dir={out}",
    ]


def local_rows(recipe: Path, where: Path) -> Path:
    """Rows in the recipe's columns: MATH's (`problem`, `solution`) or GSM8K's."""
    column = load_config(recipe).data.prompt_column
    if column == "problem":
        return write_math_style_data(where / "math.jsonl")
    assert column == "question", column
    return write_gsm8k_style_data(where / "gsm8k.jsonl")


def train_verifier(recipe: Path, overrides: list[str], out: Path) -> list[str]:
    """Run the recipe's verifier training (few prompts, 2 rollouts each); returns the
    override that points its `pav` head at the result."""
    small = ["pav.prompts=4", "pav.samples_per_prompt=2", "pav.n_mc=2", "pav.epochs=1"]
    small += ["pav.micro_batch_size=2", f"pav.output_dir={out}"]
    proc = launch([*overrides, *small], config=str(recipe), script=TRAIN_PAV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (head,) = load_config(recipe).reward.heads
    kwargs = ", ".join(f"{k}: {v}" for k, v in {**head.kwargs, "path": out}.items())
    return [f"reward.heads=[{{head: {head.head}, kwargs: {{{kwargs}}}}}]"]


@pytest.mark.parametrize("recipe", ONE_NODE, ids=IDS)
def test_recipe_runs_one_step(recipe: Path, shrunk_models: dict[str, Path], tmp_path: Path):
    cfg = load_config(recipe)
    out = tmp_path / "run"
    overrides = cpu_overrides(
        recipe, shrunk_models[cfg.model.path], local_rows(recipe, tmp_path), out
    )
    if any(h.head == "pav" for h in cfg.reward.heads):
        overrides += train_verifier(recipe, overrides, tmp_path / "verifier")
    proc = launch(overrides, config=str(recipe), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [r for r in read_metrics(out) if r.get("step") == 1 and "train/lr" in r]
    if row.get("critic/policy_frozen"):  # PPO's critic warm-up: only the critic learns
        assert row["critic/grad_norm"] > 0 and math.isfinite(row["critic/value_loss"]), row
    else:
        assert row["train/grad_norm"] > 0 and math.isfinite(row["train/loss"]), row
    prefix = HEAD_METRIC[recipe.stem.split("_")[0]]
    if prefix is not None:
        assert any(k.startswith(prefix) for k in row), sorted(row)
    assert (out / "final" / "config.json").is_file()
