"""A conservative ensemble of reward models: the mean of their scores minus their standard deviation.

Coste et al. (ICLR 2024, "Reward Model Ensembles Help Mitigate Overoptimization") score with such lower
bounds: where the members disagree, which is where the policy has moved beyond their training data, the
reward is low, so the policy is not pulled towards what only some of them like. Members that share a flaw (the
same biased pairs) agree on it, and the ensemble keeps it.
"""

from __future__ import annotations

import torch


class ConservativeEnsembleReward:
    """``members``: two or more reward models (`reward_models.RewardModel`)."""

    def __init__(self, members: list):
        self.members = members

    def __call__(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        scores = torch.tensor([member(prompts, responses, **columns) for member in self.members],
                              dtype=torch.float64)  # [M, B]
        return (scores.mean(dim=0) - scores.std(dim=0)).tolist()
