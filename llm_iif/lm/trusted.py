"""The trusted triples of a PPO run (the recipe's ``trusted`` section): tokenised once, with their reference
log-probs, and used three ways: the policy's margin and accuracy on them every round, the rows of the
``preference`` influence target, and the DPO loss of ``trusted.dpo_coef``.
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator

from llm_iif.attribution.influence import TargetBatch, preference_target_rows
from llm_iif.core.config import TrustedConfig
from llm_iif.core.errors import UserError
from llm_iif.core.preference import dpo_loss, implicit_accuracy, margins, sequence_logprobs
from llm_iif.core.tokens import response_logprobs
from llm_iif.lm.data import check_tokenizable, is_messages
from llm_iif.lm.generation import tokenize_pairs


def trusted_prompt_formatter(tokenizer, format_prompt: Callable[[str], str]) -> Callable:
    """Text prompts as the policy is prompted (``format_prompt``); message-list prompts through the tokenizer's
    chat template, with the assistant's turn header."""
    def format_trusted(prompt) -> str:
        if not is_messages(prompt):
            return format_prompt(prompt)
        if not tokenizer.chat_template:
            raise UserError("trusted.source: its prompts are message lists, but the policy's tokenizer has no chat "
                            "template; expected text prompts or a model with a chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return format_trusted


class TrustedTriples:
    """This process's equal share of the trusted triples, as rows for a `PolicyWithValueHead`: the V chosen
    responses, then the V rejected ones (`preference_target_rows`), with their reference margins.

    ``policy`` is the unwrapped policy; ``generator`` draws the DPO loss's mini-batches (saved in checkpoints).
    """

    def __init__(self, cfg: TrustedConfig, triples: dict[str, list], policy, tokenizer,
                 format_prompt: Callable[[str], str], temperature: float, chunk_size: int, accelerator: Accelerator,
                 generator: torch.Generator):
        self.cfg, self.temperature, self.chunk_size = cfg, temperature, chunk_size
        self.accelerator, self.generator = accelerator, generator
        share = len(triples["prompt"]) // accelerator.num_processes
        if share == 0:
            raise UserError(f"trusted.size: {len(triples['prompt'])} triples cannot give each of "
                            f"{accelerator.num_processes} processes one")
        mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
        prompt_texts = list(map(trusted_prompt_formatter(tokenizer, format_prompt), triples["prompt"][mine]))
        check_tokenizable({"prompt": prompt_texts, "chosen": triples["chosen"][mine],
                           "rejected": triples["rejected"][mine]}, tokenizer, "trusted.source", cfg.source)
        self.rows = preference_target_rows(
            lambda prompts, responses: tokenize_pairs(tokenizer, prompts, responses, accelerator.device),
            prompt_texts, triples["chosen"][mine], triples["rejected"][mine], cfg.length_normalised)
        self.size = share
        self.reference_margins = self._margins(policy, torch.arange(share, device=accelerator.device),
                                               reference=True)

    def target_rows(self) -> TargetBatch:
        """The rows of the preference target: every triple of this process, every round."""
        return self.rows

    @torch.no_grad()
    def metrics(self, policy) -> dict[str, float]:
        """``trusted/margin``: the policy's mean margin log π(chosen) − log π(rejected) over every process's
        triples; ``trusted/accuracy``: the share whose implicit reward prefers the chosen response
        (`implicit_accuracy`)."""
        policy_margins = self._margins(policy, torch.arange(self.size, device=self.accelerator.device))
        sums = torch.stack([policy_margins.sum(), implicit_accuracy(policy_margins, self.reference_margins) * self.size,
                            torch.tensor(float(self.size), device=policy_margins.device)]).double()
        margin_sum, correct, count = self.accelerator.reduce(sums, "sum").tolist()
        return {"trusted/margin": margin_sum / count, "trusted/accuracy": correct / count}

    def dpo_loss(self, policy, batch_size: int) -> torch.Tensor:
        """DPO's loss on ``batch_size`` of this process's triples, drawn with ``generator`` (with gradient)."""
        index = torch.randperm(self.size, generator=self.generator)[:batch_size].to(self.accelerator.device)
        return dpo_loss(self._margins(policy, index), self.reference_margins[index], self.cfg.dpo_beta)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _margins(self, policy, index: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """[len(index)] margins of the triples ``index`` under ``policy`` (its base model with ``reference``),
        in chunks of ``chunk_size`` rows."""
        rows, parts = self.rows, []
        for chunk in torch.split(index, max(1, self.chunk_size // 2)):
            both = torch.cat([chunk, chunk + self.size])
            ids = torch.cat([rows.query_ids[both], rows.response_ids[both]], dim=1)
            mask = torch.cat([rows.query_mask[both], rows.response_mask[both]], dim=1)
            logits = policy.reference_logits(ids, mask) if reference else policy(ids, mask)[0]
            logprobs = sequence_logprobs(response_logprobs(logits, rows.response_ids[both], self.temperature),
                                         rows.response_mask[both], self.cfg.length_normalised)
            parts.append(margins(*logprobs.split(len(chunk))))
        return torch.cat(parts)
