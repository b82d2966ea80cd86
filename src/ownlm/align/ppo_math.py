"""PPO's math as pure tensor functions: KL estimators, per-token rewards, GAE, whitening, clipped
losses and the KL controllers (Ziegler et al. 2019; the "N implementation details of RLHF with PPO"
checklist). Kept apart from the training loop in `ownlm.align.ppo` so each piece is tested alone
against hand-worked numbers.

Tensors are (batch, response tokens); `mask` is 1 on real response tokens, 0 on padding after them.
"""

from __future__ import annotations


def masked_mean(x, mask, dim=None):
    return (x * mask).sum() / mask.sum() if dim is None else (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x, mask, unbiased: bool = True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased:
        if n < 2:
            raise ValueError("masked_var: fewer than two unmasked values")
        var = var * n / (n - 1)
    return var


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x − mean) / std over the unmasked values (std with Bessel's correction); the mean is added
    back when `shift_mean` is False. Masked positions come out as 0."""
    import torch

    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp, ref_logp, kind: str = "k1"):
    """Per-token KL(π ‖ π_ref) estimate on the sampled token: k1 = log p − log p_ref (unbiased, can be
    negative), k3 = (r − 1) − log r with r = p_ref / p (unbiased and ≥ 0; Schulman's k3)."""
    import torch

    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k3":
        return torch.expm1(-diff) + diff
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1' or 'k3'")


def token_rewards(scores, kl, mask, kl_coef: float):
    """−kl_coef · kl on every response token, plus each sequence's score on its last real token."""
    import torch

    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-padded responses: (advantages, returns).

    The episode ends after the last real token (the value beyond it is 0); padded positions have
    zero reward and value, so they contribute nothing and come out as 0."""
    import torch

    rewards, values = rewards * mask, values * mask
    n = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, cliprange: float = 0.2):
    """PPO's clipped surrogate (to minimise): (loss, clip fraction, approximate KL ½·E[(log ratio)²])."""
    import torch

    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(losses, clipped), mask)
    clipfrac = masked_mean((clipped > losses).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(values, old_values, returns, mask, cliprange_value: float = 0.2):
    """Clipped value loss ½·E[max((v − R)², (v_clipped − R)²)], v_clipped within ±cliprange_value of
    the rollout's values: (loss, clip fraction)."""
    import torch

    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, clipped), mask)
    clipfrac = masked_mean((clipped > losses).float(), mask)
    return loss, clipfrac


def entropy_from_logp(logp):
    """Entropy of a distribution given as log-probabilities along the last axis."""
    return -(logp.exp() * logp).sum(-1)


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon), after each
    batch of n rollouts whose mean KL per sequence was `current`."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
