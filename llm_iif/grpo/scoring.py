"""The attribution core's `IIFStage` fitted to trl's GRPO batches: the per-completion loss and target term it
scores, and IIF's decision over a generation batch's candidate completions, from a separate scoring pass
(`GRPOScoring.decide`) or from the update's own backward (`open_window`, then `close_window`;
`llm_iif.grpo.in_run`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from llm_iif.attribution.gradients import scored_parameters
from llm_iif.attribution.influence import SequenceLogprobs
from llm_iif.attribution.precondition import Preconditioner, adam_preconditioner, check_second_moments
from llm_iif.attribution.stage import IIFStage, Selection
from llm_iif.core.distributed import global_sum
from llm_iif.core.timer import PhaseTimer
from llm_iif.grpo.batches import kept_rows, loss_mask, rows_of
from llm_iif.grpo.in_run import InRunScoring, WindowRows
from llm_iif.grpo.losses import completion_losses, completion_normalisers, group_target_terms, token_losses


@dataclass(frozen=True)
class TrlLoss:
    """The settings of trl's GRPO loss that each completion's scored loss follows (`llm_iif.grpo.losses`)."""
    loss_type: str
    beta: float
    use_bias_correction_kl: bool
    epsilon_high: float
    importance_sampling_level: str
    max_completion_length: int

    @property
    def policy_scale(self) -> float:
        """s, the policy term's scale: cispo's min(1, ε_high), else 1."""
        return min(1.0, self.epsilon_high) if self.loss_type == "cispo" else 1.0


class GRPOScoring:
    """IIF over a generation batch's candidates. ``sequence_logprobs`` computes [b, T] log-probs as trl's loss
    does; ``optimizer`` returns trl's optimiser (made only when training starts), for ``iif.precondition:
    adam``; ``in_run`` is set with in-run scoring."""

    def __init__(self, stage: IIFStage, accelerator: Accelerator, loss: TrlLoss, sequence_logprobs: SequenceLogprobs,
                 optimizer: Callable[[], torch.optim.Optimizer], in_run: InRunScoring | None = None):
        self.stage, self.accelerator, self.loss = stage, accelerator, loss
        self.sequence_logprobs, self.optimizer, self.in_run = sequence_logprobs, optimizer, in_run
        self._candidates: torch.Tensor | None = None  # [B] the open window's candidates

    def preconditioner(self, model: nn.Module) -> Preconditioner | None:
        """P from trl's optimiser at θ(k) with ``iif.precondition: adam`` (None before its first step)."""
        if self.stage.config.precondition != "adam":
            return None
        check_second_moments(self.optimizer())
        return adam_preconditioner(self.optimizer(), scored_parameters(self.accelerator.unwrap_model(model)))

    def loss_and_target(self, batch: dict):
        """The `PerSampleLossAndTarget` of this process's rows of ``batch``: (L_i, -Σ_t log π(y_{i,t}) Â_i) in one
        forward; just L_i unless the target is the batch's own."""
        loss, acc = self.loss, self.accelerator
        mask = loss_mask(batch).float()
        advantages = batch["advantages"]
        num_completions = global_sum(acc, torch.tensor(float(len(mask))))
        normalisers = completion_normalisers(loss.loss_type, mask, num_completions, batch["num_items_in_batch"].item(),
                                             loss.max_completion_length)
        ratio = batch.get("importance_sampling_ratio") if loss.loss_type != "vespo" else None
        sequence_level = loss.importance_sampling_level == "sequence"

        def loss_and_target(model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logps = self.sequence_logprobs(model, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                           batch["completion_ids"][rows], batch["completion_mask"][rows])
            ref = batch["ref_per_token_logps"][rows] if loss.beta else None
            per_token = token_losses(logps, advantages[rows], ref, loss.beta, loss.use_bias_correction_kl,
                                     ratio[rows] if ratio is not None else None, loss.policy_scale,
                                     mask[rows] if sequence_level else None)
            return (completion_losses(per_token, mask[rows], normalisers[rows]),
                    group_target_terms(logps, mask[rows], advantages[rows]))

        if self.stage.config.target_source == "batch":
            return loss_and_target
        return lambda model, rows: loss_and_target(model, rows)[0]

    def decide(self, model: nn.Module, batch: dict, candidates: torch.Tensor, groups: torch.Tensor):
        """IIF's decision among this process's ``candidates`` [B] rows of ``batch`` (a group filter's kept rows,
        or every row with a finite reward), folded by ``groups`` [B], from a separate scoring pass: the
        keep-mask [B], the influence [B] (NaN where not scored) and the stage's metrics."""
        rows = candidates.nonzero().flatten()
        scored = batch if len(rows) == len(candidates) else rows_of(batch, rows)
        selection = self.stage.select(model, self.loss_and_target(scored), len(rows), self.preconditioner(model),
                                      groups=groups[rows.cpu()])
        return self._spread(selection, candidates)

    def open_window(self, model: nn.Module, batch: dict, candidates: torch.Tensor, groups: torch.Tensor,
                    chunks: int) -> dict:
        """In-run scoring: build a fresh or preference target at θ(k), cut ``batch`` to its ``candidates`` [B]
        (`kept_rows`, in ``chunks``) and open the window that `close_window` decides. The cut batch's rows carry
        their index (``iif_row``) through trl's shuffle."""
        stage, acc, loss = self.stage, self.accelerator, self.loss
        stage.timer = PhaseTimer()
        target, split_cos = None, math.nan
        if stage.config.target_source == "fresh":
            target, split_cos = stage.target_gradient(model)
            precondition = self.preconditioner(model)
            target = precondition(target) if precondition else target
        rows = candidates.nonzero().flatten()
        batch = kept_rows(batch, candidates, acc, chunks)
        count = len(rows)
        mask = loss_mask(batch)[:count].float()
        total_rows = global_sum(acc, torch.tensor(float(len(batch["advantages"]))))
        kappa = float(batch["iif_kept_rows"]) / total_rows if loss.loss_type in ("dr_grpo", "luspo") else 1.0
        normalisers = completion_normalisers(loss.loss_type, mask, int(batch["iif_kept_rows"]),
                                             batch["num_items_in_batch"].item(), loss.max_completion_length)
        self.in_run.open(WindowRows(count, groups[rows.cpu()], batch["advantages"][:count].float(), normalisers,
                                    mask.sum(dim=1), kappa, loss.policy_scale), target, split_cos)
        batch["iif_row"] = torch.arange(len(batch["advantages"]), device=batch["advantages"].device)
        self._candidates = candidates
        return batch

    def close_window(self, model: nn.Module):
        """In-run scoring at the end of the window's accumulation, before clipping and the optimiser step: the
        decision, with the accumulated gradient corrected to the kept completions'. Returns what `decide`
        returns, over the rows of the batch `open_window` was given."""
        candidates, self._candidates = self._candidates, None
        return self._spread(self.in_run.close(model, self.preconditioner(model)), candidates)

    @staticmethod
    def _spread(selection: Selection, candidates: torch.Tensor):
        """The selection over the ``candidates`` [B] spread to every row of the batch."""
        rows = candidates.nonzero().flatten()
        keep = torch.zeros_like(candidates)
        keep[rows] = selection.keep.to(keep.device)
        influence = torch.full(candidates.shape, torch.nan)
        if selection.influence is not None:
            influence[rows.cpu()] = selection.influence.float().cpu()
        return keep, influence, selection.metrics
