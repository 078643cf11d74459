"""Every quickstart learns: each config runs as a user runs it (2 ranks, `deepspeed`, the
shipped start model), and its held-out accuracy must rise by at least LEARN_MARGIN.

The runs are the quickstarts' own settings, shortened where they saturate early (steps) and
with fewer held-out prompts, so the suite stays fast; the margin is well inside what each
reaches (benchmarks/README.md: +25 to +50 points). A failure names the start model's weights
digest and whether it is the recorded one, because a quickstart that stops learning on
another build of its start model is a different fault from one that stops learning on the
recorded weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher import TRAIN_PAV, check_ok, launch, read_metrics

pytestmark = pytest.mark.e2e

LEARN_MARGIN = 0.10
"""Held-out accuracy must rise by this much (absolute) from step 0 to the last step."""

SHORT = ["data.eval_size=128", "trainer.eval_every=0", "logging.progress_bar=false"]
"""Overrides every learning run shares: fewer held-out prompts, evaluate at start and end."""


def assert_learns(config: str, out: Path, stdout: str) -> None:
    """Held-out accuracy rose by LEARN_MARGIN; the failure names the start model."""
    rows = read_metrics(out)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    start, end = evals[0][1], evals[-1][1]
    model = next((ln for ln in stdout.splitlines() if "start model " in ln), "start model ?")
    print(f"{config}: held-out accuracy {evals}; {model.strip()}")  # shown by pytest -rA
    assert end - start >= LEARN_MARGIN, (
        f"{config} did not learn: held-out accuracy {start:.3f} -> {end:.3f} over steps "
        f"{[s for s, _ in evals]} (needs +{LEARN_MARGIN}); {model.strip()}"
    )


@pytest.mark.parametrize(
    "config, extra",
    [
        ("configs/quickstart.yaml", ["trainer.max_steps=20"]),
        ("configs/quickstart_chat.yaml", ["trainer.max_steps=20"]),
        ("configs/quickstart_implicit_prm.yaml", ["trainer.max_steps=20"]),
        ("configs/quickstart_ppo.yaml", ["trainer.max_steps=10"]),
    ],
)
def test_quickstart_learns(config: str, extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = launch([f"output_dir={out}", *SHORT, *extra], config=config, timeout=900)
    check_ok(proc)
    assert_learns(config, out, proc.stdout)


def test_pav_quickstart_learns(tmp_path: Path) -> None:
    """configs/quickstart_pav.yaml's two commands: the verifier (fewer prompts), then RL."""
    config = "configs/quickstart_pav.yaml"
    verifier = tmp_path / "verifier"
    pav = [
        f"pav.output_dir={verifier}",
        f"reward.heads=[{{head: pav, kwargs: {{path: {verifier}, prover_k: 4}}}}]",
    ]
    proc = launch([*pav, "pav.prompts=256"], config=config, script=TRAIN_PAV, timeout=900)
    check_ok(proc)
    out = tmp_path / "run"
    proc = launch(
        [f"output_dir={out}", *pav, *SHORT, "trainer.max_steps=20"], config=config, timeout=900
    )
    check_ok(proc)
    assert_learns(config, out, proc.stdout)
