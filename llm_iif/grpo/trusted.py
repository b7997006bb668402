"""The trusted triples of a GRPO run (the recipe's ``trusted`` section; `TrustedSet` through the API): this
process's share, tokenised as trl prompts the policy, as the rows of `llm_iif.lm.trusted.TrustedTriples`, which
both trainers share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from trl.trainer.utils import use_adapter

from llm_iif.attribution.influence import SequenceLogprobs, preference_target_rows
from llm_iif.recipes import PREFERENCE_COLUMNS, TrustedConfig
from llm_iif.core.errors import UserError
from llm_iif.lm.data import is_messages
from llm_iif.lm.trusted import TrustedTriples, process_share


@dataclass
class TrustedSet:
    """`IIFGRPOTrainer`'s ``trusted`` argument: (prompt, chosen, rejected) triples, as
    `llm_iif.lm.data.read_trusted_triples` returns them ({column: values}; a prompt is text or a list of
    role/content messages, chosen and rejected are the response texts), and how to use them (``config``:
    ``length_normalised``, ``dpo_coef``, ``dpo_beta``; its ``source`` only names the set in errors)."""
    triples: dict[str, list]
    config: TrustedConfig = field(default_factory=lambda: TrustedConfig(source="trusted"))


def trusted_prompt_ids(tokenizer, prompts: list, chat: bool, tools=None, chat_template: str | None = None,
                       chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of the trusted ``prompts`` as trl's `GRPOTrainer._tokenize_prompts` tokenises the policy's
    prompts (text-only, without environments): a message list through ``tokenizer.apply_chat_template`` with
    the generation prompt, trl's ``tools``, ``chat_template`` and ``chat_template_kwargs``; plain text with
    ``tokenizer(text)``. With ``chat`` (the run's prompts are conversational, as with ``model.chat_template``),
    a plain-text prompt is first wrapped as one user turn, as the run's own prompts were."""
    prompts = [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p for p in prompts]
    conversational = [i for i, p in enumerate(prompts) if is_messages(p)]
    ids: list[list[int] | None] = [None] * len(prompts)
    if conversational:
        if not (chat_template or tokenizer.chat_template):
            raise UserError("trusted: its prompts are message lists, but the policy's tokenizer has no chat "
                            "template; expected text prompts or a model with a chat template")
        encoded = tokenizer.apply_chat_template(
            [prompts[i] for i in conversational], tools=tools or None, chat_template=chat_template,
            add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {}))
        for i, row in zip(conversational, encoded["input_ids"]):
            ids[i] = list(row)
    plain = [i for i in range(len(prompts)) if ids[i] is None]
    if plain:
        for i, row in zip(plain, tokenizer(text=[prompts[i] for i in plain])["input_ids"]):
            ids[i] = list(row)
    return ids


def padded_rows(prompt_ids: list[list[int]], responses: list[str], tokenizer, device) -> tuple[torch.Tensor, ...]:
    """(query_ids [B, P], query_mask, response_ids [B, T], response_mask): the prompts padded on the left, as
    trl pads its prompts, whatever the tokenizer's ``padding_side``; the responses, tokenised without special
    tokens and ended by EOS (as a sampled completion ends), padded on the right."""
    from trl.trainer.utils import pad

    pad_id = tokenizer.pad_token_id
    queries = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
    answers = [torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.long)
               for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    return (pad(queries, pad_id, "left").to(device), pad([torch.ones_like(q) for q in queries], 0, "left").to(device),
            pad(answers, pad_id, "right").to(device), pad([torch.ones_like(a) for a in answers], 0, "right").to(device))


def grpo_trusted_triples(trusted: TrustedSet, tokenizer, prompt_ids_of, sequence_logprobs: SequenceLogprobs,
                         accelerator, generator: torch.Generator, chunk_size: int) -> TrustedTriples:
    """`TrustedTriples` for a trl policy: this process's share of ``trusted``, its prompts tokenised by
    ``prompt_ids_of`` (`trusted_prompt_ids`, as trl tokenises the policy's prompts) and padded on the left. The
    caller sets the reference margins (`TrustedTriples.set_reference`)."""
    missing = [name for name in PREFERENCE_COLUMNS if name not in trusted.triples]
    if missing:
        raise UserError(f"trusted: the triples have no {', '.join(missing)} (expected prompt, chosen and rejected)")
    mine = process_share(trusted.triples, accelerator)
    rows = preference_target_rows(lambda ids, responses: padded_rows(ids, responses, tokenizer, accelerator.device),
                                  prompt_ids_of(mine["prompt"]), mine["chosen"], mine["rejected"],
                                  trusted.config.length_normalised)
    return TrustedTriples(trusted.config, rows, sequence_logprobs, accelerator, generator, chunk_size)


def set_reference_at_first_use(triples: TrustedTriples, model, accelerator) -> None:
    """With peft, the reference margins at their first use: the adapter disabled (trl's "ref" one, if any), as
    trl computes its reference log-probs. Without peft they were set when the triples were built."""
    if triples.reference_margins is None:
        unwrapped = accelerator.unwrap_model(model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            triples.set_reference(model)


def trusted_metrics(triples: TrustedTriples, model, accelerator) -> dict[str, float]:
    """The policy's margin and accuracy on the trusted triples (`TrustedTriples.metrics`), with
    ``time_trusted_s``."""
    start = time.perf_counter()
    set_reference_at_first_use(triples, model, accelerator)
    return {**triples.metrics(model), "time_trusted_s": time.perf_counter() - start}
