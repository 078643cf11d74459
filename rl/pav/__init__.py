"""The PAV verifier pipeline: Monte-Carlo step labels from the base policy, then the verifier."""
