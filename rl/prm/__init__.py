"""Discriminative process reward models: step-label data, the PRM convention, training."""
