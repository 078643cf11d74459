"""Evaluation pipelines: PRM first-error F1 (ProcessBench)."""
