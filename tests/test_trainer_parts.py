"""The trainer's parts as plain functions: off-policy corrections, credit schemes, typed
options of credit schemes and reward heads, the run-directory rule and the length check."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rewards.build import resolve_head
from rl.algos.credit import CREDIT_ASSIGNERS, CreditInputs, tokens_to_steps
from rl.algos.credit_specs import spec_for
from rl.algos.offpolicy import logprob_mismatch_sums, tis_weights
from rl.config import load_config
from rl.core.errors import ConfigError
from rl.core.types import Credit, HeadBatch, LogProbs, RolloutBatch, Scored
from rl.engine.deepspeed_engine import DistInfo
from rl.trainer.credit import OutcomeCredit, StepCredit, build_credit, resolve_credit
from rl.trainer.loop import Trainer, check_lengths
from rl.trainer.run_dir import earlier_run_files, prepare_output_dir

# ---------------------------------------------------------------- off-policy corrections


def test_tis_weights_by_hand() -> None:
    trainer = torch.tensor([[0.0, -1.0, -2.0]])
    engine = torch.tensor([[-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # exp(1) = 2.718 capped at 2; exp(0) = 1; masked token -> 0
    got = tis_weights(trainer, engine, mask, cap=2.0)
    torch.testing.assert_close(got, torch.tensor([[2.0, 1.0, 0.0]]))


def test_logprob_mismatch_sums_by_hand() -> None:
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # |diffs| on masked tokens: 0.5, 0, 2, 0.5 -> 3.0 over 4 tokens
    got = logprob_mismatch_sums(engine, trainer, mask)
    assert got.dtype == torch.float64
    assert got.tolist() == [3.0, 4.0]


def _vllm_trainer(*overrides: str) -> Trainer:
    """A Trainer with only its config set: `correct_off_policy` reads nothing else."""
    trainer = object.__new__(Trainer)
    trainer.cfg = load_config(None, ["rollout.backend=vllm", *overrides])
    return trainer


def _offpolicy_inputs() -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch, the trainer's log-probs, the engine's (the trainer's +-0.5) and advantages."""
    batch = _batch()
    trainer_logp = -torch.tensor([[0.3, 1.2, 2.0], [0.7, 0.1, 0.9], [1.5, 0.4, 0.2], [0.6, 2, 3]])
    shift = torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, -0.5], [0.5, 0.5, -0.5], [-0.5, 0.5, 0.5]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0], [0.5, 0.5, 0.5], [2.0, 0, 0]])
    return batch, trainer_logp, trainer_logp + shift, advantages * batch.response_mask


def test_tis_weights_the_advantages_the_update_uses() -> None:
    """`Trainer.correct_off_policy` (what `train_step` applies to the credit before the
    update): each advantage times min(pi_trainer / pi_engine, cap), token by token."""
    batch, trainer_logp, engine_logp, advantages = _offpolicy_inputs()
    trainer = _vllm_trainer("rollout.backend.tis_cap=1.5")
    credit = trainer.correct_off_policy(
        batch, LogProbs(trainer_logp, None, engine_logp), Credit(advantages.clone())
    )
    # engine +0.5 above the trainer: weight exp(-0.5) = 0.607; engine 0.5 below: exp(0.5) =
    # 1.649, capped at 1.5
    weights = torch.where(engine_logp > trainer_logp, math.exp(-0.5), 1.5)
    torch.testing.assert_close(credit.advantages, advantages * weights * batch.response_mask)
    assert credit.stats["rollout/logprob_mismatch"] == pytest.approx(0.5)


def test_without_tis_cap_the_advantages_are_not_reweighted() -> None:
    batch, trainer_logp, engine_logp, advantages = _offpolicy_inputs()
    for overrides in ([], ["rollout.backend.old_logprobs=engine"]):
        credit = _vllm_trainer(*overrides).correct_off_policy(
            batch, LogProbs(trainer_logp, None, engine_logp), Credit(advantages.clone())
        )
        torch.testing.assert_close(credit.advantages, advantages)
        assert credit.stats["rollout/logprob_mismatch"] == pytest.approx(0.5)


class _FakeEngine(torch.nn.Module):
    """A Hugging Face model behind the DeepSpeed engine calls PolicyLearner makes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.module.zero_grad()


@pytest.mark.parametrize("engine_old", [True, False])
def test_old_logprobs_engine_puts_the_engines_logprobs_in_the_ratio(engine_old: bool) -> None:
    """`rollout.old_logprobs=engine`: the update's ratio is pi_theta / pi_engine (the sampler's
    log-probs, here the trainer's +-0.5), else pi_theta / pi_old (the trainer's own)."""
    from rl.engine.forward import response_logprobs
    from rl.trainer.learners import GlobalCounts, PolicyLearner
    from tests.models import tiny_llama

    batch = _batch()
    batch.input_ids = torch.randint(
        0, 17, batch.input_ids.shape, generator=torch.Generator().manual_seed(0)
    )
    engine = _FakeEngine(tiny_llama(vocab_size=17))
    with torch.no_grad():
        logp = response_logprobs(engine, batch)  # [4, 3] the update's own log-probs
    shift = torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, -0.5], [0.5, 0.5, -0.5], [-0.5, 0.5, 0.5]])
    old, behaviour = logp + 0.1, logp + shift
    learner = PolicyLearner(engine, load_config(None, []).algo, 1.0, engine_old=engine_old)
    tokens = float(batch.response_mask.sum())
    stats = learner.micro_step(
        batch,
        torch.arange(4),
        LogProbs(old, None, behaviour),
        Credit(torch.ones(4, 3) * batch.response_mask),
        GlobalCounts(tokens, 4.0, 1.0),
    )
    denominator = behaviour if engine_old else old
    want = ((logp - denominator).exp() * batch.response_mask).sum() / tokens
    assert float(stats["ratio"]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_policy_trains_in_training_mode_with_gradient_checkpointing(checkpointing: bool) -> None:
    """The policy's forward and backward run in training mode, so `model.gradient_
    checkpointing` takes effect (each decoder layer runs again in the backward pass), and the
    policy is back in eval mode after the micro-step (generation keeps its KV cache)."""
    from rl.engine.models import enable_gradient_checkpointing
    from rl.trainer.learners import GlobalCounts, PolicyLearner
    from tests.models import tiny_llama

    batch = _batch()
    model = tiny_llama(vocab_size=17).eval()
    if checkpointing:
        enable_gradient_checkpointing(model)
    layer = model.model.layers[0]
    calls: list[bool] = []
    # a pre-hook: the recomputation stops early, before the layer's forward returns
    layer.register_forward_pre_hook(lambda mod, args: calls.append(mod.training))
    engine = _FakeEngine(model).eval()
    learner = PolicyLearner(engine, load_config(None, []).algo, 1.0, engine_old=False)
    tokens = float(batch.response_mask.sum())
    learner.micro_step(
        batch,
        torch.arange(4),
        LogProbs(None, None, None),
        Credit(torch.ones(4, 3) * batch.response_mask),
        GlobalCounts(tokens, 4.0, 1.0),
    )
    assert calls and all(calls)  # every forward of the layer in training mode
    assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
    assert not model.training and not layer.training


# ---------------------------------------------------------------- credit schemes


def _batch() -> RolloutBatch:
    # 2 prompts x K=2; responses of 3, 2, 3, 1 tokens
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    return RolloutBatch(
        input_ids=torch.zeros(4, 5, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(4, 2), mask], dim=1).long(),
        response_mask=mask,
        prompt_length=2,
        prompts=["a", "a", "b", "b"],
        completions=["x", "y", "z", "w"],
        group_size=2,
    )


def test_outcome_credit_is_the_estimator_on_every_token() -> None:
    batch = _batch()
    scored = Scored(torch.tensor([1.0, 0.0, 1.0, 1.0]), {})
    algo = load_config(None, ["algo.advantage=rloo"]).algo
    credit = OutcomeCredit(algo.credit, algo).assign(batch, scored, LogProbs(torch.zeros(4, 3)))
    # RLOO with K=2: r_i - r_j -> [1, -1, 0, 0]
    want = torch.tensor([[1.0, 1, 1], [-1, -1, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(credit.advantages, want)
    assert credit.returns is None and credit.values is None


def test_step_credit_reads_steps_and_options_from_config() -> None:
    batch = _batch()
    step_end = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    step_id = torch.tensor([[0, 1, 1], [0, 0, -1], [0, 0, 0], [0, -1, -1]])
    process = step_end * torch.tensor([[0.5, 0, -0.5], [0, 0.2, 0], [0, 0, 0.1], [-1, 0, 0]])
    scored = Scored(torch.tensor([1.0, 0.0, 1.0, 1.0]), {}, process, step_id, step_end)
    algo = load_config(None, ["algo.credit={name: pav, alpha: 2.0}"]).algo
    got = (
        StepCredit(algo.credit, algo).assign(batch, scored, LogProbs(torch.zeros(4, 3))).advantages
    )
    scores, step_mask = tokens_to_steps(process, step_end)
    inputs = CreditInputs(
        batch.response_mask, step_id, step_end, scored.outcome, 2, scores, step_mask,
        outcome_estimator="grpo",
    )  # fmt: skip
    torch.testing.assert_close(got, CREDIT_ASSIGNERS.get("pav")(inputs, alpha=2.0))


def test_every_scheme_is_registered_and_resolved() -> None:
    cfg = load_config(None)
    assert resolve_credit(cfg, []) == spec_for("outcome")
    assert isinstance(build_credit(spec_for("outcome"), cfg.algo, None), OutcomeCredit)
    with pytest.raises(ConfigError, match="gae needs the critic"):
        build_credit(spec_for("gae"), load_config(None, ["algo.credit=gae"]).algo, None)


# ---------------------------------------------------------------- typed options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.credit={name: pav, alpah: 1}"], r"'algo.credit.alpah' \(did you mean"),
        (["algo.credit=pav", "algo.credit.alpha=x"], "algo.credit.alpha: expected a number"),
        (["algo.credit={name: pav, alpha: -1}"], r"algo.credit.alpha: must be at least 0, got"),
        (["algo.credit={name: prime, gamma: 0.9}"], "use algo.gamma"),
        (["algo.credit=prime", "algo.credit.baseline=mean"], "algo.credit.baseline: 'mean'"),
        (["algo.credit={name: min_form, temperature: 0}"], "temperature: must be positive"),
        (["algo.credit=magic"], r"unknown credit scheme 'magic'; valid: auto, outcome, gae"),
        (["algo.credit={alpha: 1}"], r"algo.credit=auto has no option 'alpha' \(pav has it\)"),
        (["algo.credit=[pav]"], "algo.credit: expected a name or a mapping with a `name` key"),
        (["algo.credit=prime", "algo.advantage=grpo"], "algo.advantage=grpo: .*leave-one-out"),
        (["algo.credit=gae", "algo.advantage=rloo"], "algo.advantage=rloo: .*critic"),
        (["algo.credit=outcome", "algo.credit.alpha=1"], r"outcome has no option 'alpha' \(pav"),
        (["algo.credit={name: auto, temperature: 1}"], "auto has no option 'temperature'"),
        (["trainer.max_steps=0"], "trainer.max_steps: must be at least 1"),
        (["trainer.forward_micro_batch_size=0"], "forward_micro_batch_size: must be at least"),
        (
            ["rollout.backend=vllm", "rollout.top_p=0.9", "rollout.backend.tis_cap=2.0"],
            r"rollout.top_p=0.9 with the engine's log-probs",
        ),
    ],
)
def test_config_errors_at_load_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_auto_credit_checks_the_resolved_scheme() -> None:
    spec = "examples.custom_head:WellFormedSteps"  # default_credit: sum
    cfg = load_config(None, [f"reward.heads=[{{head: '{spec}'}}]", "algo.advantage=dr_grpo"])
    head = resolve_head(spec)
    with pytest.raises(ConfigError, match="algo.advantage=dr_grpo: algo.credit=sum"):
        resolve_credit(cfg, [(head, 1.0)])


def test_builtin_head_kwargs_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'reward.heads.0.kwargs.bta'"):
        resolve_head("implicit_prm", {"bta": 0.1}, "reward.heads.0.kwargs")
    with pytest.raises(ConfigError, match="reward.heads.0.kwargs.update"):
        resolve_head("implicit_prm", {"update": "sometimes"}, "reward.heads.0.kwargs")
    with pytest.raises(ConfigError, match="kwargs.prover_k: expected int"):
        resolve_head("pav_mc_oracle", {"prover_k": "four"}, "reward.heads.0.kwargs")
    head = resolve_head("implicit_prm", {"beta": "1e-2"})  # YAML 1.1 reads 1e-2 as a string
    assert head.beta == pytest.approx(0.01)


# ---------------------------------------------------------------- batches


def test_head_batch_select_keeps_steps() -> None:
    batch = _batch()
    steps = HeadBatch(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        response_mask=batch.response_mask,
        prompt_length=2,
        completions=batch.completions,
        group_size=2,
        step_id=torch.arange(12).reshape(4, 3),
        step_end=torch.ones(4, 3),
    )
    picked = steps.select([3, 1])
    assert isinstance(picked, HeadBatch)
    assert picked.step_id.tolist() == [[9, 10, 11], [3, 4, 5]]
    assert picked.completions == ["w", "y"] and picked.prompts == []


# ---------------------------------------------------------------- run directory and lengths


def test_run_dir_refused_then_overwritten(tmp_path: Path) -> None:
    dist = DistInfo(0, 1, 0)
    prepare_output_dir(tmp_path / "new", "none", False, dist)  # nothing there: fine
    (tmp_path / "checkpoints").mkdir()
    assert earlier_run_files(tmp_path) == []  # an empty checkpoints/ is not a run
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "checkpoints" / "step_00000040").mkdir()
    with pytest.raises(ConfigError) as err:
        prepare_output_dir(tmp_path, "none", False, dist)
    message = str(err.value)
    assert str(tmp_path) in message and "metrics.jsonl, checkpoints" in message
    assert "trainer.resume=auto" in message and "trainer.overwrite=true" in message
    prepare_output_dir(tmp_path, "auto", False, dist)  # continuing is allowed
    assert (tmp_path / "metrics.jsonl").exists()
    prepare_output_dir(tmp_path, "none", True, dist)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_length_check_names_both_numbers() -> None:
    policy = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128))
    cfg = load_config(None, ["rollout.max_new_tokens=100"])
    check_lengths(cfg, policy, longest_prompt=28)  # 128 fits
    with pytest.raises(ConfigError, match=r"max_new_tokens=100 plus .*\(29 tokens\).*128"):
        check_lengths(cfg, policy, longest_prompt=29)


def test_batch_to_moves_every_tensor_and_keeps_the_rest() -> None:
    from rl.core.types import HeadBatch

    batch = HeadBatch(
        input_ids=torch.ones(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        response_mask=torch.ones(2, 3),
        prompt_length=2,
        completions=["a", "b"],
        columns={"answer": ["1", "2"]},
        step_id=torch.zeros(2, 3, dtype=torch.long),
        step_end=torch.zeros(2, 3),
        truncated=torch.zeros(2, dtype=torch.bool),
    )
    moved = batch.to(torch.device("meta"))
    assert isinstance(moved, HeadBatch)
    tensors = [moved.input_ids, moved.response_mask, moved.step_id, moved.truncated]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.completions is batch.completions and moved.columns is batch.columns
    assert moved.prompt_length == 2 and batch.input_ids.device.type == "cpu"


@pytest.mark.parametrize("device_name, fused", [("cpu", False), ("cuda", True)])
def test_adamw_is_torchs_fused_on_gpus(
    monkeypatch: pytest.MonkeyPatch, device_name: str, fused: bool
) -> None:
    """Without offload: torch's AdamW with the engine's hyperparameters, fused on GPUs (no
    compiled DeepSpeed op); with offload: DeepSpeed's CPU Adam (not built here)."""
    import deepspeed.accelerator

    from rl.engine import deepspeed_engine as eng

    accelerator = SimpleNamespace(device_name=lambda: device_name)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    model = torch.nn.Linear(3, 2)
    opt = eng.make_adamw(model, {}, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    assert type(opt) is eng.FiniteAdamW and isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["fused"] is fused and group["lr"] == 3e-4 and group["betas"] == (0.9, 0.95)
    assert group["weight_decay"] == 0.1 and len(group["params"]) == 2
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert eng.offloads_optimizer(offload) and not eng.offloads_optimizer({})


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def __len__(self) -> int:
        return 32


@pytest.mark.parametrize("stage, gather", [(3, True), (3, False), (2, True)])
def test_zero3_gather_for_generation_reaches_the_backend(stage: int, gather: bool) -> None:
    """`rollout.backend.zero3_gather_for_generation`: under ZeRO-3 the transformers backend gathers
    the whole model per generation call (true) or lets `generate` gather each layer itself
    (false); with ZeRO 0-2 nothing is partitioned and nothing is gathered."""
    from rl.engine import deepspeed_engine as eng
    from rl.rollout.backend import TransformersRollout
    from rl.setup import make_rollout

    flag = str(gather).lower()
    cfg = load_config(None, [f"rollout.backend.zero3_gather_for_generation={flag}"])
    policy = SimpleNamespace(generation_config=None)
    rollout = make_rollout(cfg, _Tokenizer(), "unused", policy, DistInfo(0, 1, 0), stage)
    assert isinstance(rollout, TransformersRollout)
    assert rollout.gather is (eng.gathered_parameters if stage == 3 and gather else None)
    assert rollout.synced_gpus is (stage == 3)
