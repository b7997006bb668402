"""A PPO round's logged metrics over every process's samples, from its rollout and update."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from llm_iif.core import ppo
from llm_iif.core.records import Advantages, Rollout, UpdateStats


def round_metrics(k: int, rollout: Rollout, advantages: Advantages, update_stats: UpdateStats, kl_coef: float,
                  accelerator: Accelerator) -> dict:
    """Round ``k``'s metrics over all processes' samples: reward, KL (at the coefficient the round started with),
    entropy, response length, distinct-2 and the update's statistics."""
    acc, mask = accelerator, rollout.response_mask.float()
    reward_mean, reward_var = ppo.mean_var_from_moments(
        acc.reduce(ppo.masked_moments(rollout.rewards, torch.ones_like(rollout.rewards)), "sum"))
    samples, kl_sum, tokens, entropy_sum = acc.reduce(torch.stack([
        torch.tensor(float(len(rollout)), device=acc.device), advantages.kl.sum(), mask.sum(),
        (rollout.entropy * mask).sum()]), "sum").tolist()
    token_lists = gather_object([ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, mask)])
    return {
        "round": k,
        "samples": int(samples),
        "reward_mean": reward_mean.item(),
        "reward_std": reward_var.sqrt().item(),
        "kl": kl_sum / samples,
        "kl_coef": kl_coef,
        "entropy": entropy_sum / max(tokens, 1.0),
        **{name: value for name, value in dataclasses.asdict(update_stats).items() if value is not None},
        "response_len_mean": tokens / samples,
        "distinct_2": ppo.distinct_n(token_lists, 2),
    }


def report_metrics(rollout: Rollout, report_rewards: dict[str, Callable], accelerator: Accelerator) -> dict:
    """reward/NAME: the mean of each `reward.report` function (name -> reward function) over all processes'
    samples."""
    if not report_rewards:
        return {}
    sums = torch.tensor([sum(reward(rollout.prompts, rollout.responses)) for reward in report_rewards.values()]
                        + [float(len(rollout))], dtype=torch.float64, device=accelerator.device)
    sums = accelerator.reduce(sums, "sum").tolist()
    return {f"reward/{name}": total / max(sums[-1], 1.0) for name, total in zip(report_rewards, sums)}
