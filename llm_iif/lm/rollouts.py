"""Stage I for causal LMs: collect a rollout (sample, reward, score every token at θ(k)) and its advantages."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from accelerate import Accelerator

from llm_iif.core import ppo
from llm_iif.recipes import PPOConfig
from llm_iif.core.errors import UserError
from llm_iif.core.guards import NonfiniteGuard, rows_finite
from llm_iif.core.records import Advantages, Rollout
from llm_iif.core.timer import PhaseTimer
from llm_iif.lm.generation import per_token_outputs, sample_responses

# (lm, tokenizer, formatted prompts, ppo config, device) -> (query_ids, query_mask, response_ids, response_mask)
Sampler = Callable[..., tuple[torch.Tensor, ...]]
# (prompts, responses) -> one float per response
RewardFunction = Callable[[list[str], list[str]], list[float]]


class RewardWithColumns:
    """``reward_model`` (`reward_models.RewardModel`) as a `RewardFunction`: called with each prompt's other
    dataset columns as keyword lists, looked up by the prompt's text in ``columns``
    (`llm_iif.lm.data.PromptColumns`), as trl calls its reward functions. ``key`` names the reward's recipe key,
    for errors."""

    def __init__(self, reward_model, columns, key: str):
        self.reward_model, self.columns, self.key = reward_model, columns, key
        self.reads_columns = getattr(reward_model, "reads_columns", False)
        available = columns.names()
        needed = [name for name in getattr(reward_model, "required_columns", ()) if name not in available]
        if needed:
            raise UserError(f"{key}: needs the dataset column '{needed[0]}', which the prompts' data lacks "
                            f"(columns: {', '.join(sorted(available)) or 'none but the prompt'})")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not self.reads_columns:
            return self.reward_model(prompts, responses)
        rows = [self.columns.get(prompt) for prompt in prompts]
        missing = next((prompt for prompt, row in zip(prompts, rows) if row is None), None)
        if missing is not None:
            reason = ("is shared by rows with different columns" if missing in self.columns
                      else "is in no row of the data")
            raise UserError(f"{self.key}: reads dataset columns, but the prompt {missing!r} {reason}; expected "
                            "prompts from the data source, each with one set of columns")
        names = dict.fromkeys(name for row in rows for name in row)
        return self.reward_model(prompts, responses, **{name: [row.get(name) for row in rows] for name in names})


class RolloutCollector:
    """Sample one response per prompt, reward it and compute per-token log-probs, reference log-probs,
    values and entropies at the policy's current parameters.

    ``policy`` is the unwrapped `PolicyWithValueHead`; ``sampler`` defaults to `sample_responses` (tests
    inject fixed responses). Samples with a NaN or inf reward, log-prob or value are dropped before any
    statistic and reported to ``guard``.
    """

    def __init__(self, policy, tokenizer, reward_function: RewardFunction, reward_name: str,
                 format_prompt: Callable[[str], str], cfg: PPOConfig, accelerator: Accelerator,
                 guard: NonfiniteGuard, sampler: Sampler = sample_responses):
        self.policy, self.tokenizer, self.reward_function, self.reward_name = policy, tokenizer, reward_function, reward_name
        self.format_prompt, self.cfg, self.accelerator, self.guard, self.sampler = (
            format_prompt, cfg, accelerator, guard, sampler)

    def __call__(self, prompts: list[str]) -> tuple[Rollout, dict[str, float]]:
        """Returns (rollout, {time_generate_s, time_reward_s, time_forward_s})."""
        acc, timer = self.accelerator, PhaseTimer()
        with timer.phase("generate"), acc.autocast():
            query_ids, query_mask, response_ids, response_mask = self.sampler(
                self.policy.lm, self.tokenizer, [self.format_prompt(p) for p in prompts], self.cfg, acc.device)
            responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        with timer.phase("reward"):
            rewards = torch.tensor(self.reward_function(prompts, responses), dtype=torch.float32, device=acc.device)
        if rewards.shape != (len(prompts),):
            raise UserError(f"reward.name: '{self.reward_name}' returned {tuple(rewards.shape)} scores "
                            f"for {len(prompts)} samples; expected one float per sample")
        with timer.phase("forward"), acc.autocast():
            tokens = per_token_outputs(self.policy, query_ids, query_mask, response_ids, response_mask,
                                       self.cfg.temperature, self.cfg.forward_batch_size)
        rollout = Rollout(prompts, responses, query_ids, query_mask, response_ids, response_mask, rewards, **tokens)
        return self._drop_nonfinite(rollout), timer.as_metrics()

    def rescore(self, rollout: Rollout) -> Rollout:
        """``rollout``'s responses and rewards with log-probs, reference log-probs, values and entropies
        computed again at the policy's current parameters (cached responses; no generation, no reward call)."""
        with self.accelerator.autocast():
            tokens = per_token_outputs(self.policy, rollout.query_ids, rollout.query_mask, rollout.response_ids,
                                       rollout.response_mask, self.cfg.temperature, self.cfg.forward_batch_size)
        return dataclasses.replace(rollout, **tokens)

    def _drop_nonfinite(self, rollout: Rollout) -> Rollout:
        acc = self.accelerator
        finite_reward = torch.isfinite(rollout.rewards)
        finite_policy = rows_finite(rollout.response_mask, rollout.logprobs, rollout.ref_logprobs, rollout.values)
        keep = finite_reward & finite_policy
        bad_reward, bad_policy, kept = (int(n) for n in acc.reduce(torch.stack([
            (~finite_reward).sum(), (finite_reward & ~finite_policy).sum(), keep.sum()]), "sum").tolist())
        total, nothing_left = len(rollout) * acc.num_processes, kept == 0
        example = ""
        if not finite_reward.all():  # one offending sample from this process, to debug the reward model with
            i = int((~finite_reward).nonzero()[0])
            example = f"; e.g. prompt {rollout.prompts[i]!r}, response {rollout.responses[i]!r}"
        self.guard.flag("reward", bad_reward, f"reward.name: '{self.reward_name}' returned NaN or inf "
                        f"for {bad_reward} of {total} samples{example}", nothing_left)
        self.guard.flag("policy", bad_policy, f"the policy's log-probs or values are NaN or inf for "
                        f"{bad_policy} of {total} samples", nothing_left)
        return rollout if keep.all() else rollout.select(keep)


def estimate_advantages(rollout: Rollout, kl_coef: float, cfg: PPOConfig, accelerator: Accelerator) -> Advantages:
    """KL-penalised per-token rewards → GAE → advantages whitened with statistics over all processes."""
    mask = rollout.response_mask
    rewards, kl = ppo.kl_penalized_rewards(rollout.rewards, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
    advantages, returns = ppo.gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    moments = accelerator.reduce(ppo.masked_moments(advantages, mask), "sum")
    return Advantages(kl, ppo.masked_whiten(advantages, mask, moments), returns)


def drop_nonfinite_advantages(rollout: Rollout, advantages: Advantages, accelerator: Accelerator,
                              guard: NonfiniteGuard) -> tuple[Rollout, Advantages]:
    """Drop samples whose advantages or returns came out NaN or inf (e.g. an overflow)."""
    finite = rows_finite(rollout.response_mask, advantages.advantages, advantages.returns)
    bad, kept = (int(n) for n in accelerator.reduce(torch.stack([(~finite).sum(), finite.sum()]), "sum").tolist())
    guard.flag("advantage", bad, f"advantages or returns are NaN or inf for {bad} samples", kept == 0)
    return (rollout, advantages) if not bad else (rollout.select(finite), advantages.select(finite))
