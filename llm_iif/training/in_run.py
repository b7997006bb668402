"""In-run scoring for the PPO trainer (``iif.scoring: in-run``): one pass at θ(k) scores the batch and makes
the first epoch's gradients.

The separate path runs a scoring pass (a forward and backward over every sample at θ(k)), then the PPO epochs
over the kept samples, the first of them starting from θ(k) again. In-run scoring merges the scoring pass and
the first epoch. Its pass keeps, for every sample i, the gradient of its policy term P_i = Σ_t pg_{i,t} and
value term V_i = Σ_t vf_{i,t} (over the LoRA layers and the value head; one term P_i + c_v V_i with
``iif.train_grad: full``), and then:

1. **Scores.** ∇L_i = ∇P_i / ℓ (``train_grad: policy``) or ∇(P_i + c_v V_i) / ℓ (``full``) over the LoRA
   parameters, ℓ the batch's mean response length, dotted with the target as the separate pass does. The
   batch target's fold sums come from the same forward (one more backward); the fresh, cached and preference
   targets are built first, as the separate pass builds them.
2. **Decision**, once over all processes (`IIFStage.selection`).
3. **First epoch.** Each process's kept rows are split into the update's M minibatches, and step m takes the
   gradient of the minibatch's token-mean loss from the kept gradients,

       Σ_{i in m} (∇P_i + c_v ∇V_i) / Σ_{i in m} |y_i|      (both sums over every process's rows)

   Epochs 2..E then train on the kept samples as the separate path does.

What is exact and what is not:
- the scores and the decision are exactly the separate pass's;
- the first step is exactly the update's first step (at θ(k) its clip is inactive). The later steps of the
  first epoch take their gradients at θ(k) too, where the update takes them at the parameters the earlier
  steps reached: they are stale by up to M−1 steps. With one minibatch per epoch the update is exact;
- over processes a step normalises by the minibatch's tokens on every process, where DDP averages each
  process's own token mean; the two agree when the processes hold as many tokens.

Each process holds its rows' gradients until the first epoch ends: rows × trainable parameters × the terms,
in fp32. The pass runs chunk by chunk (``iif.score_batch_size`` rows) with dropout off, as the scoring pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from llm_iif.attribution.gradients import RowGradients, scored_layers, scored_parameters, trainable_outside
from llm_iif.attribution.influence import row_gradients
from llm_iif.attribution.precondition import Preconditioner
from llm_iif.attribution.stage import IIFStage, Selection, active_dropout, dropout_off
from llm_iif.recipes import PPOConfig, Recipe
from llm_iif.core.distributed import gradients_held_elsewhere
from llm_iif.core.errors import UserError
from llm_iif.core.records import Advantages, Rollout
from llm_iif.core.timer import PhaseTimer
from llm_iif.lm.iif import STATISTICS, ppo_terms

@dataclass
class FirstEpoch:
    """Rows' gradients at θ(k), from which the first epoch's steps are made (module docstring, step 3)."""
    gradients: RowGradients   # [R, D] ∇(P_i + c_v V_i) over every trainable parameter
    tokens: torch.Tensor      # [R] response tokens per row
    statistics: torch.Tensor  # [R, 5] per-row sums over tokens of the policy and value losses, their clip
    #                           indicators and the approximate KL, as `UpdateStats` orders them

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, keep: torch.Tensor) -> "FirstEpoch":
        """The rows where ``keep`` [R] is true."""
        rows = keep.nonzero().flatten().cpu()
        gradients = self.gradients
        return FirstEpoch(RowGradients(gradients.names, gradients.shapes, gradients.matrix[rows.to(gradients.matrix.device)]),
                          self.tokens[rows], self.statistics[rows])

    def set_gradients(self, rows: torch.Tensor, model: nn.Module, accelerator: Accelerator) -> torch.Tensor:
        """Set ``.grad`` of ``model``'s trainable parameters to one step's gradient, of this process's ``rows``
        and every other process's minibatch; returns this process's statistics of the step [6] (its token
        means, then 1, or zeros when it holds no row of the minibatch), to add up as the update does."""
        matrix = self.gradients.matrix
        index = rows.to(matrix.device)
        tokens = self.tokens[rows.cpu()].sum().to(matrix)
        summed = accelerator.reduce(torch.cat([matrix[index].sum(dim=0), tokens[None]]).to(accelerator.device), "sum")
        gradient = summed[:-1] / summed[-1].clamp(min=1.0)
        parameters = dict(model.named_parameters())
        for name, part in self.gradients.unflatten(gradient).items():
            parameters[name].grad = part.to(parameters[name].dtype).reshape(parameters[name].shape)
        if len(rows) == 0:
            return torch.zeros(STATISTICS + 1, dtype=torch.float64, device=accelerator.device)
        means = self.statistics[rows.cpu()].sum(dim=0) / self.tokens[rows.cpu()].sum().clamp(min=1)
        return torch.cat([means.double(), torch.ones(1, dtype=torch.float64)]).to(accelerator.device)


class InRunScoring:
    """Score a rollout and make its first epoch from one pass at θ(k) (module docstring). ``stage`` is the
    trainer's IIF stage, whose target, folds and filter it uses."""

    def __init__(self, stage: IIFStage, accelerator: Accelerator, cfg: PPOConfig, train_grad: str,
                 score_batch_size: int):
        self.stage, self.accelerator, self.cfg = stage, accelerator, cfg
        self.train_grad, self.score_batch_size = train_grad, score_batch_size

    def select(self, policy: nn.Module, rollout: Rollout, advantages: Advantages, tokens_per_sample: float,
               target_weights: torch.Tensor | None, precondition: Preconditioner | None) -> tuple[Selection, FirstEpoch]:
        """The stage's decision for this process's B rows and the kept rows' `FirstEpoch`. ``target_weights``
        [B, T]: the batch target's token weights (`llm_iif.lm.iif.rollout_target_rows`), None for the other
        sources; ``tokens_per_sample``: ℓ of the module docstring, over every process."""
        stage, acc = self.stage, self.accelerator
        stage.timer = PhaseTimer()
        model = acc.unwrap_model(policy)
        target, split_cos, fold = None, math.nan, None
        if target_weights is not None:
            stage.target_norms = None
            fold = stage.folds_of(len(rollout), None)
        else:
            target, split_cos = stage.target_gradient(policy)
            target = precondition(target) if precondition else target
        statistics: list[torch.Tensor] = []

        def terms(model: nn.Module, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            batch = rollout.select(rows)
            logits, values = model(batch.input_ids, batch.attention_mask)
            step = ppo_terms(logits, values, batch, advantages.advantages[rows], advantages.returns[rows], self.cfg)
            mask = batch.response_mask.to(step.policy.dtype)
            statistics.append(torch.stack([(term.detach() * mask).sum(dim=1) for term in step.statistics()], dim=1))
            policy_term, value_term = (step.policy * mask).sum(dim=1), (step.value * mask).sum(dim=1)
            target_terms = None if fold is None else -(target_weights[rows] * step.logprobs * mask).sum(dim=1)
            if self.train_grad == "full":
                return [policy_term + self.cfg.vf_coef * value_term], target_terms
            return [policy_term, value_term], target_terms

        layers = {**scored_layers(model), "value_head": model.value_head}
        folds = stage.config.folds
        n_terms = 1 if self.train_grad == "full" else 2
        with stage.timer.phase("scoring"), acc.autocast(), dropout_off(model):
            gradients, fold_sums, in_target = row_gradients(model, layers, terms, n_terms, len(rollout),
                                                            self.score_batch_size, fold, folds if fold is not None else 0)
        # The scored (LoRA) columns first, so that the scores read a view of the update's matrix, not a copy.
        scored_names = list(scored_parameters(model))
        names = scored_names + [name for name, _ in model.value_head.named_parameters(prefix="value_head")
                                if name in gradients[0]]
        update = RowGradients.of(gradients[0], names)
        width = sum(shape.numel() for shape in update.shapes[:len(scored_names)])
        scored = RowGradients(scored_names, update.shapes[:len(scored_names)], update.matrix[:, :width])
        value_terms = RowGradients.of(gradients[1], names).matrix if n_terms == 2 else None
        del gradients
        with stage.timer.phase("scoring"):
            if target is not None:
                influence = scored.matrix @ scored.flatten(target) / tokens_per_sample
            elif fold is not None:
                parts = stage.fold_targets(fold_sums, precondition)
                dots = scored.matrix @ torch.stack([scored.flatten(part) for part in parts]).T / tokens_per_sample
                influence, split_cos = stage.cross_fitted_influence(dots, parts, fold, in_target)
            else:  # the batch target had a fold without rows: nothing is dropped
                influence = None
        if value_terms is not None:  # train_grad policy: the scores are the policy term's, the update takes both
            update.matrix.add_(value_terms, alpha=self.cfg.vf_coef)
        selection = stage.selection(influence, split_cos, len(rollout), preconditioned=precondition is not None)
        mask = rollout.response_mask
        first_epoch = FirstEpoch(update, mask.sum(dim=1).cpu(), torch.cat(statistics).cpu() if statistics
                                 else torch.zeros(0, STATISTICS))
        return selection, first_epoch.select(selection.keep)


def check_in_run(recipe: Recipe, policy: nn.Module, accelerator: Accelerator) -> None:
    """One-line errors for settings that in-run scoring cannot honour; ``policy`` unwrapped."""
    separate = "; or set iif.scoring: separate"
    if recipe.iif.mode == "random":
        raise UserError("iif.scoring: in-run with iif.mode random: random dropping scores nothing; expected "
                        "iif.scoring: separate")
    if recipe.trusted.dpo_coef:
        raise UserError(f"trusted.dpo_coef: {recipe.trusted.dpo_coef}; in-run scoring makes the first epoch from "
                        f"the PPO terms alone: expected 0 with in-run scoring{separate}")
    if accelerator.scaler is not None:
        raise UserError(f"run.mixed_precision: fp16; in-run scoring sets the first epoch's gradients itself, "
                        f"without fp16's loss scaling: expected no or bf16{separate}")
    held_elsewhere = gradients_held_elsewhere(accelerator, policy)
    if held_elsewhere:
        raise UserError(held_elsewhere + separate)
    dropout = active_dropout(policy)
    if dropout:
        raise UserError(f"dropout p={dropout} in the model (or lora.dropout); in-run scoring makes the first "
                        f"epoch without dropout, as it scores: expected a model without dropout{separate}")
    unscored = trainable_outside(policy, [*scored_parameters(policy).values(), *policy.value_head.parameters()])
    if unscored:
        raise UserError(f"iif.scoring: in-run makes gradients for the LoRA layers and the value head only, and "
                        f"'{unscored[0]}' is trainable too ({len(unscored)} such){separate}")
