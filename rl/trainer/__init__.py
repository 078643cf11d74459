"""The RL training loop and what only it uses: the reward pipeline, credit schemes, learners
(policy, critic), metrics and the run-directory rule."""
