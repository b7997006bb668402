"""Influence of rollout samples on a validation target, for the LM policy (Stage II of Algorithm 1).

At the round's start parameters θ(k), sample i's influence on a target f is

    I_i = ⟨∇L_val(θ), ∇L_i(θ)⟩,   L_val = -f,   L_i = sample i's PPO loss,

so I_i > 0 means one gradient step on sample i raises f. Every target here has the same shape,

    f(θ) = (1/N) Σ_v Σ_t w_{v,t} · log π_θ(y_{v,t} | x_v, y_{v,<t}),

and differs only in its token weights w (`target_token_weights`). Gradients are over the trainable LoRA
parameters only. The functions take the policy unwrapped (no DDP), so nothing here synchronises processes;
the trainer all-reduces the target and gathers the scores.
"""

from __future__ import annotations

import torch

from llm_iif.core import ppo
from llm_iif.attribution.gradients import LoraGradientCapture, lora_parameters
from llm_iif.core.config import TARGETS, PPOConfig
from llm_iif.core.tokens import at_response_positions, response_logprobs

def target_token_weights(target: str, advantages: torch.Tensor, scores: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Token weights w [B, T] of a target objective on validation responses.

    advantages: [B, T] whitened GAE advantages; scores: [B] rewards whitened over the validation set;
    mask: [B, T] response tokens. The gold target needs only the mask.
      seq     every token of response v gets Â_v at its last token (where the reward lands);
      return  each token gets its own advantage Â_{v,t};
      reward  every token of response v gets its whitened reward;
      gold    every token gets 1: the plain log-likelihood of reference responses.
    """
    mask = mask.float()
    rows = torch.arange(mask.shape[0], device=mask.device)
    if target == "gold":
        return mask
    if target == "seq":
        return advantages[rows, ppo.last_token_index(mask)][:, None] * mask
    if target == "return":
        return advantages * mask
    if target == "reward":
        return scores[:, None] * mask
    raise ValueError(f"unknown target '{target}': expected one of {', '.join(TARGETS)}")


def target_gradient_halves(policy, query_ids, query_mask, response_ids, response_mask, weights: torch.Tensor,
                           temperature: float, chunk_size: int) -> tuple[dict, dict]:
    """∇ of -Σ_v Σ_t w_{v,t} log π(y_{v,t}) over the LoRA parameters, summed separately over the even- and
    odd-indexed samples (two halves, for a reliability estimate). Returns two {name: tensor} dicts (fp32).
    """
    params = lora_parameters(policy)
    halves = []
    for parity in (0, 1):
        total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        rows = torch.arange(parity, query_ids.shape[0], 2, device=query_ids.device)
        for chunk in torch.split(rows, chunk_size):
            ids = torch.cat([query_ids[chunk], response_ids[chunk]], dim=1)
            mask = torch.cat([query_mask[chunk], response_mask[chunk]], dim=1)
            logits, _ = policy(ids, mask)
            logprobs = response_logprobs(logits, response_ids[chunk], temperature)
            loss = -(weights[chunk] * logprobs * response_mask[chunk]).sum()
            for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[name] += grad.float()
        halves.append(total)
    return halves[0], halves[1]


def per_sample_ppo_losses(policy, rollout, advantages: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig,
                          train_grad: str, tokens_per_sample: float) -> torch.Tensor:
    """[B] PPO loss of each sample, exactly the loss the update's first step takes on it.

    It sums the sample's per-token losses and divides by the batch's mean response length, so one sample's
    gradient is what it contributes to a token-mean minibatch loss (up to the minibatch size). At θ(k) the
    ratio is 1 and no clipping is active. ``train_grad`` is ``full`` (policy + vf_coef × value) or ``policy``.
    """
    mask = rollout.response_mask
    logits, values = policy(rollout.input_ids, rollout.attention_mask)
    logprobs = response_logprobs(logits, rollout.response_ids, cfg.temperature)
    loss, _ = ppo.clipped_policy_loss(logprobs, rollout.logprobs, advantages, cfg.clip_range)
    if train_grad == "full":
        values = at_response_positions(values, rollout.response_ids.shape[1])
        value_loss, _ = ppo.clipped_value_loss(values, rollout.values, returns, cfg.clip_range_value)
        loss = loss + cfg.vf_coef * value_loss
    return (loss * mask).sum(dim=1) / tokens_per_sample


def influence_scores(policy, rollout, advantages: torch.Tensor, returns: torch.Tensor, target: dict,
                     cfg: PPOConfig, train_grad: str, tokens_per_sample: float, chunk_size: int) -> torch.Tensor:
    """[B] influence ⟨target, ∇L_i⟩ of every rollout sample, from one batched backward per chunk.

    ``target`` is ∇L_val = -∇f over the LoRA parameters. Parameter ``.grad`` fields are not touched.
    """
    params = list(lora_parameters(policy).values())
    scores = []
    for chunk in torch.split(torch.arange(len(rollout), device=advantages.device), chunk_size):
        with LoraGradientCapture(policy, target=target) as capture:
            losses = per_sample_ppo_losses(policy, rollout.select(chunk), advantages[chunk], returns[chunk],
                                           cfg, train_grad, tokens_per_sample)
            torch.autograd.grad(losses.sum(), params)
        scores.append(capture.scores())
    return torch.cat(scores)
