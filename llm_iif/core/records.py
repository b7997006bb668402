"""Typed per-sample and per-round records shared by every layer.

A per-sample record is a dataclass whose tensor fields have the batch as their first dimension and whose
list fields hold one entry per sample; `select_rows`, `concat_rows`, `map_tensors` and `pad_to_widths` work
on any of them. B is the batch, P the padded prompt length and T the response length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Rollout:
    prompts: list[str]
    responses: list[str]
    query_ids: torch.Tensor       # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor      # [B, P]
    response_ids: torch.Tensor    # [B, T] sampled tokens, pad after the first EOS
    response_mask: torch.Tensor   # [B, T] 1 up to and including the first EOS
    rewards: torch.Tensor         # [B] reward of each response
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


@dataclass
class Advantages:
    """Per-token training signals of one rollout, all [B, T]."""
    kl: torch.Tensor          # log π_θ(k) - log π_ref of each response token
    advantages: torch.Tensor  # GAE advantages, whitened over the whole batch
    returns: torch.Tensor     # value targets

    def __len__(self) -> int:
        return self.kl.shape[0]

    def select(self, index: torch.Tensor) -> "Advantages":
        return select_rows(self, index)


@dataclass
class UpdateStats:
    """Mean statistics of one round's PPO update over all its steps and processes."""
    policy_loss: float
    value_loss: float
    clipfrac: float
    value_clipfrac: float
    approx_kl: float
    dpo_loss: float | None = None
    """The trusted triples' DPO loss (`trusted.dpo_coef`), None when it is off."""


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

