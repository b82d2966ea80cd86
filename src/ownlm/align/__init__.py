"""Alignment: preference pairs, the reward model, DPO, PPO and Constitutional AI."""
