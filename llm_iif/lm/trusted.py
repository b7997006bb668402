"""The trusted triples of a run (the recipe's ``trusted`` section), for either trainer: tokenised once, with
their reference margins, and used three ways: the policy's margin and accuracy on them every round, the rows of
the ``preference`` influence target, and the DPO loss of ``trusted.dpo_coef``. `TrustedTriples` is the same for
PPO and GRPO; each trainer tokenises the rows as it prompts its policy (`ppo_trusted_triples` here,
`llm_iif.grpo.trusted.grpo_trusted_triples`). The maths is `llm_iif.core.preference`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from accelerate import Accelerator

from llm_iif.attribution.influence import SequenceLogprobs, TargetBatch, preference_target_rows
from llm_iif.attribution.stage import dropout_off
from llm_iif.recipes import TrustedConfig
from llm_iif.core.errors import UserError
from llm_iif.core.preference import dpo_loss, implicit_accuracy, margins, sequence_logprobs
from llm_iif.lm.data import check_tokenizable, is_messages
from llm_iif.lm.generation import tokenize_pairs
from llm_iif.lm.iif import policy_logprobs


class TrustedTriples:
    """This process's share of the trusted triples as ``rows``: its V chosen responses, then its V rejected ones
    (`preference_target_rows`), with their reference margins (`set_reference`, before the first use).

    ``sequence_logprobs(model, query_ids, query_mask, response_ids, response_mask)`` gives the per-token log-probs
    [b, T] the trainer trains; ``generator`` draws the DPO loss's mini-batches (saved in checkpoints);
    ``chunk_size`` triples go through one forward."""

    def __init__(self, cfg: TrustedConfig, rows: TargetBatch, sequence_logprobs: SequenceLogprobs,
                 accelerator: Accelerator, generator: torch.Generator, chunk_size: int):
        self.cfg, self.rows, self.sequence_logprobs = cfg, rows, sequence_logprobs
        self.accelerator, self.generator, self.chunk_size = accelerator, generator, max(1, chunk_size)
        self.size = len(rows) // 2
        self.reference_margins: torch.Tensor | None = None
        if cfg.target_draw is not None:
            processes = accelerator.num_processes
            share, rest = divmod(cfg.target_draw, processes)
            if rest or share % 2 or not 0 < share <= self.size:
                raise UserError(f"trusted.target_draw: {cfg.target_draw} triples a round over {processes} "
                                f"process(es); expected an even number per process, at most its {self.size} triples")

    def set_reference(self, model, sequence_logprobs: SequenceLogprobs | None = None) -> None:
        """The margins [V] under the reference: ``model`` through ``sequence_logprobs`` (the trainer's own by
        default)."""
        with torch.no_grad(), dropout_off(model):
            self.reference_margins = self._margins(model, self._everyone(), sequence_logprobs)

    def target_rows(self) -> TargetBatch:
        """The rows of the preference target: every triple of this process, or with ``trusted.target_draw`` a
        fresh draw of this process's share of them (chosen rows, then the same triples' rejected ones: with an
        even draw, the parity split keeps a triple's rows in one half)."""
        if self.cfg.target_draw is None:
            return self.rows
        share = self.cfg.target_draw // self.accelerator.num_processes
        drawn = torch.randperm(self.size, generator=self.generator)[:share].sort().values
        both = torch.cat([drawn, drawn + self.size]).to(self.rows.query_ids.device)
        return TargetBatch(*(getattr(self.rows, f.name)[both] for f in dataclasses.fields(TargetBatch)))

    def metrics(self, model) -> dict[str, float]:
        """``trusted/margin``: the mean margin log π(chosen) − log π(rejected) over every process's triples;
        ``trusted/accuracy``: the share whose implicit reward prefers the chosen response (`implicit_accuracy`)."""
        with torch.no_grad(), dropout_off(model):
            policy_margins = self._margins(model, self._everyone())
        sums = torch.stack([policy_margins.sum(), implicit_accuracy(policy_margins, self.reference_margins) * self.size,
                            torch.tensor(float(self.size), device=policy_margins.device)]).double()
        margin_sum, correct, count = self.accelerator.reduce(sums, "sum").tolist()
        return {"trusted/margin": margin_sum / count, "trusted/accuracy": correct / count}

    def dpo_loss(self, model, batch_size: int) -> torch.Tensor:
        """DPO's loss on ``batch_size`` of this process's triples, drawn with ``generator`` (with gradient)."""
        index = torch.randperm(self.size, generator=self.generator)[:batch_size].to(self.accelerator.device)
        return dpo_loss(self._margins(model, index), self.reference_margins[index], self.cfg.dpo_beta)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _everyone(self) -> torch.Tensor:
        return torch.arange(self.size, device=self.accelerator.device)

    def _margins(self, model, index: torch.Tensor, logprobs_of: SequenceLogprobs | None = None) -> torch.Tensor:
        """[len(index)] margins of the triples ``index`` under ``model``, ``chunk_size`` triples a forward."""
        rows, parts = self.rows, []
        for chunk in torch.split(index, self.chunk_size):
            both = torch.cat([chunk, chunk + self.size])
            logprobs = (logprobs_of or self.sequence_logprobs)(model, rows.query_ids[both], rows.query_mask[both],
                                                               rows.response_ids[both], rows.response_mask[both])
            totals = sequence_logprobs(logprobs, rows.response_mask[both], self.cfg.length_normalised)
            parts.append(margins(*totals.split(len(chunk))))
        return torch.cat(parts)


def process_share(triples: dict[str, list], accelerator: Accelerator) -> dict[str, list]:
    """This process's equal contiguous share (``len // processes``) of the triples {column: values}."""
    share = len(triples["prompt"]) // accelerator.num_processes
    if share == 0:
        raise UserError(f"trusted.size: {len(triples['prompt'])} triples cannot give each of "
                        f"{accelerator.num_processes} processes one")
    mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    return {column: list(values[mine]) for column, values in triples.items()}


def trusted_prompt_formatter(tokenizer, format_prompt: Callable[[str], str]) -> Callable:
    """Text prompts as the PPO policy is prompted (``format_prompt``); message-list prompts through the
    tokenizer's chat template, with the assistant's turn header."""
    def format_trusted(prompt) -> str:
        if not is_messages(prompt):
            return format_prompt(prompt)
        if not tokenizer.chat_template:
            raise UserError("trusted.source: its prompts are message lists, but the policy's tokenizer has no chat "
                            "template; expected text prompts or a model with a chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return format_trusted


def ppo_trusted_triples(cfg: TrustedConfig, triples: dict[str, list], policy, tokenizer,
                        format_prompt: Callable[[str], str], temperature: float, chunk_size: int,
                        accelerator: Accelerator, generator: torch.Generator) -> TrustedTriples:
    """`TrustedTriples` for a `PolicyWithValueHead` (``policy``, unwrapped): this process's share, prompted as
    the policy is prompted, its reference the base model with the LoRA adapter switched off."""
    mine = process_share(triples, accelerator)
    prompts = list(map(trusted_prompt_formatter(tokenizer, format_prompt), mine["prompt"]))
    check_tokenizable({**mine, "prompt": prompts}, tokenizer, "trusted.source", cfg.source)
    rows = preference_target_rows(lambda p, r: tokenize_pairs(tokenizer, p, r, accelerator.device), prompts,
                                  mine["chosen"], mine["rejected"], cfg.length_normalised)
    trusted = TrustedTriples(cfg, rows, policy_logprobs(temperature), accelerator, generator, chunk_size // 2)
    trusted.set_reference(policy, policy_logprobs(temperature, reference=True))
    return trusted
