"""In-run scoring for `IIFGRPOTrainer` (``iif.scoring: in-run``): IIF's scores from the update's own backward.

With ``num_iterations`` 1 and one optimiser step per generation batch (``steps_per_generation`` equal to
``gradient_accumulation_steps``), every candidate completion takes exactly one training forward and backward,
at the parameters θ(k) that sampled it. The hooks of `LayerGradientCapture` keep each completion's gradient g_i
over the scored (LoRA) parameters from that backward, and at the end of the accumulation window, before
clipping and the optimiser step:

1. **Scores.** trl's loss (with `llm_iif.grpo.losses.rescaled_to_kept`) gives completion i the share P·κ·L_i of its
   process's loss, L_i as in `llm_iif.grpo.losses` over the candidates, with P processes and κ = 1, except
   for dr_grpo and luspo, which trl normalises by the rows of a micro-batch, padding included (κ = candidates
   over all rows). So ∇L_i = g_i / (P κ). The fresh and preference targets are built before training, as the
   separate pass builds them. The batch target's fold sums need no pass of their own: at θ(k) and with β = 0
   the gradient of completion i's target term is ∇T_i = ∇L_i / (c_i s) (c_i its normaliser, s the policy
   term's scale), so G_j = Σ_{i in fold j} ∇T_i.
2. **Decision**, once over all processes (`IIFStage.selection`).
3. **Correction.** The accumulated gradient becomes the kept completions' alone, renormalised over them, as the
   separate path trains (λ: the candidates' count over the kept ones', of completions or of tokens as the loss
   type normalises)::

       ∇ ← mean over processes of Σ_{i kept} (λ / κ) g_i

   one all-reduce of the scored gradient, which replaces the one DDP made. For dr_grpo and luspo the kept completions are normalised by their own
   count, where the separate path counts the padding rows it adds too.

Each process holds its generation batch's per-sample gradients until the window ends: rows × scored parameters,
in fp32. This module owns the window; the trainer feeds it micro-batches and applies its decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from llm_iif.attribution.gradients import LayerGradientCapture, RowGradients, scored_layers, scored_parameters
from llm_iif.attribution.influence import GroupGradients
from llm_iif.attribution.precondition import Preconditioner
from llm_iif.attribution.stage import IIFStage, Selection
from llm_iif.grpo.losses import ROW_MEAN_LOSSES


@dataclass
class WindowRows:
    """This process's R rows of a generation batch cut to its candidates (`llm_iif.grpo.batches.kept_rows`): the
    first ``candidates`` rows, then padding rows that train on nothing."""
    candidates: int
    groups: torch.Tensor        # [candidates] the batch target's group ids
    advantages: torch.Tensor    # [candidates]
    normalisers: torch.Tensor   # [candidates] c_i (`completion_normalisers`, over the candidates)
    tokens: torch.Tensor        # [candidates] loss tokens per completion
    kappa: float                # κ of the module docstring
    policy_scale: float         # s: cispo's min(1, ε_high), else 1


class InRunScoring:
    """The accumulation window of one generation batch: per-sample gradients in, a decision and a corrected
    gradient out. ``loss_type`` is trl's; ``target`` of `open` is the fresh or preference target gradient
    (preconditioned), or None for the batch target."""

    def __init__(self, stage: IIFStage, accelerator: Accelerator, loss_type: str):
        self.stage, self.accelerator, self.loss_type = stage, accelerator, loss_type
        self.rows: WindowRows | None = None
        self._target: dict[str, torch.Tensor] | None = None
        self._split_cos = float("nan")
        self._capture: LayerGradientCapture | None = None
        self._micro_batches: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self._rows_of_micro_batch: torch.Tensor | None = None

    @property
    def is_open(self) -> bool:
        return self.rows is not None

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    def open(self, rows: WindowRows, target: dict[str, torch.Tensor] | None, split_cos: float) -> None:
        """Start the window of a generation batch whose rows are ``rows``; ``target`` and ``split_cos`` come
        from the stage's `IIFStage.target_gradient`, timed by the stage's timer, which the caller resets."""
        self.rows, self._target, self._split_cos = rows, target, split_cos
        self._micro_batches = []

    def start_micro_batch(self, model: nn.Module, batch_rows: torch.Tensor) -> None:
        """Capture the per-sample gradients of the coming training forward and backward, whose rows are
        ``batch_rows`` [b] (indices into the window's rows)."""
        unwrapped = self.accelerator.unwrap_model(model)
        self._capture = LayerGradientCapture(unwrapped, scored_layers(unwrapped)).__enter__()
        self._rows_of_micro_batch = batch_rows.detach().cpu()

    def end_micro_batch(self) -> None:
        """Keep the micro-batch's per-sample gradients (after its backward)."""
        capture, self._capture = self._capture, None
        try:
            self._micro_batches.append((self._rows_of_micro_batch, capture.per_sample_grads()))
        finally:
            capture.__exit__(None, None, None)

    def close(self, model: nn.Module, precondition: Preconditioner | None) -> Selection:
        """Score this process's candidates, decide over all processes and correct the accumulated gradient of
        ``model`` to the kept completions. The selection's keep and influence are [candidates]."""
        rows, acc = self.rows, self.accelerator
        self.rows = None
        with self.stage.timer.phase("scoring"):
            grads = self._window_gradients(rows)
            scale = acc.num_processes * rows.kappa  # g_i = P κ ∇L_i
            if self._target is not None:
                influence, split_cos = grads.matrix @ grads.flatten(self._target) / scale, self._split_cos
            else:
                influence, split_cos = self._cross_fitted(grads, rows, scale, precondition)
        selection = self.stage.selection(influence, split_cos, rows.candidates, preconditioned=precondition is not None)
        with self.stage.timer.phase("correction"):
            self._correct(model, grads, rows, selection.keep.cpu())
        selection.metrics.update(self.stage.timer.as_metrics())
        selection.metrics["time_influence_s"] = sum(self.stage.timer.seconds.values())
        return selection

    def _window_gradients(self, rows: WindowRows) -> RowGradients:
        """The window's per-sample gradients of its candidates, in row order (padding rows train on nothing)."""
        micro_batches, self._micro_batches = self._micro_batches, []
        first = micro_batches[0][1]
        names, shapes = list(first), [first[name].shape[1:] for name in first]
        row_ids = torch.cat([batch_rows for batch_rows, _ in micro_batches])
        matrix = torch.cat([torch.cat([grads[name].flatten(1) for name in names], dim=1) for _, grads in micro_batches])
        order = torch.argsort(row_ids)[:rows.candidates]  # candidates are rows 0..candidates-1; padding sorts last
        return RowGradients(names, shapes, matrix[order.to(matrix.device)])

    def _cross_fitted(self, grads: RowGradients, rows: WindowRows, scale: float,
                      precondition: Preconditioner | None) -> tuple[torch.Tensor | None, float]:
        """The batch target from the window's own gradients (module docstring, step 1)."""
        stage, folds = self.stage, self.stage.config.folds
        stage.target_norms = None
        fold = stage.folds_of(rows.candidates, rows.groups)
        if fold is None:
            return None, float("nan")
        matrix = grads.matrix
        term_scale = 1.0 / (scale * rows.normalisers.to(matrix.device) * rows.policy_scale)  # ∇T_i = term_scale_i g_i
        positive = (rows.advantages > 0).to(matrix)[:, None]
        weights = torch.nn.functional.one_hot(fold, folds).to(matrix) * term_scale[:, None]   # [candidates, K]
        signed = torch.cat([weights * positive, weights * (1.0 - positive)], dim=1)          # [candidates, 2K]
        by_sign = signed.T @ matrix                                                           # [2K, D]
        in_target = torch.ones(rows.candidates, dtype=torch.bool)
        if not by_sign.isfinite().all():  # a NaN or inf row spoils its fold: leave it out of every sum
            in_target = matrix.isfinite().all(dim=1).cpu()
            matrix = grads.matrix = torch.nan_to_num(matrix)
            by_sign = (signed * in_target[:, None].to(signed)).T @ matrix
        magnitudes = (by_sign[:folds].double().norm(dim=1) + by_sign[folds:].double().norm(dim=1)).cpu()
        sums = by_sign[:folds] + by_sign[folds:]
        parts = stage.fold_targets(GroupGradients([grads.unflatten(sums[k]) for k in range(folds)], magnitudes),
                                   precondition)
        dots = matrix @ torch.stack([grads.flatten(part) for part in parts]).T / scale       # [candidates, K]
        return stage.cross_fitted_influence(dots, parts, fold, in_target)

    def _correct(self, model: nn.Module, grads: RowGradients, rows: WindowRows, keep: torch.Tensor) -> None:
        """Step 3 of the module docstring: the accumulated gradient becomes the kept completions' alone. It is
        rebuilt from their gradients rather than corrected by the dropped ones', so that a dropped completion
        whose gradient is NaN or inf leaves nothing behind."""
        acc = self.accelerator
        counts = rows.tokens.float() if self.loss_type not in ROW_MEAN_LOSSES else torch.ones(rows.candidates)
        totals = acc.reduce(torch.stack([counts.sum(), counts[keep].sum()]).to(acc.device), "sum").tolist()
        factor = totals[0] / totals[1] / rows.kappa if totals[1] > 0 else 0.0  # λ / κ
        kept = keep.nonzero().flatten().to(grads.matrix.device)
        local = factor * grads.matrix[kept].sum(dim=0) if len(kept) else grads.matrix.new_zeros(grads.matrix.shape[1])
        gradient = acc.reduce(local.to(acc.device), "mean")  # as DDP averages the processes' gradients
        parameters = scored_parameters(acc.unwrap_model(model))
        for name, part in grads.unflatten(gradient).items():
            param = parameters[name]
            param.grad = part.to(param.dtype).reshape(param.shape)

