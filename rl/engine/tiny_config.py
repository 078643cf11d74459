"""Size and warm-up recipe of the builtin start models (`rl.engine.start_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rl.tasks.arith import ArithConfig


@dataclass(frozen=True)
class TinyModelConfig:
    """Size and warm-up (SFT) recipe of the tiny starting policy."""

    hidden_size: int = 128
    """Model width."""
    num_layers: int = 3
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (arith-tiny: as many key/value heads; chat-tiny: half as many)."""
    intermediate_size: int = 512
    """MLP hidden width."""
    max_position_embeddings: int = 128
    """Longest prompt + response, in tokens (characters)."""
    sft_steps: int = 1200
    """Supervised fine-tuning steps (one fresh batch of train-split demonstrations each)."""
    sft_batch_size: int = 64
    """Demonstrations per SFT step."""
    sft_lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up over 5% of the steps, then cosine to 10%)."""
    demo_error_rate: float = 0.6
    """Probability that a demonstration carries one wrong step (see `demonstration`)."""
    seed: int = 0
    """Seeds the model init, the demonstration problems and their errors."""
    task: ArithConfig = field(default_factory=ArithConfig)
    """The task the model is warmed up on."""
