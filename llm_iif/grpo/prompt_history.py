"""Skipping prompts before generation by their reward history, after GRESO (Zheng et al., arXiv 2506.02177).

A prompt whose group of completions had all-equal rewards (a uniform group, which DAPO drops) tends to give
a uniform group again when it comes back. Each prompt's history is its streak: +n when its latest n groups
were uniform at or above their generation batch's mean reward (solved), -n when they were uniform below it
(unsolved), absent after an informative group. A prompt with streak ±n is skipped with probability
1 − max(p^n, 0.01), with p = ``p_solved`` or ``p_unsolved``. After every generation batch each p moves by
0.01 towards the rate that keeps its share of uniform groups at its target: one third of
``target_uniform_fraction`` for solved groups, two thirds for unsolved ones (which are likelier to change).
The numbers are GRESO's. The history only pays off when prompts come back: over several epochs of a train set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from llm_iif.grpo.groups import varied_groups

P_START, P_STEP, P_MIN, P_MAX = 0.5, 0.01, 0.05, 0.95
MIN_KEEP_PROBABILITY = 0.01  # a prompt is never skipped for good: its streak can end
SOLVED_SHARE = 1 / 3  # of target_uniform_fraction; unsolved groups get the rest


def prompt_key(prompt) -> str:
    """A short stable key for a prompt (text, or a list of chat messages)."""
    text = json.dumps(prompt, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def uniform_kinds(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] per group of ``group_size`` consecutive rewards [P·G]: +1 uniform and solved (at or above the mean
    finite reward of all groups), -1 uniform and unsolved, 0 informative (DAPO keeps it) or with fewer than two
    finite rewards (nothing to learn about the prompt)."""
    grouped = rewards.view(-1, group_size)
    varied = varied_groups(rewards, group_size).view(-1, group_size).any(dim=1)
    unknown = grouped.isfinite().sum(dim=1) < 2
    solved = grouped.nanmean(dim=1) >= rewards[rewards.isfinite()].mean()
    return torch.where(solved, 1, -1).masked_fill(varied | unknown, 0)


@dataclass
class PromptHistory:
    """The streaks of every prompt seen and the two adaptive probabilities; the same on every process."""
    target_uniform_fraction: float
    p_solved: float = P_START
    p_unsolved: float = P_START
    streaks: dict[str, int] = field(default_factory=dict)
    _counts: list[int] = field(default_factory=lambda: [0, 0, 0])  # solved, unsolved, all groups since adapt()

    def skip_probability(self, key: str) -> float:
        streak = self.streaks.get(key, 0)
        if streak == 0:
            return 0.0
        p = self.p_solved if streak > 0 else self.p_unsolved
        return 1.0 - max(p ** abs(streak), MIN_KEEP_PROBABILITY)

    def record(self, keys: list[str], kinds: torch.Tensor) -> None:
        """Extend the streaks with one generation's groups: ``keys`` [P] and their `uniform_kinds` [P]."""
        for key, kind in zip(keys, kinds.tolist()):
            streak = self.streaks.get(key, 0)
            if kind == 0:
                self.streaks.pop(key, None)
            else:  # a streak of the same kind grows, one of the other kind restarts
                self.streaks[key] = streak + kind if streak * kind > 0 else kind
            self._counts[0] += kind == 1
            self._counts[1] += kind == -1
            self._counts[2] += 1

    def adapt(self) -> dict[str, float]:
        """Move each p one step towards its target share of uniform groups, over the groups recorded since the
        last call; returns the shares and the new p's."""
        solved, unsolved, groups = self._counts
        self._counts = [0, 0, 0]
        if groups == 0:
            return {}
        target = self.target_uniform_fraction
        self.p_solved = _stepped(self.p_solved, solved / groups > target * SOLVED_SHARE)
        self.p_unsolved = _stepped(self.p_unsolved, unsolved / groups > target * (1 - SOLVED_SHARE))
        return {"uniform_solved_fraction": solved / groups, "uniform_unsolved_fraction": unsolved / groups,
                "p_solved": self.p_solved, "p_unsolved": self.p_unsolved}

    def state_dict(self) -> dict:
        return {"p_solved": self.p_solved, "p_unsolved": self.p_unsolved, "streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict) -> None:
        self.p_solved, self.p_unsolved = float(state["p_solved"]), float(state["p_unsolved"])
        self.streaks = {str(key): int(streak) for key, streak in state["streaks"].items()}


def _stepped(p: float, too_many_uniform: bool) -> float:
    """Too many uniform groups: lower p (skip more); else raise it (skip less); within [P_MIN, P_MAX]."""
    return min(P_MAX, max(P_MIN, p - P_STEP if too_many_uniform else p + P_STEP))
