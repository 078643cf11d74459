"""Generation backends (transformers, vLLM), reasoning-step spans of generated ids, and
Monte-Carlo values of step prefixes."""
