"""Online RL trainer for LLM reasoning with dense process rewards (GRPO/PPO on DeepSpeed)."""
