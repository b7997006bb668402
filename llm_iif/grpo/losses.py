"""GRPO's loss and target, one completion at a time, at the parameters θ(k) that sampled the batch.

At θ(k) the importance ratio r_t = π_θ(y_t)/π_θ(k)(y_t) is 1, and every trl ``loss_type`` (grpo, bnpo, dr_grpo,
dapo, cispo, sapo, vespo, luspo) has the same per-token gradient there, -A_i ∇log π(y_t): clipping is inactive
at r = 1 and the soft or gamma weights of sapo and vespo have slope 1 there. Only cispo differs: it scales the
policy term by its detached ratio clamped at ``epsilon_high``, min(1, ε_high) at r = 1 (0.2 at trl's default),
and not the KL term. With ``importance_sampling_level: sequence`` (GSPO) r_i is one ratio per completion, the
mean log-ratio over its tokens exponentiated: the policy term's gradient summed over the tokens is unchanged,
but the bias-corrected KL term's is not. What differs is each completion's share of the batch loss, its
normaliser:

    L_i = c_i · Σ_t m_{i,t} ℓ_{i,t},   ℓ_{i,t} = -s A_i r_{i,t} (· vLLM IS ratio) + β k3_{i,t} (· r_{i,t} with bias correction)

    c_i = 1 / (|y_i| N)        grpo, sapo        (each completion's token mean, averaged over completions)
          1 / (N · L_max)      dr_grpo
          1 / N                luspo
          1 / Σ_j |y_j|        bnpo, dapo, cispo, vespo   (a token sum over the batch)

with N completions and Σ_j |y_j| tokens in the generation batch, over all processes. trl computes the
`RESCALED_LOSSES` per micro-batch (bnpo as a token mean of the micro-batch); after filtering,
`rescaled_to_kept` rescales them to the whole batch's kept completions or tokens, as above.
"""

from __future__ import annotations

import torch

ROW_MEAN_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
"""Loss types that trl averages over the completions of a micro-batch (the others normalise by tokens)."""
TOKEN_SUM_LOSSES = ("bnpo", "dapo", "cispo", "vespo")
RESCALED_LOSSES = ROW_MEAN_LOSSES + ("bnpo",)
"""Loss types whose trl normaliser counts one micro-batch only, so filtering must rescale them."""
SUPPORTED_LOSSES = ROW_MEAN_LOSSES + TOKEN_SUM_LOSSES


def token_losses(logps: torch.Tensor, advantages: torch.Tensor, ref_logps: torch.Tensor | None = None,
                 beta: float = 0.0, bias_corrected_kl: bool = False,
                 sampling_ratio: torch.Tensor | None = None, policy_scale: float = 1.0,
                 sequence_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] per-token GRPO loss at ratio 1, with the ratio's gradient kept.

    logps [B, T]: log π_θ(y_t) with grad; advantages [B]; ref_logps [B, T] (needed when beta > 0);
    sampling_ratio [B, T] or [B, 1]: trl's vLLM importance-sampling correction, a constant; policy_scale: s
    of the module docstring (cispo); sequence_mask [B, T]: one ratio per completion over these tokens
    (``importance_sampling_level: sequence``) instead of one per token."""
    log_ratio = logps - logps.detach()  # 0, with gradient ∇log π
    if sequence_mask is not None:
        log_ratio = ((log_ratio * sequence_mask).sum(dim=1) / sequence_mask.sum(dim=1).clamp(min=1))[:, None]
    ratio = torch.exp(log_ratio)
    loss = -policy_scale * ratio * advantages[:, None]
    if sampling_ratio is not None:
        loss = loss * sampling_ratio
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # trl's k3 estimator of KL(π_θ || π_ref)
        loss = loss + beta * (kl * ratio if bias_corrected_kl else kl)
    return loss


def completion_normalisers(loss_type: str, mask: torch.Tensor, num_completions: int, num_tokens: float,
                           max_completion_length: int) -> torch.Tensor:
    """[B] c_i of the module docstring for the completions of ``mask`` [B, T]; ``num_completions`` and
    ``num_tokens`` count the whole generation batch over all processes."""
    if loss_type not in SUPPORTED_LOSSES:
        raise ValueError(f"loss_type '{loss_type}': expected one of {', '.join(SUPPORTED_LOSSES)}")
    rows = torch.ones(mask.shape[0], dtype=torch.float32, device=mask.device)
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (mask.sum(dim=1).clamp(min=1).float() * num_completions)
    if loss_type == "dr_grpo":
        return rows / (num_completions * max_completion_length)
    if loss_type == "luspo":
        return rows / num_completions
    return rows / max(float(num_tokens), 1.0)


def completion_losses(token_loss: torch.Tensor, mask: torch.Tensor, normalisers: torch.Tensor) -> torch.Tensor:
    """[B] L_i = c_i Σ_t m_{i,t} ℓ_{i,t}: each completion's share of the generation batch's loss."""
    return normalisers * (token_loss * mask).sum(dim=1)


def group_target_terms(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """[B] -Σ_t log π(y_{i,t}) · Â_i: each completion's term of -f_seq with group-relative advantages Â [B]."""
    return -(logps * mask).sum(dim=1) * advantages


def rescaled_to_kept(loss: torch.Tensor, loss_type: str, rows: int, tokens: torch.Tensor, kept_rows: torch.Tensor,
                     kept_tokens: torch.Tensor, micro_batches: int) -> torch.Tensor:
    """trl's loss of one micro-batch of a filtered generation batch, rescaled to the mean over the whole batch's
    kept completions (or, for bnpo, tokens), the way trl's dapo loss uses ``num_items_in_batch``.

    trl averages the `RESCALED_LOSSES` over one micro-batch (its ``rows``, padding included, or bnpo's loss
    ``tokens``), so after filtering, micro-batches and processes would weigh their completions unequally.
    ``kept_rows`` and ``kept_tokens`` count the generation batch's kept completions and tokens over all
    processes; ``micro_batches`` is processes × steps_per_generation. Other loss types are returned as they are.
    """
    if loss_type not in RESCALED_LOSSES:
        return loss
    if loss_type == "bnpo":
        return loss * tokens.clamp(min=1) * micro_batches / kept_tokens.clamp(min=1)
    return loss * rows * micro_batches / kept_rows.clamp(min=1)
