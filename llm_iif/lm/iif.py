"""The LM side of the IIF stage: the validation target, the per-sample PPO loss and response log-probs.

`llm_iif.attribution.stage.IIFStage` is model-agnostic; these adapt it to a `PolicyWithValueHead` trained
with PPO. The targets differ only in their token weights w (`target_token_weights`).
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator

from llm_iif.attribution.influence import PerSampleLoss, SequenceLogprobs, TargetBatch
from llm_iif.core import ppo
from llm_iif.core.config import TARGETS, IIFConfig, PPOConfig
from llm_iif.core.records import Advantages, Rollout
from llm_iif.core.tokens import at_response_positions, response_logprobs
from llm_iif.lm.generation import tokenize_pairs
from llm_iif.lm.rollouts import RolloutCollector


def target_token_weights(target: str, advantages: torch.Tensor | None, rewards: torch.Tensor | None,
                         mask: torch.Tensor) -> torch.Tensor:
    """Token weights w [B, T] of a target objective on validation responses.

    advantages: [B, T] whitened GAE advantages; rewards: [B] rewards whitened over the validation set;
    mask: [B, T] response tokens. The gold target needs only the mask.
      seq     every token of response v gets Â_v at its last token (where the reward lands);
      return  each token gets its own advantage Â_{v,t};
      reward  every token of response v gets its whitened reward;
      gold    every token gets 1: the plain log-likelihood of reference responses.
    """
    mask = mask.float()
    rows = torch.arange(mask.shape[0], device=mask.device)
    if target == "gold":
        return mask
    if target == "seq":
        return advantages[rows, ppo.last_token_index(mask)][:, None] * mask
    if target == "return":
        return advantages * mask
    if target == "reward":
        return rewards[:, None] * mask
    raise ValueError(f"unknown target '{target}': expected one of {', '.join(TARGETS)}")


class ValidationTarget:
    """`TargetSource` of the LM trainer: this process's share of ``iif.val_size`` validation rows each round.

    For ``gold`` the rows are the validation set's reference responses; otherwise fresh responses to the
    validation prompts are collected and rewarded at θ(k) and weighted by ``iif.target``. ``advantages_of``
    computes a rollout's advantages with the trainer's current KL coefficient.
    """

    def __init__(self, config: IIFConfig, validation: dict[str, list[str]], collector: RolloutCollector,
                 advantages_of: Callable[[Rollout], Advantages], accelerator: Accelerator):
        self.config, self.validation, self.collector = config, validation, collector
        self.advantages_of, self.accelerator = advantages_of, accelerator

    def __call__(self, model) -> TargetBatch:
        acc = self.accelerator
        prompts = self._rows("prompt")
        if self.config.target == "gold":
            collector = self.collector
            ids = tokenize_pairs(collector.tokenizer, [collector.format_prompt(p) for p in prompts],
                                 self._rows("response"), acc.device)
            return TargetBatch(*ids, target_token_weights("gold", None, None, ids[3]))
        rollout, _ = self.collector(prompts)
        advantages = self.advantages_of(rollout).advantages
        ones = torch.ones_like(rollout.rewards)
        rewards = ppo.masked_whiten(rollout.rewards, ones,
                                    acc.reduce(ppo.masked_moments(rollout.rewards, ones), "sum"))
        weights = target_token_weights(self.config.target, advantages, rewards, rollout.response_mask)
        return TargetBatch(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
                           weights)

    def _rows(self, column: str) -> list[str]:
        """This process's share of the round's validation rows, cycling the set as needed."""
        rows = self.validation[column]
        size = self.config.val_size // self.accelerator.num_processes
        start = self.accelerator.process_index * size
        return [rows[i % len(rows)] for i in range(start, start + size)]


def policy_logprobs(temperature: float) -> SequenceLogprobs:
    """`SequenceLogprobs` of a `PolicyWithValueHead` sampling at ``temperature``."""
    def logprobs(policy, query_ids, query_mask, response_ids, response_mask):
        logits, _ = policy(torch.cat([query_ids, response_ids], dim=1), torch.cat([query_mask, response_mask], dim=1))
        return response_logprobs(logits, response_ids, temperature)
    return logprobs


def per_sample_ppo_losses(policy, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                          cfg: PPOConfig, train_grad: str, tokens_per_sample: float) -> torch.Tensor:
    """[B] PPO loss of each sample, exactly the loss the update's first step takes on it.

    It sums the sample's per-token losses and divides by the batch's mean response length, so one sample's
    gradient is what it contributes to a token-mean minibatch loss (up to the minibatch size). At θ(k) the
    ratio is 1 and no clipping is active. ``train_grad`` is ``full`` (policy + vf_coef × value) or ``policy``.
    """
    mask = rollout.response_mask
    logits, values = policy(rollout.input_ids, rollout.attention_mask)
    logprobs = response_logprobs(logits, rollout.response_ids, cfg.temperature)
    loss, _ = ppo.clipped_policy_loss(logprobs, rollout.logprobs, advantages, cfg.clip_range)
    if train_grad == "full":
        values = at_response_positions(values, rollout.response_ids.shape[1])
        value_loss, _ = ppo.clipped_value_loss(values, rollout.values, returns, cfg.clip_range_value)
        loss = loss + cfg.vf_coef * value_loss
    return (loss * mask).sum(dim=1) / tokens_per_sample


def ppo_sample_loss(rollout: Rollout, advantages: Advantages, cfg: PPOConfig, train_grad: str,
                    tokens_per_sample: float) -> PerSampleLoss:
    """`PerSampleLoss` over the rows of one rollout (see `per_sample_ppo_losses`)."""
    def loss(policy, rows: torch.Tensor) -> torch.Tensor:
        return per_sample_ppo_losses(policy, rollout.select(rows), advantages.advantages[rows],
                                     advantages.returns[rows], cfg, train_grad, tokens_per_sample)
    return loss
