"""Filters: which samples to keep, given their influence scores."""

from __future__ import annotations

import math
import warnings

import torch

from llm_iif.recipes import FILTER_MODES


def filter_mask(scores: torch.Tensor, mode: str, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The [N] bool keep-mask for influence ``scores`` [N] (score > 0: the sample helps the target).

    Modes, with N_neg the number of negative scores:
      ``neg-bottom``  drop the floor(p·N_neg) most negative samples; scores ≥ 0 are always kept (IIF).
      ``bottom``      drop the floor(p·N) lowest-scoring samples.
      ``neg-random``  drop floor(p·N_neg) negative samples chosen at random.
      ``matched-random``  drop floor(p·N_neg) samples chosen at random from all N: as many as neg-bottom
                      drops, but which ones ignores the scores (the size-matched random baseline).
      ``random``      drop floor(p·N) samples chosen at random (scores are ignored).
      ``none``        keep everything.
    Ties are broken by position (the earlier sample is dropped first). If every sample would be dropped,
    the highest-scoring one is kept and a warning is issued: an update never runs on an empty batch.
    """
    if mode not in FILTER_MODES:
        raise ValueError(f"filter mode '{mode}': expected one of {', '.join(FILTER_MODES)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"filter fraction p={p}: expected a value in [0, 1]")
    if scores.dim() != 1 or len(scores) == 0:
        raise ValueError(f"scores: expected a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if mode != "random" and not torch.isfinite(scores).all():
        raise ValueError(f"scores: {int((~torch.isfinite(scores)).sum())} of {len(scores)} are NaN or inf")
    n = len(scores)
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if mode == "none":
        return keep
    candidates = torch.arange(n, device=scores.device)
    counted = candidates[scores < 0] if mode.startswith("neg") or mode == "matched-random" else candidates
    if mode.startswith("neg"):
        candidates = counted
    n_drop = math.floor(p * len(counted) + 1e-9)  # the epsilon guards p·N landing just under an integer
    if mode in ("neg-bottom", "bottom"):
        order = torch.sort(scores[candidates], stable=True).indices
    else:
        order = torch.randperm(len(candidates), generator=generator).to(scores.device)
    keep[candidates[order[:n_drop]]] = False
    if not keep.any():
        warnings.warn(f"filter_mask({mode}, p={p}) would drop all {n} samples; keeping the highest-scoring one",
                      stacklevel=2)
        keep[torch.argmax(scores)] = True
    return keep

