"""PPO math as pure functions over padded token tensors.

Shapes: B sequences, T response tokens. ``mask`` is a float/bool [B, T] tensor that is 1 on real response
tokens (including a final EOS) and 0 on padding after it; valid tokens always form a prefix of each row.
Nothing here knows about models, processes or recipes, so every function is unit-tested by hand.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1. Returns a scalar; 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of the masked entries, as one tensor so processes can all-reduce it."""
    mask = mask.to(values.dtype)
    return torch.stack([mask.sum(), (values * mask).sum(), (values.square() * mask).sum()])


def mean_var_from_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance from (possibly all-reduced) `masked_moments`."""
    count, total, total_sq = moments
    mean = total / count.clamp(min=1.0)
    var = (total_sq - count * mean.square()) / (count - 1).clamp(min=1.0)
    return mean, var.clamp(min=0.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor | None = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) on masked entries; padded entries become 0.

    ``moments`` are the statistics to whiten with; by default those of ``values`` itself. Pass globally
    all-reduced moments to whiten the same way on every process.
    """
    mean, var = mean_var_from_moments(masked_moments(values, mask) if moments is None else moments)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last valid response token (0 for an empty row)."""
    return (mask.long().sum(dim=1) - 1).clamp(min=0)


def kl_penalized_rewards(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logπ - logπ_ref) on every response token, plus the sequence reward on
    the last response token.

    rewards: [B] sequence rewards; logprobs, ref_logprobs, mask: [B, T].
    Returns (per-token rewards [B, T], per-token KL [B, T]).
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    per_token = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    per_token[rows, last_token_index(mask)] += rewards.to(per_token.dtype)
    return per_token, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    δ_t = r_t + γ·V_{t+1} - V_t with V = 0 after the last valid token;  A_t = δ_t + γλ·A_{t+1}.
    Returns (advantages [B, T], returns = advantages + values [B, T]), both 0 on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate, as a loss to minimise:
    max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) with ρ = exp(logπ - logπ_old).

    Returns (loss [B, T], clipped [B, T] as float: 1 where the clipped branch was taken).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss: 0.5·max((V - R)², (V_old + clip(V - V_old, ±ε) - R)²).

    Returns (loss [B, T], clipped [B, T] as float).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ½(logπ - logπ_old)², a low-variance estimate of KL(π_old ‖ π) for small steps."""
    return 0.5 * (logprobs - old_logprobs).square()


def distinct_n(token_lists: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of sequences; 0.0 when there are no n-grams."""
    grams = [tuple(seq[i:i + n]) for seq in token_lists for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the observed KL tracks ``target``.

    error = clip(KL / target - 1, -0.2, 0.2);  coef ← coef · (1 + error · n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
