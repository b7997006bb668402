"""Group filters, the baselines IIF-GRPO is compared with. Rewards [N] come in groups of G consecutive
completions of one prompt, trl's layout."""

from __future__ import annotations

import torch


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling (arXiv 2503.14476): the [N] keep-mask that drops every group whose rewards
    are all equal. Such a group's group-relative advantages are all zero, so it adds no policy gradient."""
    grouped = rewards.view(-1, group_size)
    varied = (grouped != grouped[:, :1]).any(dim=1)
    return varied.repeat_interleave(group_size)


def max_variance_subsets(rewards: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """PODS max-variance down-sampling (arXiv 2504.13818): the [N] keep-mask that keeps, in each group, the
    ``keep`` completions whose rewards have the largest variance.

    A max-variance subset of sorted values always takes the i lowest and the keep - i highest for some i, so
    trying the keep + 1 splits of each sorted group is exact, O(G log G) per group."""
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep={keep}: expected 1..{group_size} completions per group")
    grouped = rewards.view(-1, group_size)
    order = torch.sort(grouped, dim=1, stable=True).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    for g in range(grouped.shape[0]):
        best, best_rows = -1.0, None
        for low in range(keep + 1):
            rows = torch.cat([order[g, :low], order[g, group_size - (keep - low):]])
            variance = grouped[g, rows].var(unbiased=False).item() if keep > 1 else 0.0
            if variance > best:
                best, best_rows = variance, rows
        mask[g, best_rows] = True
    return mask.flatten()
