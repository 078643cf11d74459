"""A complete custom process reward head (the README's example): +bonus on each step that is
a well-formed equation `a op b = c`, -bonus on any other step (the "Answer:" line excepted).
Use it with `reward.heads: [{head: "examples.custom_head:WellFormedSteps"}]`."""

import re

import torch

from rewards.heads import HeadBatch, HeadOutput, StatelessHead

EQUATION = re.compile(r"^\s*\d+\s*[-+*]\s*\d+\s*=\s*\d+\s*$")


class WellFormedSteps(StatelessHead):  # StatelessHead: no online update, no state
    name = "well_formed_steps"
    granularity = "step"  # one reward per step, on the step's last token
    default_credit = "sum"  # used when algo.credit is "auto"

    def __init__(self, bonus: float = 0.1) -> None:
        self.bonus = float(bonus)

    def score(self, batch: HeadBatch) -> HeadOutput:
        rewards = torch.zeros(batch.batch_size, batch.response_length)  # [B, Tr]
        for row, text in enumerate(batch.completions):
            steps = [s for s in text.split("\n") if s.strip()]  # the trainer's step rule
            ends = batch.step_end[row].nonzero().flatten().tolist()
            for step, end in zip(steps, ends, strict=False):
                if not step.startswith("Answer:"):
                    rewards[row, end] = self.bonus if EQUATION.match(step) else -self.bonus
        return HeadOutput(rewards, {"bonus_mean": float(rewards.sum(1).mean())})
