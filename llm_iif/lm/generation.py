"""Sampling responses from a causal LM and scoring them token by token.

Responses are right-padded after their first EOS, which stays in the response and in its mask.
"""

from __future__ import annotations

import torch

from llm_iif.recipes import PPOConfig
from llm_iif.core.tokens import at_response_positions, response_logprobs


def truncate_after_eos(response_ids: torch.Tensor, eos_token_id: int,
                       pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first EOS; pad the rest.

    response_ids: [B, T]. Returns (ids [B, T], mask [B, T] with 1 on kept tokens).
    """
    is_eos = response_ids == eos_token_id
    # A token is kept when no EOS came strictly before it.
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = ~eos_before
    return response_ids.masked_fill(~mask, pad_token_id), mask.long()


@torch.no_grad()
def sample_responses(lm, tokenizer, prompts: list[str], cfg: PPOConfig, device) -> tuple[torch.Tensor, ...]:
    """Sample one response per prompt, ``cfg.generation_batch_size`` prompts per `generate` call.

    Returns (query_ids [B, P], query_mask, response_ids [B, T], response_mask)."""
    query = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False).to(device)
    chunks = []
    for start in range(0, len(prompts), cfg.generation_batch_size):
        ids = query["input_ids"][start:start + cfg.generation_batch_size]
        output = lm.generate(
            input_ids=ids, attention_mask=query["attention_mask"][start:start + cfg.generation_batch_size],
            do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        chunks.append(output[:, ids.shape[1]:])
    width = max(chunk.shape[1] for chunk in chunks)  # a chunk stops early when all its rows hit EOS
    generated = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id)
                           for c in chunks])
    response_ids, response_mask = truncate_after_eos(generated, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return query["input_ids"], query["attention_mask"], response_ids, response_mask


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], device) -> tuple[torch.Tensor, ...]:
    """Given (prompt, response) text pairs as a rollout would hold them: left-padded prompts and right-padded
    responses ending in EOS. Returns (query_ids [B, P], query_mask, response_ids [B, T], response_mask)."""
    query = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    encoded = [ids + [tokenizer.eos_token_id] for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    width = max(len(ids) for ids in encoded)
    response_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros_like(response_ids)
    for row, ids in enumerate(encoded):
        response_ids[row, :len(ids)] = torch.tensor(ids)
        response_mask[row, :len(ids)] = 1
    return (query["input_ids"].to(device), query["attention_mask"].to(device), response_ids.to(device),
            response_mask.to(device))


@torch.no_grad()
def per_token_outputs(policy, query_ids, query_mask, response_ids, response_mask, temperature: float,
                 chunk_size: int) -> dict[str, torch.Tensor]:
    """Per-token log-probs, reference log-probs, values and entropies [B, T] at the current parameters."""
    from trl.trainer.utils import entropy_from_logits  # slow to import: only a process that generates pays it

    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    response_len = response_ids.shape[1]
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    for start in range(0, input_ids.shape[0], chunk_size):
        ids, mask = input_ids[start:start + chunk_size], attention_mask[start:start + chunk_size]
        resp = response_ids[start:start + chunk_size]
        logits, values = policy(ids, mask)
        ref_logits = policy.reference_logits(ids, mask)
        parts["logprobs"].append(response_logprobs(logits, resp, temperature))
        parts["ref_logprobs"].append(response_logprobs(ref_logits, resp, temperature))
        parts["values"].append(at_response_positions(values, response_len))
        parts["entropy"].append(entropy_from_logits(at_response_positions(logits, response_len) / temperature))
    return {name: torch.cat(chunks) for name, chunks in parts.items()}

