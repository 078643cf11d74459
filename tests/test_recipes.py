"""configs/recipes: every recipe loads and validates, and `launch/train_rl.py --dry-run`
prints its plan quickly without loading a model; a bad key fails in one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import load_config
from rl.engine.memory_plan import KNOWN_ARCHITECTURES

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs" / "recipes").rglob("*.yaml"))
IDS = [str(r.relative_to(REPO / "configs" / "recipes")) for r in RECIPES]


def test_recipes_cover_every_algorithm_model_and_cluster():
    names = {(r.parent.name, r.stem) for r in RECIPES}
    for model in ("qwen2.5-math-1.5b", "qwen2.5-7b"):
        for algo in ("grpo", "prime", "pav", "ppo"):
            for cluster in ("1x8", "2x8"):
                assert (model, f"{algo}_{cluster}") in names


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_loads(recipe: Path):
    cfg = load_config(recipe)
    assert cfg.model.path in KNOWN_ARCHITECTURES
    assert (REPO / cfg.deepspeed.config).is_file()
    nodes = 1 if recipe.stem.endswith("1x8") else 2
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (nodes, 8)
    assert cfg.rollout.prompts_per_step % (nodes * 8) == 0


def dry_run(config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "launch/train_rl.py", "--config", str(config), "--dry-run", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_dry_run_prints_the_plan(recipe: Path):
    start = time.monotonic()
    done = dry_run(recipe)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    ranks = 8 if recipe.stem.endswith("1x8") else 16
    out = done.stdout
    assert f"world: {ranks} ranks" in out
    assert "recipe cluster.nodes x cluster.gpus_per_node" in out
    for line in ("gradient accumulation", "policy weights", "policy optimizer", "activations"):
        assert line in out
    assert "peak, update phase" in out and "peak, rollout phase" in out
    assert "fits: headroom" in out
    assert "torch.distributed" not in done.stderr
    assert elapsed < 60, f"dry run took {elapsed:.0f} s"


def test_dry_run_world_size_from_launcher_env():
    recipe = REPO / "configs/recipes/qwen2.5-math-1.5b/grpo_2x8.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="32", LOCAL_WORLD_SIZE="8")
    done = subprocess.run(
        [sys.executable, "launch/train_rl.py", "--config", str(recipe), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "world: 32 ranks on 4 node(s) (from launcher env WORLD_SIZE)" in done.stdout


def test_bad_key_fails_in_one_line_naming_it(tmp_path: Path):
    recipe = REPO / "configs/recipes/qwen2.5-math-1.5b/grpo_1x8.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("  max_steps: 500", "  max_step: 500"))
    done = dry_run(bad)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "trainer.max_step" in lines[0] and lines[0].startswith("error: ")
    assert done.stdout == ""


def test_batch_that_does_not_divide_names_the_key():
    recipe = REPO / "configs/recipes/qwen2.5-math-1.5b/grpo_1x8.yaml"
    done = dry_run(recipe, "rollout.prompts_per_step=100")
    assert done.returncode == 2
    assert "rollout.prompts_per_step=100" in done.stderr.strip().splitlines()[0]


@pytest.mark.parametrize("recipe", ["qwen2.5-math-1.5b/grpo_1x8.yaml", "qwen2.5-7b/prime_1x8.yaml"])
def test_docs_show_the_current_dry_run_output(recipe: str):
    """docs/recipes.md quotes these two plans; they must be what the dry run prints now."""
    done = dry_run(REPO / "configs/recipes" / recipe)
    assert done.returncode == 0, done.stderr
    docs = (REPO / "docs/recipes.md").read_text()
    relative = f"configs/recipes/{recipe}"
    printed = done.stdout.replace(str(REPO / "configs/recipes" / recipe), relative)
    assert f"```\n{printed.rstrip()}\n```" in docs


@pytest.mark.parametrize("one_node", [r for r in RECIPES if r.stem.endswith("_1x8")], ids=str)
def test_two_node_recipe_differs_only_in_scale(one_node: Path):
    """A 2x8 recipe is its 1x8 twin with twice the nodes and prompts per step."""
    from rl.config import to_dict

    small = to_dict(load_config(one_node))
    large = to_dict(load_config(one_node.with_name(one_node.stem[:-4] + "_2x8.yaml")))
    assert large["cluster"]["nodes"] == 2 * small["cluster"]["nodes"]
    assert large["rollout"]["prompts_per_step"] == 2 * small["rollout"]["prompts_per_step"]
    assert large["output_dir"] == small["output_dir"].replace("_1x8", "_2x8")
    for cfg in (small, large):
        del cfg["cluster"]["nodes"], cfg["rollout"]["prompts_per_step"], cfg["output_dir"]
    assert large == small


def test_dry_run_loads_no_model_library():
    """The plan of a known model imports neither DeepSpeed, transformers nor vLLM."""
    code = (
        "import sys\n"
        "from rl.cli import print_plan\n"
        "code = print_plan(['--config', 'configs/recipes/qwen2.5-7b/ppo_1x8.yaml'], None)\n"
        "print('LOADED', code, sorted(m for m in ('deepspeed', 'transformers', 'vllm') "
        "if m in sys.modules))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LOADED 0 []"
