"""The LM side of the IIF stage: the validation target, the per-sample PPO loss and response log-probs.

`llm_iif.attribution.stage.IIFStage` is model-agnostic; these adapt it to a `PolicyWithValueHead` trained
with PPO. The targets differ only in their token weights w (`target_token_weights`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator

from llm_iif.attribution.influence import PerSampleLoss, PerSampleLossAndTarget, SequenceLogprobs, TargetBatch
from llm_iif.core import ppo
from llm_iif.recipes import TARGETS, IIFConfig, PPOConfig
from llm_iif.core.records import Advantages, Rollout
from llm_iif.core.tokens import at_response_positions, response_logprobs
from llm_iif.lm.data import check_tokenizable
from llm_iif.lm.generation import tokenize_pairs
from llm_iif.lm.rollouts import RolloutCollector

if TYPE_CHECKING:
    from llm_iif.lm.trusted import TrustedTriples


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


def rollout_target_rows(target: str, rollout: Rollout, advantages: Advantages, accelerator: Accelerator,
                        sequence_weights: torch.Tensor | None = None) -> TargetBatch:
    """A rollout's rows as target rows, token-weighted by ``target`` (see `target_token_weights`); rewards
    are whitened over every process's rows. ``sequence_weights`` [B] scale each row's weights (importance
    weights of cached responses)."""
    ones = torch.ones_like(rollout.rewards)
    rewards = ppo.masked_whiten(rollout.rewards, ones,
                                accelerator.reduce(ppo.masked_moments(rollout.rewards, ones), "sum"))
    weights = target_token_weights(target, advantages.advantages, rewards, rollout.response_mask)
    if sequence_weights is not None:
        weights = weights * sequence_weights[:, None]
    return TargetBatch(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask, weights)


def importance_weights(logprobs_now: torch.Tensor, logprobs_then: torch.Tensor, mask: torch.Tensor,
                       accelerator: Accelerator) -> tuple[torch.Tensor, float]:
    """Self-normalised, truncated per-sequence importance weights of responses sampled by an earlier policy.

    logprobs_now, logprobs_then: [V, T] per-token log-probs under π_θ(k) and under the policy that generated
    the responses; mask: [V, T]. ρ_v = exp Σ_t (now - then), normalised to mean 1 over every process's rows,
    truncated at √N (Ionides' truncated importance sampling) and normalised again. Returns (ρ̃ [V], the
    effective sample size (Σρ̃)² / Σρ̃² over all N rows).
    """
    log_ratio = ((logprobs_now - logprobs_then) * mask).sum(dim=1)
    shift = accelerator.reduce(log_ratio.max().reshape(1), "max")  # exp of the largest is 1: no overflow
    ratio = torch.exp(log_ratio - shift)
    total, n = accelerator.reduce(torch.stack([ratio.sum(), torch.tensor(float(len(ratio)), device=ratio.device)]),
                                  "sum").tolist()
    weights = (ratio * n / total).clamp(max=math.sqrt(n))
    weights = weights * n / accelerator.reduce(weights.sum(), "sum")
    sums = accelerator.reduce(torch.stack([weights.sum(), (weights ** 2).sum()]), "sum")
    return weights, (sums[0] ** 2 / sums[1]).item()


class ValidationTarget:
    """`TargetSource` of the LM trainer: this process's share of ``iif.val_size`` validation rows each round.

    For ``gold`` the rows are the validation set's reference responses, for ``preference`` every trusted triple
    of this process (`TrustedTriples.target_rows`); neither generates. Otherwise responses to the validation
    prompts are rewarded, scored at θ(k) and weighted by ``iif.target``: ``fresh`` ones every round, or, with
    ``iif.target_source: cached``, ones generated every ``iif.refresh_every`` rounds and, in between, scored
    again at θ(k) (new advantages, same rewards) and reweighted by `importance_weights`. ``advantages_of``
    computes a rollout's advantages with the trainer's current KL coefficient. ``metrics`` holds the last
    call's ``target_ess`` (cached source).
    """

    def __init__(self, config: IIFConfig, validation: dict[str, list[str]] | None, collector: RolloutCollector,
                 advantages_of: Callable[[Rollout], Advantages], accelerator: Accelerator,
                 trusted: TrustedTriples | None = None):
        self.config, self.validation, self.collector, self.trusted = config, validation, collector, trusted
        self.advantages_of, self.accelerator = advantages_of, accelerator
        self.cache: Rollout | None = None
        self.calls, self.metrics = 0, {}
        if config.target == "gold":  # texts tokenised as given, not generated
            check_tokenizable(validation, collector.tokenizer, "iif.val_prompts", config.val_prompts)

    def __call__(self, model) -> TargetBatch:
        acc, cfg = self.accelerator, self.config
        if cfg.target == "preference":
            return self.trusted.target_rows()
        prompts = self._rows("prompt")
        collector = self.collector

        def tokenize(prompts: list[str], responses: list[str]):
            return tokenize_pairs(collector.tokenizer, [collector.format_prompt(p) for p in prompts], responses,
                                  acc.device)

        if cfg.target == "gold":
            ids = tokenize(prompts, self._rows("response"))
            return TargetBatch(*ids, target_token_weights("gold", None, None, ids[3]))
        refresh = cfg.target_source != "cached" or self.calls % cfg.refresh_every == 0
        self.calls += 1
        if refresh:
            rollout, seconds = self.collector(prompts)
            self.cache = rollout if cfg.target_source == "cached" else None
            self.metrics = {name.replace("time_", "time_val_", 1): value for name, value in seconds.items()}
            if self.cache is not None:
                self.metrics["target_ess"] = float(len(rollout) * acc.num_processes)
            return rollout_target_rows(cfg.target, rollout, self.advantages_of(rollout), acc)
        start = time.perf_counter()
        rollout = self.collector.rescore(self.cache)
        weights, ess = importance_weights(rollout.logprobs, self.cache.logprobs, rollout.response_mask, acc)
        self.metrics = {"target_ess": ess, "time_val_forward_s": time.perf_counter() - start}
        return rollout_target_rows(cfg.target, rollout, self.advantages_of(rollout), acc, weights)

    def state_dict(self) -> dict:
        """What an exact resume needs: the round count and the cached responses (tensors and strings)."""
        return {"calls": self.calls, "cache": None if self.cache is None else dataclasses.asdict(self.cache)}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
        self.cache = None if state["cache"] is None else Rollout(**state["cache"])

    def _rows(self, column: str) -> list[str]:
        """This process's share of the round's validation rows, cycling the set as needed."""
        rows = self.validation[column]
        size = self.config.val_size // self.accelerator.num_processes
        start = self.accelerator.process_index * size
        return [rows[i % len(rows)] for i in range(start, start + size)]


def policy_logprobs(temperature: float, reference: bool = False) -> SequenceLogprobs:
    """`SequenceLogprobs` of a `PolicyWithValueHead` sampling at ``temperature`` (of its base model, the LoRA
    adapter switched off, with ``reference``)."""
    def logprobs(policy, query_ids, query_mask, response_ids, response_mask):
        ids, mask = torch.cat([query_ids, response_ids], dim=1), torch.cat([query_mask, response_mask], dim=1)
        logits = policy.reference_logits(ids, mask) if reference else policy(ids, mask)[0]
        return response_logprobs(logits, response_ids, temperature)
    return logprobs


def mean_response_length(rollout: Rollout, accelerator: Accelerator) -> float:
    """The mean response length over every process's samples, which a sample's loss is divided by
    (`per_sample_ppo_losses`)."""
    tokens, samples = accelerator.reduce(torch.stack([rollout.response_mask.sum().float(),
                                                      torch.tensor(float(len(rollout)), device=accelerator.device)]),
                                         "sum").tolist()
    return tokens / samples


def per_sample_ppo_losses(policy, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                          cfg: PPOConfig, train_grad: str, tokens_per_sample: float) -> torch.Tensor:
    """[B] PPO loss of each sample, exactly the loss the update's first step takes on it.

    It sums the sample's per-token losses and divides by the batch's mean response length, so one sample's
    gradient is what it contributes to a token-mean minibatch loss (up to the minibatch size). At θ(k) the
    ratio is 1 and no clipping is active. ``train_grad`` is ``full`` (policy + vf_coef × value) or ``policy``.
    """
    return _losses_and_logprobs(policy, rollout, advantages, returns, cfg, train_grad, tokens_per_sample)[0]


STATISTICS = 5
"""How many per-token terms `PPOTerms.statistics` gives."""


@dataclasses.dataclass
class PPOTerms:
    """Per-token PPO terms of a batch's responses, each [b, T], as the update's loss takes them."""
    policy: torch.Tensor          # the clipped surrogate, a loss
    policy_clipped: torch.Tensor  # 1 where its clipped branch was taken
    value: torch.Tensor           # the clipped value loss
    value_clipped: torch.Tensor
    logprobs: torch.Tensor        # log π(y_t) now
    old_logprobs: torch.Tensor    # log π(y_t) when sampled

    def statistics(self) -> list[torch.Tensor]:
        """The per-token terms of `llm_iif.core.records.UpdateStats`, in its order."""
        return [self.policy, self.value, self.policy_clipped, self.value_clipped,
                ppo.approx_kl(self.logprobs, self.old_logprobs)]


def ppo_terms(logits: torch.Tensor, values: torch.Tensor, rollout: Rollout, advantages: torch.Tensor,
              returns: torch.Tensor, cfg: PPOConfig) -> PPOTerms:
    """The `PPOTerms` of ``rollout``'s rows from the policy's forward over them: ``logits`` [b, L, V] and
    ``values`` [b, L]; ``advantages``, ``returns`` [b, T]."""
    logprobs = response_logprobs(logits, rollout.response_ids, cfg.temperature)
    values = at_response_positions(values, rollout.response_ids.shape[1])
    policy, policy_clipped = ppo.clipped_policy_loss(logprobs, rollout.logprobs, advantages, cfg.clip_range)
    value, value_clipped = ppo.clipped_value_loss(values, rollout.values, returns, cfg.clip_range_value)
    return PPOTerms(policy, policy_clipped, value, value_clipped, logprobs, rollout.logprobs)


def minibatch_loss(terms: PPOTerms, mask: torch.Tensor, vf_coef: float) -> torch.Tensor:
    """The loss a PPO step takes on a minibatch: the token means over ``mask`` [b, T] of its policy term plus
    ``vf_coef`` × its value term."""
    return ppo.masked_mean(terms.policy, mask) + vf_coef * ppo.masked_mean(terms.value, mask)


def _losses_and_logprobs(policy, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                         cfg: PPOConfig, train_grad: str, tokens_per_sample: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`per_sample_ppo_losses` [B], the response log-probs [B, T] they came from)."""
    terms = ppo_terms(*policy(rollout.input_ids, rollout.attention_mask), rollout, advantages, returns, cfg)
    loss = terms.policy if train_grad == "policy" else terms.policy + cfg.vf_coef * terms.value
    return (loss * rollout.response_mask).sum(dim=1) / tokens_per_sample, terms.logprobs


def ppo_sample_loss(rollout: Rollout, advantages: Advantages, cfg: PPOConfig, train_grad: str,
                    tokens_per_sample: float) -> PerSampleLoss:
    """`PerSampleLoss` over the rows of one rollout (see `per_sample_ppo_losses`)."""
    def loss(policy, rows: torch.Tensor) -> torch.Tensor:
        return per_sample_ppo_losses(policy, rollout.select(rows), advantages.advantages[rows],
                                     advantages.returns[rows], cfg, train_grad, tokens_per_sample)
    return loss


def ppo_sample_loss_and_target(rollout: Rollout, advantages: Advantages, cfg: PPOConfig, train_grad: str,
                               tokens_per_sample: float, weights: torch.Tensor) -> PerSampleLossAndTarget:
    """`PerSampleLossAndTarget` over the rows of one rollout: each row's PPO loss and its target term
    -Σ_t w_t log π(y_t), with token weights ``weights`` [B, T], from the same forward pass."""
    def loss_and_target(policy, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = rollout.select(rows)
        losses, logprobs = _losses_and_logprobs(policy, batch, advantages.advantages[rows],
                                                advantages.returns[rows], cfg, train_grad, tokens_per_sample)
        return losses, -(weights[rows] * logprobs * batch.response_mask).sum(dim=1)
    return loss_and_target
