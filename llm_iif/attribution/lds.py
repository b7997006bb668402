"""The linear datamodeling score (LDS; TRAK, arXiv 2303.14186): do summed influence scores predict what
training on a subset really does?

Draw M random half-subsets S_m of a round's N samples, redo the round's update on each from the same state,
and measure the real change Δf_m of the target. If the scores I_i are right to first order, Δf_m is close to
η Σ_{i∈S_m} I_i; the LDS is the Spearman rank correlation between the predicted sums and the real changes
over the M subsets (1: the scores order the subsets exactly as training does, 0: no better than chance).
"""

from __future__ import annotations

import math

import torch

from llm_iif.core.errors import UserError


def random_half_subsets(num_samples: int, num_subsets: int, generator: torch.Generator) -> torch.Tensor:
    """[M, N] bool: ``num_subsets`` random subsets of ``num_samples`` samples, each of floor(N/2) of them."""
    if num_subsets < 2:
        raise UserError(f"lds subsets: {num_subsets}; expected at least 2 (a rank correlation needs two)")
    subsets = torch.zeros(num_subsets, num_samples, dtype=torch.bool)
    for m in range(num_subsets):
        subsets[m, torch.randperm(num_samples, generator=generator)[:num_samples // 2]] = True
    return subsets


def ranks(values: torch.Tensor) -> torch.Tensor:
    """[n] ranks 1..n of ``values`` [n], ties sharing their average rank."""
    order = torch.argsort(values, stable=True)
    ranked = torch.empty(len(values), dtype=torch.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranked[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranked


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two [n] tensors (NaN when either is constant)."""
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")


def predicted_changes(scores: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """[M] each subset's summed ``scores`` [N] (``subsets`` [M, N] bool): its predicted target change, up to η."""
    return subsets.double() @ scores.double()


def linear_datamodeling_score(scores: torch.Tensor, subsets: torch.Tensor, actual: torch.Tensor) -> float:
    """Spearman correlation between each subset's summed ``scores`` [N] (``subsets`` [M, N] bool) and its real
    target change ``actual`` [M]."""
    return spearman(predicted_changes(scores, subsets), actual.double())


def scores_report(scores_by_kind: dict[str, torch.Tensor], subsets: torch.Tensor, actual: torch.Tensor,
                  generator: torch.Generator) -> dict[str, tuple[float, tuple[float, float]]]:
    """{kind: (LDS, its 95% `bootstrap_interval`)} of each kind of scores [N] (plain, preconditioned, random, ...)."""
    return {kind: (linear_datamodeling_score(values, subsets, actual),
                   bootstrap_interval(values, subsets, actual, generator))
            for kind, values in scores_by_kind.items()}


def bootstrap_interval(scores: torch.Tensor, subsets: torch.Tensor, actual: torch.Tensor, generator: torch.Generator,
                       resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of the LDS over ``resamples`` resamplings of the M subsets."""
    m = len(actual)
    values = []
    for _ in range(resamples):
        pick = torch.randint(m, (m,), generator=generator)
        value = linear_datamodeling_score(scores, subsets[pick], actual[pick])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    low = ordered[int((1 - level) / 2 * (len(ordered) - 1))]
    high = ordered[int((1 + level) / 2 * (len(ordered) - 1))]
    return low, high
