"""The rewards of a GRPO generation batch, as the filters read them: the weighted sum of trl's reward
functions per completion, over all processes, and which completions had a NaN or inf reward."""

from __future__ import annotations

import functools
import math

import torch
from accelerate import Accelerator
from trl.trainer.utils import is_async_callable

from llm_iif.core.distributed import global_sum
from llm_iif.core.errors import UserError, first_line
from llm_iif.core.guards import NonfiniteGuard


class BatchRewards:
    """The latest generation batch's rewards. `checked` wraps trl's reward functions so that a NaN or inf reward
    is noted and handed to trl as None (out of its group's baseline); `record` takes trl's [N, F] rewards;
    ``latest`` [N] is their weighted sum over all processes, NaN where no function rewarded the completion
    (as trl's advantages treat it) or one returned NaN or inf."""

    def __init__(self, accelerator: Accelerator, guard: NonfiniteGuard):
        self.accelerator, self.guard = accelerator, guard
        self.latest: torch.Tensor | None = None
        self._nonfinite_rows: set[int] = set()  # this process's rows in the batch being rewarded

    def checked(self, funcs: list) -> list:
        """``funcs`` with every synchronous function wrapped by `checked_reward`."""
        return [checked_reward(f, self._nonfinite_rows) for f in funcs]

    def start(self) -> None:
        """Before trl calls the reward functions on a new batch."""
        self._nonfinite_rows.clear()

    def record(self, rewards_per_func: torch.Tensor, weights: torch.Tensor, batch_size: int) -> None:
        """Keep the weighted rewards of trl's ``rewards_per_func`` [N, F] (all processes; ``batch_size`` rows
        per process) as ``latest``."""
        self.latest = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
        flagged = self._flagged(batch_size, rewards_per_func.device)
        unrewarded = rewards_per_func.isnan().all(dim=1) | self.accelerator.gather(flagged)
        self.latest[unrewarded] = torch.nan

    def nonfinite_mask(self, batch_size: int) -> torch.Tensor:
        """[B] True for this process's completions with a NaN or inf reward; reports them to the guard."""
        acc = self.accelerator
        bad = self._flagged(batch_size, acc.device)
        count, total = int(global_sum(acc, bad)), int(global_sum(acc, torch.ones_like(bad)))
        self.guard.flag("reward", count, f"reward: NaN or inf for {count} of {total} completions",
                        nothing_left=count == total)
        return bad

    def _flagged(self, batch_size: int, device) -> torch.Tensor:
        """[B] True for this process's rows whose reward was NaN or inf."""
        flagged = torch.zeros(batch_size, dtype=torch.bool, device=device)
        flagged[sorted(self._nonfinite_rows)] = True
        return flagged

def checked_reward(func, nonfinite_rows: set[int]):
    """A synchronous reward function whose NaN or inf rewards are recorded in ``nonfinite_rows`` and handed
    to trl as None, so that they stay out of their group's baseline. Models and async functions pass through."""
    if isinstance(func, torch.nn.Module) or is_async_callable(func):
        return func

    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def checked(*args, **kwargs):
        try:
            rewards = list(func(*args, **kwargs))
        except Exception as err:  # a user's function: one line naming it, not trl's traceback
            raise UserError(f"rewards.{name}: raised {type(err).__name__} ({first_line(err)})") from err
        check_rewards(name, rewards, len(kwargs.get("completions", rewards)))
        for i, reward in enumerate(rewards):
            if reward is not None and not math.isfinite(reward):
                nonfinite_rows.add(i)
                rewards[i] = None
        return rewards

    return checked


def check_rewards(name: str, rewards: list, completions: int) -> None:
    """`UserError` unless a reward function returned one number (or None) per completion."""
    if len(rewards) != completions:
        raise UserError(f"rewards.{name}: returned {len(rewards)} rewards for {completions} completions; expected "
                        "one per completion")
    wrong = next((r for r in rewards if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)))),
                 None)
    if wrong is not None:
        raise UserError(f"rewards.{name}: returned {wrong!r} ({type(wrong).__name__}); expected a number or None "
                        "per completion")
