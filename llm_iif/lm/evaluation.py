"""Held-out evaluation of an LM policy during training, logged as ``eval/<name>``."""

from __future__ import annotations

import time
from typing import Callable

import torch
from accelerate import Accelerator

from llm_iif.recipes import PPOConfig
from llm_iif.core.errors import UserError
from llm_iif.lm.generation import sample_responses


class Evaluator:
    """``eval/<name>``: the mean reward of each ``eval.rewards`` function on one sampled response to each
    evaluation prompt, at the policy's current parameters (after a round's update).

    ``policy`` is the unwrapped `PolicyWithValueHead`; ``prompts`` are all evaluation prompts (each process
    takes every N-th); ``every`` is ``eval.every``.
    """

    def __init__(self, policy, tokenizer, format_prompt: Callable[[str], str], cfg: PPOConfig, prompts: list[str],
                 rewards: dict[str, Callable], every: int, seed: int, accelerator: Accelerator):
        self.policy, self.tokenizer, self.format_prompt, self.cfg = policy, tokenizer, format_prompt, cfg
        self.prompts, self.rewards, self.every, self.seed, self.accelerator = prompts, rewards, every, seed, accelerator

    def due(self, k: int, rounds: int) -> bool:
        """Whether to evaluate after round ``k``: every ``every`` rounds and after the last."""
        return (k + 1) % self.every == 0 or k + 1 == rounds

    def __call__(self, evaluation: int) -> dict[str, float]:
        """Evaluate; ``evaluation`` (the number of rounds done) seeds the sampling."""
        acc = self.accelerator
        prompts = self.prompts[acc.process_index::acc.num_processes]
        start = time.perf_counter()
        responses = []
        # Its own seeded random numbers: evaluating (or not) must not change what training samples next.
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            torch.manual_seed(self.seed + 1_000_003 * evaluation + acc.process_index)
            if prompts:
                with acc.autocast():
                    _, _, response_ids, _ = sample_responses(self.policy.lm, self.tokenizer,
                                                             [self.format_prompt(p) for p in prompts], self.cfg,
                                                             acc.device)
                responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        metrics = {}
        for name, reward_function in self.rewards.items():
            rewards = torch.tensor(reward_function(prompts, responses) if prompts else [], dtype=torch.float64,
                                   device=acc.device)
            if not torch.isfinite(rewards).all():
                raise UserError(f"eval.rewards.{name}: returned NaN or inf for "
                                f"{int((~torch.isfinite(rewards)).sum())} of {len(rewards)} evaluation responses")
            total, count = acc.reduce(torch.stack([rewards.sum(), torch.tensor(float(len(rewards)), device=acc.device,
                                                                               dtype=torch.float64)]), "sum")
            metrics[f"eval/{name}"] = (total / count).item()
        metrics["time_eval_s"] = time.perf_counter() - start
        return metrics
