"""Preference maths on trusted (prompt, chosen, rejected) triples, as pure tensor functions.

Every function takes per-token log-probs already computed; the trainers supply them (`llm_iif.lm.trusted`
for PPO, `llm_iif.grpo.trainer` for GRPO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, length_normalised: bool) -> torch.Tensor:
    """log π(y | x) of each response: the sum over its tokens, or their mean when ``length_normalised``.

    logprobs, mask: [B, T] -> [B]."""
    total = (logprobs * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if length_normalised else total


def preference_token_weights(mask: torch.Tensor, length_normalised: bool) -> torch.Tensor:
    """Token weights [2V, T] that make -Σ w·log π the negative preference margin of V triples whose rows are
    the V chosen responses, then the V rejected ones: +1 (or +1/length) on a chosen response's tokens, −1 (or
    −1/length) on a rejected one's.

    mask: [2V, T] response tokens."""
    mask = mask.float()
    half = mask.shape[0] // 2
    signs = torch.cat([torch.ones(half), -torch.ones(mask.shape[0] - half)]).to(mask.device)
    weights = mask * signs[:, None]
    return weights / mask.sum(dim=1, keepdim=True).clamp(min=1) if length_normalised else weights


def margins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[V] log π(chosen) − log π(rejected), from the two [V] sequence log-probs."""
    return chosen - rejected


def dpo_loss(policy_margins: torch.Tensor, reference_margins: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss, −mean log σ(β · (m_θ − m_ref)), over V triples.

    policy_margins, reference_margins: [V] margins under the policy and the reference -> scalar."""
    return -F.logsigmoid(beta * (policy_margins - reference_margins)).mean()


def implicit_accuracy(policy_margins: torch.Tensor, reference_margins: torch.Tensor) -> torch.Tensor:
    """The share of triples whose implicit reward prefers the chosen response: m_θ − m_ref > 0 (trl's DPO
    ``rewards/accuracies``). At the reference itself every difference is 0, so it starts at 0.

    policy_margins, reference_margins: [V] -> scalar."""
    return ((policy_margins - reference_margins) > 0).float().mean()
