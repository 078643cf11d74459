"""Prompt sources (builtin tasks, JSONL, `datasets`), chat templates, the resumable sampler."""
