"""The non-finite guard: NaN or inf values are skipped and counted, and stop the run after a patience.

Every kind of value that can go non-finite in a round (rewards, policy log-probs or values, advantages,
IIF's target rows, influence scores, gradients) reports here with a count already summed over processes. The affected samples
or optimiser steps are skipped by the caller; the guard counts them in ``nonfinite_<kind>`` and raises a
`UserError` once more rounds in a row than ``patience`` contained any.
"""

from __future__ import annotations

import logging

import torch

from llm_iif.core.errors import UserError

logger = logging.getLogger(__name__)

NONFINITE_KINDS = ("reward", "policy", "advantage", "target", "influence", "grad_steps")


class NonfiniteGuard:
    """Counts NaN/inf events per round and enforces ``patience`` (rounds in a row that may contain any)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.rounds_in_a_row = 0
        self.counts = dict.fromkeys(NONFINITE_KINDS, 0)

    def start_round(self) -> None:
        self.counts = dict.fromkeys(NONFINITE_KINDS, 0)

    def flag(self, kind: str, count: int, message: str, nothing_left: bool = False) -> None:
        """Record ``count`` NaN/inf ``kind`` events of this round (summed over processes).

        Raises `UserError` with ``message`` when this makes more than ``patience`` such rounds in a row, or
        when ``nothing_left`` to train on."""
        if not count:
            return
        self.counts[kind] += count
        in_a_row = self.rounds_in_a_row + 1
        if nothing_left or in_a_row > self.patience:
            hint = ("" if nothing_left else "; run.nonfinite_patience > 0 skips them instead" if not self.patience
                    else f"; run.nonfinite_patience: {self.patience} allows {self.patience} such round(s) in a row")
            raise UserError(f"{message} ({in_a_row} round(s) in a row){hint}")
        logger.warning("%s; skipped (%d of run.nonfinite_patience=%d rounds in a row)", message, in_a_row,
                       self.patience)

    def end_round(self) -> dict[str, int]:
        """Close the round; returns its ``nonfinite_<kind>`` metrics."""
        self.rounds_in_a_row = self.rounds_in_a_row + 1 if any(self.counts.values()) else 0
        return {f"nonfinite_{kind}": count for kind, count in self.counts.items()}


def rows_finite(mask: torch.Tensor, *per_token: torch.Tensor) -> torch.Tensor:
    """[B] True where every [B, T] tensor of ``per_token`` is finite at the positions ``mask`` marks."""
    ok = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    for values in per_token:
        ok &= torch.where(mask.bool(), values, 0.0).isfinite().all(dim=1)
    return ok
