"""Pure maths: advantage estimators, losses, step credit (PAV, PRIME, min-form), PPO/GAE,
the implicit PRM, off-policy corrections. Imports torch and `rl.core` only (no DeepSpeed,
transformers or vLLM: tested); formulas in docs/algorithms.md."""
