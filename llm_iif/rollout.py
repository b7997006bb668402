"""Rollouts: sample responses to left-padded prompts, then score them token by token.

A `Rollout` holds one round's samples on one process. P is the padded prompt length and T the response
length; responses are right-padded after their first EOS, which stays in the response and in its mask.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from llm_iif.config import PPOConfig


@dataclass
class Rollout:
    prompts: list[str]
    responses: list[str]
    query_ids: torch.Tensor       # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor      # [B, P]
    response_ids: torch.Tensor    # [B, T] sampled tokens, pad after the first EOS
    response_mask: torch.Tensor   # [B, T] 1 up to and including the first EOS
    scores: torch.Tensor          # [B] reward-model score of each response
    logprobs: torch.Tensor        # [B, T] log π_θ(k) of each response token
    ref_logprobs: torch.Tensor    # [B, T] log π_ref (adapter disabled)
    values: torch.Tensor          # [B, T] V_θ(k) of the state before each response token
    entropy: torch.Tensor         # [B, T] policy entropy at each response position

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> "Rollout":
        """The samples at ``index`` (a [B] bool mask or a 1-D index tensor), in that order."""
        return select_rows(self, index)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def select_rows(record, index: torch.Tensor):
    """A copy of a per-sample dataclass keeping the rows at ``index`` (a [B] bool mask or 1-D indices) of
    every tensor and list field."""
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(-1)
    picked = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, torch.Tensor):
            picked[f.name] = value[index.to(value.device)]
        else:
            picked[f.name] = [value[i] for i in index.tolist()]
    return replace(record, **picked)


def concat_rows(records: list):
    """One per-sample dataclass holding the rows of ``records`` (same type and tensor widths) in order."""
    joined = {}
    for f in fields(records[0]):
        values = [getattr(r, f.name) for r in records]
        joined[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values, [])
    return replace(records[0], **joined)


def map_tensors(record, fn):
    """A copy of a per-sample dataclass with ``fn(name, tensor)`` applied to every tensor field."""
    return replace(record, **{f.name: fn(f.name, getattr(record, f.name)) for f in fields(record)
                              if isinstance(getattr(record, f.name), torch.Tensor)})


def pad_to_widths(record, query_width: int, response_width: int, pad_token_id: int):
    """Pad a per-sample dataclass's [B, P] query fields on the left to ``query_width`` and its [B, T] fields
    on the right to ``response_width``, so rows from different processes can be stacked. Padded ids are
    ``pad_token_id``; padded masks and per-token values are 0, so masked statistics do not change."""
    def pad(name, value):
        if value.dim() != 2:
            return value
        fill = pad_token_id if name.endswith("_ids") else 0
        if name.startswith("query_"):
            return torch.nn.functional.pad(value, (query_width - value.shape[1], 0), value=fill)
        return torch.nn.functional.pad(value, (0, response_width - value.shape[1]), value=fill)
    return map_tensors(record, pad)


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


def response_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(y_t | x, y_<t) [B, T] from full-sequence logits [B, P+T, V].

    Logits at position P-1+t predict response token t. They are divided by the sampling temperature, so
    the ratio is taken under the distribution that actually sampled the tokens.
    """
    response_len = response_ids.shape[1]
    return selective_log_softmax(at_response_positions(logits, response_len) / temperature, response_ids)


def at_response_positions(full: torch.Tensor, response_len: int) -> torch.Tensor:
    """The [B, T, ...] slice of a [B, P+T, ...] tensor whose position predicts each response token."""
    return full[:, -response_len - 1:-1]


@torch.no_grad()
def score_tokens(policy, query_ids, query_mask, response_ids, response_mask, temperature: float,
                 chunk_size: int) -> dict[str, torch.Tensor]:
    """Per-token log-probs, reference log-probs, values and entropies [B, T] at the current parameters."""
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
