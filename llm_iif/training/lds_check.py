"""The influence-accuracy check of the LM trainer (``iif.lds_rounds``): do a round's scores predict its update?

At θ(k), after the IIF stage has scored the round's batch and before the real update:

    S_1..S_M   random half-subsets of the batch (M = ``iif.lds_subsets``)
    Δf_m       the real change of the target f after the round's update (same optimiser state, epochs,
               minibatch order and seeds) on S_m alone, from θ(k)
    LDS        Spearman(Σ_{i∈S_m} I_i, Δf_m) over m, for plain, Adam-preconditioned and random scores I

f is the target the stage scored against, on the same rows: the batch itself with ``target_source: batch``,
the round's validation rows otherwise. The trainer's state is restored after every redo, so the run trains
exactly as it would without the check. One process only: the redone updates are not split over processes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llm_iif.attribution.gradients import scored_parameters
from llm_iif.attribution.influence import target_value
from llm_iif.attribution.lds import predicted_changes, random_half_subsets, scores_report
from llm_iif.attribution.precondition import adam_preconditioner
from llm_iif.core.records import Advantages, Rollout
from llm_iif.lm.iif import rollout_target_rows

if TYPE_CHECKING:
    from llm_iif.training.trainer import PPOTrainer


@dataclass
class TrainingSnapshot:
    """Everything a round's update reads or changes: trainable parameters, optimiser state, the minibatch
    generator and torch's global RNG."""
    parameters: list[torch.Tensor]
    optimizer: dict
    minibatch_rng: torch.Tensor
    global_rng: torch.Tensor

    @classmethod
    def take(cls, trainer: PPOTrainer) -> TrainingSnapshot:
        return cls([p.detach().clone() for p in trainer.trainable], copy.deepcopy(trainer.optimizer.state_dict()),
                   trainer.parts.minibatch_generator.get_state(), torch.get_rng_state())

    def restore(self, trainer: PPOTrainer) -> None:
        with torch.no_grad():
            for param, saved in zip(trainer.trainable, self.parameters):
                param.copy_(saved)
        trainer.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        trainer.parts.minibatch_generator.set_state(self.minibatch_rng)
        torch.set_rng_state(self.global_rng)


def linear_datamodeling_check(trainer: PPOTrainer, rollout: Rollout, advantages: Advantages, seed: int
                              ) -> tuple[dict, dict]:
    """The check of one round (see the module docstring), on the trainer's state at θ(k); the state is
    restored before returning.

    Returns (metrics, details). metrics: ``lds_plain``, ``lds_preconditioned`` (absent before the optimiser's
    first step, where preconditioned scores are the plain ones), ``lds_random``, each with ``_low`` and
    ``_high`` (95% bootstrap interval over subsets); ``lds_drop_negatives_gain``: Δf of training on the samples
    with a non-negative score (the kind the run filters with) minus Δf of training on all; and
    ``lds_sign_agreement``: 1 when that gain is positive, as the scores predict. details: each subset's
    predicted sums per kind and its real change, for the report's figure.
    """
    stage, iif = trainer.iif, trainer.recipe.iif
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    n = len(rollout)
    generator = torch.Generator().manual_seed(seed)
    subsets = random_half_subsets(n, iif.lds_subsets, generator)
    rows = (rollout_target_rows(iif.target, rollout, advantages, trainer.accelerator)
            if iif.target_source == "batch" else stage.target_rows)
    snapshot = TrainingSnapshot.take(trainer)

    losses = trainer.per_sample_losses(rollout, advantages)
    scores = {"plain": stage.influence(trainer.policy, losses, n, None, rows)[0].cpu()}
    precondition = adam_preconditioner(trainer.optimizer, scored_parameters(policy))
    if precondition is not None:
        scores["preconditioned"] = stage.influence(trainer.policy, losses, n, precondition, rows)[0].cpu()
    used = scores["preconditioned" if iif.precondition == "adam" and precondition is not None else "plain"]
    scores["random"] = torch.randn(n, generator=generator)

    def f() -> float:
        return target_value(policy, rows, stage.sequence_logprobs, iif.score_batch_size) / len(rows)

    before = f()

    def target_change(keep: torch.Tensor) -> float:
        snapshot.restore(trainer)
        trainer.update(rollout.select(keep), advantages.select(keep))
        return f() - before

    actual = torch.tensor([target_change(subset) for subset in subsets], dtype=torch.float64)
    metrics, details = {}, {"actual": actual.tolist(), "predicted": {}}
    for kind, (lds, (low, high)) in scores_report(scores, subsets, actual, generator).items():
        metrics[f"lds_{kind}"], metrics[f"lds_{kind}_low"], metrics[f"lds_{kind}_high"] = lds, low, high
        details["predicted"][kind] = predicted_changes(scores[kind], subsets).tolist()
    gain = target_change(used >= 0) - target_change(torch.ones(n, dtype=torch.bool))
    metrics["lds_drop_negatives_gain"] = gain
    metrics["lds_sign_agreement"] = int(gain > 0)
    snapshot.restore(trainer)
    return metrics, {**details, **metrics}
