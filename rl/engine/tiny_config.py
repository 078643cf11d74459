"""Size and warm-up recipe of the builtin start models (`rl.engine.start_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rl.tasks.arith import ArithConfig, DemoErrors


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
    """Probability that a demonstration carries the task's systematic slip (see
    `rl.tasks.arith.DemoErrors.slip_rate`)."""
    demo_step_error_rate: float = 0.0
    """Each step of a demonstration wrong independently with this probability
    (`DemoErrors.step_rate`; arith-tiny only)."""
    demo_fact_error_rate: float = 0.0
    """Share of arithmetic facts misremembered (`DemoErrors.fact_rate`; arith-tiny only)."""
    demo_fact_error_use: float = 0.7
    """Probability a demonstration uses a misremembered fact (`DemoErrors.fact_use`)."""
    seed: int = 0
    """Seeds the model init, the demonstration problems and their errors."""
    task: ArithConfig = field(default_factory=ArithConfig)
    """The task the model is warmed up on."""

    def demo_errors(self) -> DemoErrors:
        """The demonstrations' errors (the fact choice seeded with `seed`)."""
        return DemoErrors(
            slip_rate=self.demo_error_rate,
            step_rate=self.demo_step_error_rate,
            fact_rate=self.demo_fact_error_rate,
            fact_use=self.demo_fact_error_use,
            fact_seed=self.seed,
        )
