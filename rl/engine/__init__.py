"""The only DeepSpeed code (engines, collectives, checkpoints) and the models it trains:
loading, the builtin start model, value models, forward passes, the memory meter."""
