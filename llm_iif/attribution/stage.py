"""The IIF stage (Stage II of the paper's Algorithm 1) as one component any trainer can call.

At the parameters θ(k) that generated a batch, before its first optimiser step:

    target  ∇L_val = -∇f,   f = (1/N) Σ_v Σ_t w_{v,t} log π_θ(y_{v,t} | x_v, y_{v,<t})   (N validation rows)
    score   I_i = ⟨∇L_val, ∇L_i⟩                                                     (L_i: sample i's loss)
    keep    filter_mask(I over every process's samples, mode, p)

With ``iif.target_source: batch`` the rows v are the training batch itself, cross-fitted: the batch is split
into K folds by global row index (or by the group ids the caller gives: GRPO folds whole groups), G_k is the
summed target gradient of fold k, and sample i in fold k(i) is
scored against the other folds only, I_i = ⟨Σ_{j≠k(i)} G_j, ∇L_i⟩ / (N - N_{k(i)}), so its own gradient
never inflates its score. One forward serves two backward passes: the first sums the target terms' gradients
per fold (G_j), the second gives every ⟨G_j, ∇L_i⟩ at once.

I_i > 0 means one gradient step on sample i raises f. The stage owns the target gradient, the scores, the one
filter decision over all processes and the target's reliability meters: ``target_split_cos``, the cosine
between the gradients of the validation rows' two halves, and the float-noise check (`FLOAT_NOISE`): a target
whose rows cancel (a trusted triple that prefers a text to itself, a batch whose advantages are all zero) has
a gradient of rounding error only, and a round scored against it drops nothing. What is model-specific is
injected:

- a `TargetSource`: this process's validation rows and token weights w at θ(k) (fresh responses, cached
  ones, gold references, ...);
- a `SequenceLogprobs`: per-token log-probs of given responses under the model;
- a `PerSampleLoss`, per call: the loss L_i of chosen batch rows, exactly as the update's first step sees it.

All processes must call `IIFStage.select` together: it reduces the target and gathers the scores.

Scoring runs on the unwrapped model and forms no parameter gradient (the hooks differentiate only as far as
the layers' outputs), so it needs no ``no_sync``, and must not enter one: trl scores inside the first
micro-batch of an accumulation window, where Accelerate's FSDP2 ``no_sync`` would switch gradient sync back on
at its exit, and that micro-batch's backward would then reduce-scatter early.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from llm_iif.attribution.filters import filter_mask
from llm_iif.attribution.gradients import grad_cosine, grad_dot
from llm_iif.attribution.precondition import Preconditioner
from llm_iif.attribution.influence import (GroupGradients, PerSampleLoss, PerSampleLossAndTarget, SequenceLogprobs,
                                           TargetSource, TargetBatch, cross_fitted_dots, influence_scores,
                                           target_gradient_parts)
from llm_iif.recipes import IIFConfig
from llm_iif.core.distributed import gather_values, sum_gradients
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.core.timer import PhaseTimer

logger = logging.getLogger(__name__)

FLOAT_NOISE = 1e-5
"""A target gradient whose norm is at most this fraction of its magnitude (`GroupGradients`: its rows' gradients
summed by the sign of their terms, apart) is float noise, and its round drops nothing. Rows that cancel leave
only rounding error, of the order of fp32's epsilon (1.2e-7) times the magnitude; 1e-5 leaves room for that
error to add up over tokens, rows and processes. Real targets sit orders of magnitude above it (their norm is a
sizeable fraction of their magnitude)."""


@dataclass
class Selection:
    """What the stage decided for this process's B samples."""
    keep: torch.Tensor                  # [B] bool: the update trains on these
    influence: torch.Tensor | None      # [B] I_i, or None when nothing was scored (mode random)
    metrics: dict                       # kept_fraction, filtered, influence_mean, ..., over all processes


class IIFStage:
    """Score a batch against the validation target at θ(k) and decide, once over all processes, what to keep.

    ``config`` is the recipe's ``iif`` section (mode, p, min_split_cos, score_batch_size, target_source, folds).
    ``target_source`` may be None with ``target_source: batch``. ``generator`` draws the random modes'
    choices; it must be seeded the same on every process.
    """

    def __init__(self, config: IIFConfig, accelerator: Accelerator, target_source: TargetSource | None,
                 sequence_logprobs: SequenceLogprobs, guard: NonfiniteGuard, generator: torch.Generator):
        self.config, self.accelerator = config, accelerator
        self.target_source, self.sequence_logprobs = target_source, sequence_logprobs
        self.guard, self.generator = guard, generator
        self.timer = PhaseTimer()
        self.target_rows: TargetBatch | None = None  # the validation rows of the last target gradient
        # (norm, magnitude) of the last target gradient; with the batch source, of the fold's nearest to noise
        self.target_norms: tuple[float, float] | None = None

    def select(self, model: nn.Module, per_sample_loss: PerSampleLoss | PerSampleLossAndTarget,
               batch_size: int, precondition: Preconditioner | None = None,
               groups: torch.Tensor | None = None) -> Selection:
        """Influence scores and the keep-mask for this process's ``batch_size`` samples.

        ``model`` may be wrapped (DDP); scoring runs on the unwrapped module, outside gradient sync. Samples
        with a NaN or inf score are never kept and are reported to the guard. With ``target_source: batch``,
        ``per_sample_loss`` must also return each row's target term (a `PerSampleLossAndTarget`).
        ``precondition`` (`llm_iif.attribution.precondition`) is applied once to the target gradient.
        ``groups`` [B]: ids, unique over all processes, of groups of samples that the batch target folds
        together (GRPO's completions of one prompt); None folds by global row.
        """
        self.timer = PhaseTimer()
        if self.config.mode == "random":
            return self.selection(None, math.nan, batch_size, preconditioned=False)
        influence, split_cos = self.influence(model, per_sample_loss, batch_size, precondition, groups=groups)
        return self.selection(influence, split_cos, batch_size, preconditioned=precondition is not None)

    def selection(self, influence: torch.Tensor | None, split_cos: float, batch_size: int,
                  preconditioned: bool) -> Selection:
        """The one filter decision over all processes from this process's [B] ``influence`` (None: the batch
        target had a fold without rows, or ``mode: random``, which scores nothing), with the target's
        reliability: ``split_cos`` and the float-noise check of the last target gradient."""
        cfg = self.config
        metrics, filtering = {}, True
        if cfg.mode != "random":
            metrics["target_split_cos"], metrics["preconditioned"] = split_cos, int(preconditioned)
            # None: the batch target had a fold without rows (fewer groups than folds), so nothing is dropped
            filtering = influence is not None and not self._target_is_noise() and (
                cfg.min_split_cos is None or split_cos >= cfg.min_split_cos)
        keep, everyone = self._decide(influence, batch_size, cfg.mode if filtering else "none")
        metrics["kept_fraction"] = everyone["keep"].float().mean().item()
        metrics["filtered"] = int(filtering)
        if influence is not None:
            scored = everyone["influence"][everyone["scored"]]
            metrics["influence_mean"] = scored.mean().item()
            metrics["influence_neg_fraction"] = (scored < 0).float().mean().item()
        metrics.update(getattr(self.target_source, "metrics", {}))  # e.g. its time_val_*_s, target_ess
        metrics.update(self.timer.as_metrics())  # time_target_s (not with the batch source), time_scoring_s
        if influence is not None:
            metrics["time_influence_s"] = sum(self.timer.seconds.values())
        return Selection(keep, influence, metrics)

    def influence(self, model: nn.Module, per_sample_loss: PerSampleLoss | PerSampleLossAndTarget,
                  batch_size: int, precondition: Preconditioner | None = None,
                  rows: TargetBatch | None = None, groups: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float]:
        """([B] influence scores, target_split_cos) of this process's samples, without filtering; (None, NaN)
        when the batch target has a fold without rows, so that some samples would have no target.

        The target is built from the source's rows at θ(k), or from ``rows`` when given (the rows of an
        earlier call, `target_rows`, so that a second scoring sees the same target); ignored with the batch
        source, whose rows are the batch itself. ``groups``: as in `select`.
        """
        if self.config.target_source == "batch":
            return self.cross_fitted_scores(model, per_sample_loss, batch_size, precondition, groups)
        target, split_cos = self.target_gradient(model, rows)
        return self._scores(model, per_sample_loss, batch_size, precondition(target) if precondition else target), \
            split_cos

    def state_dict(self) -> dict:
        """The target source's state, when it keeps any between rounds (cached responses)."""
        return self.target_source.state_dict() if hasattr(self.target_source, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.target_source, "load_state_dict"):
            self.target_source.load_state_dict(state)

    def _scores(self, model: nn.Module, per_sample_loss: PerSampleLoss, batch_size: int,
                target: dict[str, torch.Tensor]) -> torch.Tensor:
        acc = self.accelerator
        with self.timer.phase("scoring"), acc.autocast(), dropout_off(acc.unwrap_model(model)):
            return influence_scores(acc.unwrap_model(model), per_sample_loss, batch_size, target,
                                    self.config.score_batch_size, acc.device, self._idle_pass)

    def cross_fitted_scores(self, model: nn.Module, loss_and_target: PerSampleLossAndTarget,
                            batch_size: int, precondition: Preconditioner | None = None,
                            groups: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float]:
        """[B] influence of each sample on the target built from the other folds of the whole batch (each fold's
        gradient preconditioned, when given), and the cosine between the even and the odd folds' gradients.

        Sample i's fold: `folds_of`."""
        acc, folds = self.accelerator, self.config.folds
        self.target_norms = None
        fold = self.folds_of(batch_size, groups)
        if fold is None:
            return None, math.nan
        # one forward serves the target and the scores
        with self.timer.phase("scoring"), acc.autocast(), dropout_off(acc.unwrap_model(model)):
            dots, parts, in_target = cross_fitted_dots(acc.unwrap_model(model), loss_and_target, batch_size, fold,
                                                       folds, self.config.score_batch_size,
                                                       lambda sums: self.fold_targets(sums, precondition),
                                                       acc.device, self._idle_pass)                   # [B, K]
        return self.cross_fitted_influence(dots, parts, fold, in_target)

    def folds_of(self, batch_size: int, groups: torch.Tensor | None) -> torch.Tensor | None:
        """[B] each sample's fold of the batch target: its group id (``groups``) or else its global row index,
        mod K, so that N processes fold as one would; None when some fold has no row on any process."""
        acc, folds = self.accelerator, self.config.folds
        if groups is None:
            _, offset = gather_values(acc, torch.zeros(batch_size))
            groups = torch.arange(batch_size) + offset
        fold = groups.cpu().long() % folds
        if (acc.reduce(torch.bincount(fold, minlength=folds).float().to(acc.device), "sum") == 0).any():
            return None
        return fold

    def fold_targets(self, sums: GroupGradients,
                     precondition: Preconditioner | None = None) -> list[dict[str, torch.Tensor]]:
        """The folds' target gradients G_j from this process's `GroupGradients` of them: summed over processes,
        each sample's target (all folds but its own) checked for float noise, then each preconditioned."""
        acc, folds = self.accelerator, self.config.folds
        parts = sum_gradients(acc, *sums.parts)
        magnitudes = acc.reduce(sums.magnitudes.to(acc.device), "sum").tolist()
        others = [(parts[:k] + parts[k + 1:], magnitudes[:k] + magnitudes[k + 1:]) for k in range(folds)]
        self.target_norms = min(((_norm(_summed(gradients)), sum(scales)) for gradients, scales in others),
                                key=_noise_ratio)
        return [precondition(part) if precondition else part for part in parts]

    def cross_fitted_influence(self, dots: torch.Tensor, parts: list[dict[str, torch.Tensor]], fold: torch.Tensor,
                               in_target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """([B] influence, target_split_cos) from the dot products ``dots`` [B, K] of this process's samples
        with the K folds' gradients ``parts``: I_i = Σ_{j≠k(i)} ⟨G_j, ∇L_i⟩ / (N − N_k(i)), N counting the rows
        in the target (``in_target`` [B]) over all processes; the cosine is the even folds' against the odd."""
        acc, folds = self.accelerator, self.config.folds
        self._flag_left_out_rows(int((~in_target).sum()), len(in_target))
        rows_per_fold = acc.reduce(torch.bincount(fold[in_target], minlength=folds).float().to(acc.device), "sum")
        fold = fold.to(dots.device)
        own = dots.gather(1, fold[:, None]).squeeze(1)
        influence = (dots.sum(dim=1) - own) / (rows_per_fold.sum() - rows_per_fold[fold])
        even, odd = (_summed(parts[parity::2]) for parity in (0, 1))
        return influence, grad_cosine(even, odd)

    def target_gradient(self, model: nn.Module, rows: TargetBatch | None = None) -> tuple[dict[str, torch.Tensor], float]:
        """∇L_val over the scored parameters (LoRA, else trainable Linear layers) at θ(k), from every process's validation rows.

        ``rows``: this process's target rows; None asks the target source for the round's rows. Either way
        they are kept as ``target_rows``. Returns (target {name: tensor}, cosine between the two halves'
        gradients). The source's own time (generation, reward, forward) is in its ``metrics``; the
        gradient's in ``time_target_s``."""
        acc = self.accelerator
        rows = rows if rows is not None else self.target_source(acc.unwrap_model(model))
        self.target_rows = rows
        with self.timer.phase("target"):
            with acc.autocast(), dropout_off(acc.unwrap_model(model)):
                halves, left_out = target_gradient_parts(
                    acc.unwrap_model(model), rows, self.sequence_logprobs, torch.arange(len(rows)) % 2, 2,
                    self.config.score_batch_size, self._idle_pass)
            half_a, half_b = sum_gradients(acc, *halves.parts)
            magnitude = acc.reduce(halves.magnitudes.sum().to(acc.device), "sum").item()
            n_total = self._flag_left_out_rows(left_out, len(rows))
        total = _summed([half_a, half_b])
        self.target_norms = (_norm(total), magnitude)
        return {name: t / n_total for name, t in total.items()}, grad_cosine(half_a, half_b)

    def _idle_pass(self, model: nn.Module) -> torch.Tensor:
        """[1] a zero term through ``model`` from a stand-in row (token 0 after token 0): the pass this process
        runs while another still scores rows of its own (`llm_iif.attribution.influence.agreed_passes`)."""
        token = torch.zeros(1, 1, dtype=torch.long, device=self.accelerator.device)
        mask = torch.ones_like(token)
        return 0.0 * self.sequence_logprobs(model, token, mask, token, mask).sum(dim=1)

    def _target_is_noise(self) -> bool:
        """Whether the last target gradient is float noise (`FLOAT_NOISE`), with a warning: its scores are
        rounding error, and filtering on them would drop samples at random."""
        if self.target_norms is None or _noise_ratio(self.target_norms) > FLOAT_NOISE:
            return False
        norm, magnitude = self.target_norms
        if not self.accelerator.is_main_process:
            return True
        if magnitude == 0:
            logger.warning("IIF target: its rows' gradients are all 0 (their advantages are, say), so nothing is "
                           "dropped this round")
        else:
            logger.warning("IIF target: its gradient is float noise, so nothing is dropped this round: its norm, "
                           "%.3g, is at most %g of the %.3g its rows' gradients add up to before they cancel "
                           "(trusted triples that prefer a text to itself, say)", norm, FLOAT_NOISE, magnitude)
        return True

    def _flag_left_out_rows(self, left_out: int, rows: int) -> float:
        """Report this process's target rows left out as NaN or inf to the guard (summed over processes);
        returns how many rows, over all processes, the target keeps."""
        counts = self.accelerator.reduce(torch.tensor([float(left_out), float(rows)], device=self.accelerator.device),
                                         "sum").tolist()
        self.guard.flag("target", int(counts[0]), f"IIF target: NaN or inf terms for {int(counts[0])} of "
                        f"{int(counts[1])} target rows, left out of the target", counts[0] == counts[1])
        return counts[1] - counts[0]

    def _decide(self, influence: torch.Tensor | None, batch_size: int, mode: str) -> tuple[torch.Tensor, dict]:
        """One filter decision over every process's scores, so N processes filter exactly as one would.
        Returns this process's [B] keep-mask and the whole batch's influence, scored and keep tensors."""
        acc = self.accelerator
        local = influence if influence is not None else torch.zeros(batch_size, device=acc.device)
        everyone, offset = gather_values(acc, local)
        scored = torch.isfinite(everyone)
        bad = int((~scored).sum())
        self.guard.flag("influence", bad, f"influence scores are NaN or inf for {bad} of {len(everyone)} samples",
                        not scored.any())
        keep_all = torch.zeros_like(scored)  # a sample without a usable score is not trained on
        if len(everyone):  # no process has a row when a group filter kept nothing this batch
            keep_all[scored] = filter_mask(everyone[scored], mode, self.config.p, self.generator)
        keep = keep_all[offset:offset + batch_size].to(acc.device)
        return keep, {"influence": everyone, "scored": scored, "keep": keep_all}


@contextmanager
def dropout_off(model: nn.Module):
    """The model in eval mode while gradients are scored, so that dropout does not make the scores random (it
    also turns off gradient checkpointing, which transformers only applies in training mode). Afterwards each
    module gets its own mode back: a policy in eval mode keeps its decoder layers in training mode to checkpoint
    them (`llm_iif.lm.policy.enable_gradient_checkpointing`), which ``model.train(False)`` would undo."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def active_dropout(model: nn.Module) -> float | None:
    """The rate of ``model``'s first dropout module that drops anything, or None."""
    return next((m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0), None)


def _summed(gradients: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: sum(g[name] for g in gradients) for name in gradients[0]}


def _norm(gradient: dict[str, torch.Tensor]) -> float:
    return math.sqrt(grad_dot(gradient, gradient).item())


def _noise_ratio(norms: tuple[float, float]) -> float:
    """A target's norm over its magnitude (`GroupGradients`); 0 for a target of rows whose terms are all 0."""
    norm, magnitude = norms
    return norm / magnitude if magnitude > 0 else 0.0
