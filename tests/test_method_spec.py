"""The method as typed objects: bounds on the config's fields (one-line errors before any
model work), `algo.credit` as one spec per scheme that declares what it needs, the old
`credit_kwargs` spelling, and the layout rules (no credit-name comparisons in the trainer, no
`sys.path` edits in benchmarks or tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch

from rl.algos.credit_specs import (
    CREDIT_SPECS,
    GAECredit,
    MinFormCredit,
    OutcomeCredit,
    PAVCredit,
    PrimeCredit,
    SumCredit,
    spec_for,
)
from rl.algos.losses import POLICY_LOSSES, policy_loss
from rl.config import load_config
from rl.core.errors import ConfigError
from rl.core.schema import Bound, convert
from rl.rollout.backend_specs import TransformersBackend, VLLMBackend
from rl.trainer.loop import build_callbacks
from tests.callbacks import Probe

REPO = Path(__file__).resolve().parent.parent

# The values a new user tried (issue 39): each got a raw exception, or nothing, before.
BAD_VALUES = [
    ("algo.clip_low=-1", "algo.clip_low: must be in [0, 1), got -1.0"),
    ("rollout.top_p=1.5", "rollout.top_p: must be in (0, 1], got 1.5"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size: must be at least 1, got 0"),
    ("optim.lr=nan", "optim.lr: must be a finite number, got 'nan'"),
    (
        "rollout.temperature=0",
        "rollout.temperature: must be positive (training samples; evaluation is greedy), got 0.0",
    ),
    ("algo.kl_coef=-0.5", "algo.kl_coef: must be at least 0, got -0.5"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES)
def test_bounds_are_checked_when_the_config_loads(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(REPO / "configs" / "quickstart.yaml", [override])
    assert str(caught.value) == message


@pytest.mark.parametrize(("override", "message"), BAD_VALUES)
def test_the_launcher_prints_one_line_and_exits_2(override: str, message: str) -> None:
    cmd = [sys.executable, "launch/train_rl.py", "--config", "configs/quickstart.yaml"]
    proc = subprocess.run(
        [*cmd, override, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize(
    ("bound", "value", "message"),
    [
        (Bound(ge=1), 0, "must be at least 1"),
        (Bound(gt=0), 0.0, "must be positive"),
        (Bound(gt=0.5), 0.5, "must be greater than 0.5"),
        (Bound(le=3), 4, "must be at most 3"),
        (Bound(lt=1), 1.0, "must be less than 1"),
        (Bound(ge=0, lt=1), 1.0, "must be in [0, 1)"),
        (Bound(gt=0, le=1), 0.0, "must be in (0, 1]"),
        (Bound(ge=2, why="an ensemble"), 1, "must be at least 2 (an ensemble)"),
    ],
)
def test_bound_messages(bound: Bound, value: float, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        convert(Annotated[float, bound], value, "x.y")
    assert str(caught.value) == f"x.y: {message}, got {float(value)!r}"


@pytest.mark.parametrize(
    ("bound", "value"),
    [(Bound(ge=1), 1), (Bound(gt=0, le=1), 1.0), (Bound(ge=0, lt=1), 0.0), (Bound(le=3), -5)],
)
def test_values_on_the_edge_pass(bound: Bound, value: float) -> None:
    assert convert(Annotated[float, bound], value, "x") == value


def test_an_optional_bounded_field_accepts_null() -> None:
    cfg = load_config(None, ["trainer.forward_micro_batch_size=null", "reward.timeout_s=null"])
    assert cfg.trainer.forward_micro_batch_size is None and cfg.reward.timeout_s is None
    with pytest.raises(ConfigError, match="forward_micro_batch_size: must be at least 1, got 0"):
        load_config(None, ["trainer.forward_micro_batch_size=0"])


# ---------------------------------------------------------------- the credit spec


@pytest.mark.parametrize(
    ("overrides", "spec"),
    [
        ([], spec_for("auto")),
        (["algo.credit=pav"], PAVCredit()),
        (["algo.credit={name: pav, alpha: 2.0}"], PAVCredit(alpha=2.0)),
        (["algo.credit=pav", "algo.credit.alpha=3"], PAVCredit(alpha=3.0)),
        (["algo.credit={name: min_form, temperature: 0.5}"], MinFormCredit(temperature=0.5)),
        (["algo.credit=gae"], GAECredit()),
    ],
)
def test_credit_is_one_typed_spec(overrides: list[str], spec: object) -> None:
    assert load_config(None, overrides).algo.credit == spec


def test_the_old_spelling_loads_with_a_warning_naming_the_new_one() -> None:
    with pytest.warns(FutureWarning, match=r"write algo.credit: \{name: pav, alpha: 2.0\}"):
        old = load_config(None, ["algo.credit=pav", "algo.credit_kwargs={alpha: 2.0}"])
    assert old.algo.credit == PAVCredit(alpha=2.0)
    with pytest.warns(FutureWarning):  # an override in the old spelling wins over the file
        cfg = load_config(REPO / "configs" / "quickstart_pav.yaml", ["algo.credit_kwargs.alpha=4"])
    assert cfg.algo.credit == PAVCredit(alpha=4.0)
    with pytest.raises(
        ConfigError, match=r"name the scheme they are for: algo.credit: \{name: pav"
    ):
        load_config(None, ["algo.credit_kwargs={alpha: 1.0}"])  # auto: which scheme's alpha?


def test_every_scheme_declares_what_it_needs() -> None:
    needs = {
        name: (cls.needs_critic, cls.needs_heads, cls.outcome_baseline, cls.takes_kl_in_rewards)
        for name, cls in CREDIT_SPECS.items()
    }
    assert needs == {
        "auto": (False, False, "estimator", False),
        "outcome": (False, False, "estimator", False),
        "gae": (True, False, "critic", True),
        "pav": (False, True, "estimator", False),
        "sum": (False, True, "rloo", False),
        "prime": (False, True, "rloo", False),
        "min_form": (False, True, "rloo", False),
    }
    assert not GAECredit.separable and OutcomeCredit.separable and SumCredit.separable
    assert PrimeCredit(process_coef=2.0).options() == {
        "process_coef": 2.0,
        "outcome_coef": 1.0,
        "baseline": "per_step",
    }


def test_the_trainer_compares_no_credit_names() -> None:
    names = "|".join(CREDIT_SPECS)
    compare = re.compile(rf"""(credit|scheme|spec)\S*\s*(==|!=|\bin)\s*\(?["']({names})["']""")
    for path in sorted((REPO / "rl" / "trainer").glob("*.py")):
        text = path.read_text()
        assert "credit_kwargs" not in text, path.name
        assert "credit_name" not in text, path.name
        for line in text.splitlines():
            code = line.split("#", 1)[0]
            assert not compare.search(code), f"{path.name}: {line.strip()}"


def test_benchmarks_and_tests_do_not_edit_sys_path() -> None:
    edits = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+=|=)")
    for folder in ("benchmarks", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "runs" in path.relative_to(REPO).parts:
                continue
            assert not edits.search(path.read_text()), path.relative_to(REPO)


# ---------------------------------------------------------------- policy losses, callbacks


def _plain_ratio_loss(
    logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-rho * A without clipping (a test-only surrogate)."""
    return -torch.exp(logp - old) * adv, torch.zeros_like(adv)


POLICY_LOSSES.register("test_plain_ratio")(_plain_ratio_loss)


def test_policy_losses_are_registered_and_chosen_by_name() -> None:
    assert load_config(None).algo.policy_loss == "ppo_clip"
    with pytest.raises(ConfigError, match="algo.policy_loss: unknown policy loss 'ppo'; valid:"):
        load_config(None, ["algo.policy_loss=ppo"])
    logp = torch.log(torch.tensor([[2.0, 0.5]]))  # rho = 2 and 0.5 against old log-prob 0
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    common = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, mode="token_mean")
    plain, _ = policy_loss(logp, old, None, adv, mask, global_tokens=2, global_seqs=1,
                           surrogate="test_plain_ratio", **common)  # fmt: skip
    clipped, _ = policy_loss(logp, old, None, adv, mask, global_tokens=2, global_seqs=1, **common)
    assert float(plain) == pytest.approx(-(2.0 + 0.5) / 2)  # -mean(rho A)
    assert float(clipped) == pytest.approx(-(1.28 + 0.5) / 2)  # rho 2 clipped at 1 + 0.28


def test_callbacks_load_by_import_path() -> None:
    cfg = load_config(None, ["logging.callbacks=['tests.callbacks:Probe']"])
    (probe,) = build_callbacks(cfg, tokenizer=None, credit=spec_for("outcome"))
    assert isinstance(probe, Probe)
    with_diag = load_config(
        None, ["logging.credit_diagnostics=true", *["logging.callbacks=['tests.callbacks:Probe']"]]
    )
    kinds = [type(c).__name__ for c in build_callbacks(with_diag, None, spec_for("outcome"))]
    assert kinds == ["CreditDiagnostics", "Probe"]
    for spec, message in [
        (
            "tests.callbacks:NotACallback",
            "logging.callbacks.0: tests.callbacks:NotACallback is not",
        ),
        ("tests.callbacks:Nope", "logging.callbacks.0: callback 'tests.callbacks:Nope': module"),
        ("no_such_module:X", "no module named 'no_such_module'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_callbacks(
                load_config(None, [f"logging.callbacks=['{spec}']"]), None, spec_for("sum")
            )


# ---------------------------------------------------------------- the rollout backend spec


def test_the_backend_is_one_typed_spec_that_declares_what_the_sampler_gives() -> None:
    assert load_config(None).rollout.backend == TransformersBackend()
    vllm = load_config(None, ["rollout.backend={name: vllm, tis_cap: 2.0, kv_cache_gib: 2}"])
    assert vllm.rollout.backend == VLLMBackend(tis_cap=2.0, kv_cache_gib=2)
    assert VLLMBackend.reports_logprobs and not TransformersBackend.reports_logprobs
    assert VLLMBackend(tis_cap=2.0).importance_cap() == 2.0
    assert TransformersBackend().importance_cap() is None
    assert VLLMBackend(old_logprobs="engine").engine_old_logprobs()
    assert not TransformersBackend().engine_old_logprobs()
    # naming the chosen backend again keeps its options; another one starts from its defaults
    again = ["rollout.backend={name: vllm, kv_cache_gib: 2}", "rollout.backend=vllm"]
    assert load_config(None, again).rollout.backend == VLLMBackend(kv_cache_gib=2)
    other = ["rollout.backend={name: vllm, kv_cache_gib: 2}", "rollout.backend=transformers"]
    assert load_config(None, other).rollout.backend == TransformersBackend()
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm has no option 'cache'"):
        load_config(None, ["rollout.backend=vllm", "rollout.backend.cache=static"])


def test_the_flat_backend_keys_of_earlier_versions_still_load(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match=r"write rollout.backend: \{name: vllm, kv_cache_gib"):
        cfg = load_config(None, ["rollout.vllm_kv_cache_gib=4", "rollout.backend=vllm"])
    assert cfg.rollout.backend == VLLMBackend(kv_cache_gib=4)
    old_file = tmp_path / "old.yaml"  # the file's vLLM keys, its backend chosen on the command line
    old_file.write_text("rollout:\n  vllm_sleep_mode: true\n  transformers_cache: static\n")
    with pytest.warns(FutureWarning):
        assert load_config(old_file, ["rollout.backend=vllm"]).rollout.backend == VLLMBackend(
            sleep_mode=True
        )
        assert load_config(old_file).rollout.backend == TransformersBackend(cache="static")
    with pytest.raises(ConfigError, match="rollout.tis_cap=2.0 needs rollout.backend=vllm"):
        load_config(None, ["rollout.tis_cap=2.0"])  # it changes the update: refused, as before
