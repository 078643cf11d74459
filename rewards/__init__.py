"""Reward functions and reward heads: outcome verifiers, user functions, process rewards."""
