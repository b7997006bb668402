"""Group filters, the baselines IIF-GRPO is compared with. Rewards [N] come in groups of G consecutive
completions of one prompt, trl's layout. A NaN reward (a completion no reward function could score, or one
whose reward was NaN or inf) is never kept and takes no part in its group's spread or variance."""

from __future__ import annotations

import torch

EQUAL_REWARD_ATOL = 1e-6
"""Rewards closer than this count as equal: float noise must not make a group look informative."""


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling (arXiv 2503.14476): the [N] keep-mask that drops every group whose finite
    rewards are all equal (or that has fewer than two). Such a group's group-relative advantages are all zero,
    so it adds no policy gradient. Completions with a NaN reward are dropped too."""
    grouped = rewards.view(-1, group_size)
    finite = grouped.isfinite()
    spread = (torch.where(finite, grouped, -torch.inf).amax(dim=1)
              - torch.where(finite, grouped, torch.inf).amin(dim=1))
    varied = (finite.sum(dim=1) >= 2) & (spread > EQUAL_REWARD_ATOL)
    return varied.repeat_interleave(group_size) & finite.flatten()


def max_variance_subsets(rewards: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """PODS max-variance down-sampling (arXiv 2504.13818): the [N] keep-mask that keeps, in each group, the
    ``keep`` completions (or all its finite ones, if fewer) whose rewards have the largest variance.

    A max-variance subset of sorted values always takes the i lowest and the keep - i highest for some i, so
    trying the keep + 1 splits of each sorted group is exact, O(G log G) per group."""
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep={keep}: expected 1..{group_size} completions per group")
    grouped = rewards.view(-1, group_size)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    for g, group in enumerate(grouped):
        finite = group.isfinite().nonzero().flatten()
        order = finite[torch.sort(group[finite], stable=True).indices]
        size = min(keep, len(order))
        best, best_rows = -1.0, order[:0]
        for low in range(size + 1):
            rows = torch.cat([order[:low], order[len(order) - (size - low):]])
            variance = group[rows].var(unbiased=False).item() if size > 1 else 0.0
            if variance > best:
                best, best_rows = variance, rows
        mask[g, best_rows] = True
    return mask.flatten()


def subset_advantages(rewards: torch.Tensor, keep: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """[N] group-relative advantages computed over each group's kept completions only, as PODS does (the
    authors' code centres on the mean of the down-sampled group and divides by its std); 0 where not kept.

    ``scale`` is trl's ``scale_rewards``: ``group`` divides by the kept group's std, ``batch`` by the std of
    every kept reward, ``none`` not at all (trl's nanstd with Bessel's correction, plus 1e-4)."""
    kept = torch.where(keep, rewards, torch.nan).view(-1, group_size)
    centred = kept - kept.nanmean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(kept, dim=1) + 1e-4)
    elif scale == "batch":
        centred = centred / (_nanstd(kept.flatten(), dim=0) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards '{scale}': expected group, batch or none")
    return centred.flatten().nan_to_num(0.0)


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    count = values.isfinite().sum(dim=dim, keepdim=True)
    variance = ((values - values.nanmean(dim=dim, keepdim=True)) ** 2).nansum(dim=dim, keepdim=True)
    return (variance / (count - 1).clamp(min=1)).sqrt()
