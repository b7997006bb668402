"""trl's generation batch as a dict of per-row tensors: cutting it to rows, joining two, and the rows it
records. Pure tensor work, apart from `kept_rows`, which agrees on a row count with every process.

A generation batch holds B rows per process: ``prompt_ids`` [B, P] (left-padded), ``completion_ids`` [B, T]
(right-padded), their masks and per-token values, ``advantages`` [B], and batch-wide scalars such as
``num_items_in_batch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

# Per-row tensors of trl's generation batch: [B, ...] and cut or padded together.
LEFT_PADDED = ("prompt_ids", "prompt_mask")
RIGHT_PADDED = ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps",
                "sampling_per_token_logps", "importance_sampling_ratio", "tool_mask")


def loss_mask(batch: dict) -> torch.Tensor:
    """[B, T] the tokens trl's loss counts: the completion mask, times the tool mask in multi-turn runs."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


def process_slice(accelerator: Accelerator, batch_size: int) -> slice:
    """This process's rows of a [B × processes] tensor gathered in process order."""
    start = accelerator.process_index * batch_size
    return slice(start, start + batch_size)


def rows_of(batch: dict, rows: torch.Tensor) -> dict:
    """The batch's per-row tensors cut to ``rows`` (indices); everything else as it is."""
    size = len(batch["advantages"])
    return {key: (value[rows.to(value.device)] if isinstance(value, torch.Tensor) and value.dim() > 0
                  and value.shape[0] == size else value) for key, value in batch.items()}


def first_kept(keep: torch.Tensor, most: int) -> torch.Tensor:
    """[B] ``keep`` limited to its first ``most`` kept rows."""
    limited = keep.clone()
    limited[keep.nonzero().flatten()[most:]] = False
    return limited


def concatenated(first: dict, second: dict, pad_token_id: int) -> dict:
    """Two generation batches as one: prompts re-padded on the left, completions and per-token values on the
    right, per-row values concatenated; ``num_items_in_batch`` is recounted later by `kept_rows`."""
    joined = {}
    for key, a in first.items():
        b = second[key]
        if key in LEFT_PADDED or key in RIGHT_PADDED:
            width = max(a.shape[1], b.shape[1])
            fill = pad_token_id if key.endswith("_ids") else 0
            side = "left" if key in LEFT_PADDED else "right"
            joined[key] = torch.cat([_padded(a, width, fill, side), _padded(b, width, fill, side)])
        elif isinstance(a, torch.Tensor) and a.dim() > 0:
            joined[key] = torch.cat([a, b])
        else:
            joined[key] = a
    return joined


def _padded(values: torch.Tensor, width: int, fill, side: str) -> torch.Tensor:
    extra = values.new_full((values.shape[0], width - values.shape[1], *values.shape[2:]), fill)
    return torch.cat([extra, values] if side == "left" else [values, extra], dim=1)


def kept_rows(batch: dict, keep: torch.Tensor, accelerator: Accelerator, chunks: int) -> dict:
    """The batch cut to its ``keep`` [B] rows. Every process keeps the same number of rows R, a multiple of
    ``chunks`` (trl's ``steps_per_generation``, so that its buffer splits evenly): a process that kept fewer
    pads with dropped rows whose loss mask and advantage are zero. ``num_items_in_batch`` then counts the kept
    tokens, and ``iif_kept_rows`` the kept completions, over all processes."""
    acc = accelerator
    kept = int(keep.sum())
    most = int(acc.gather(torch.tensor([kept], device=acc.device)).max())
    rows_per_process = max(chunks, math.ceil(most / chunks) * chunks)
    order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])[:rows_per_process]
    cut = rows_of(batch, order)
    padding = ~keep[order]
    for key in ("completion_mask", "tool_mask"):
        if key in cut:
            cut[key] = cut[key].masked_fill(padding[:, None].to(cut[key].device), 0)
    cut["advantages"] = cut["advantages"].masked_fill(padding.to(cut["advantages"].device), 0.0)
    cut["num_items_in_batch"] = acc.gather(loss_mask(cut).sum()[None]).sum()
    cut["iif_kept_rows"] = acc.reduce(torch.tensor(float(kept), device=acc.device), "sum")
    return cut


def generation_records(batch: dict, decode: Callable[[torch.Tensor], list[str]], rewards: torch.Tensor,
                       keep: torch.Tensor, influence: torch.Tensor | None) -> list[dict]:
    """One record per row of this process's generation batch, before dropped rows leave it: prompt, response,
    reward, advantage, influence (NaN when not scored) and kept; ``decode`` turns [B, T] ids into texts."""
    prompts, completions = decode(batch["prompt_ids"]), decode(batch["completion_ids"])
    return [{"prompt": prompts[i], "response": completions[i], "reward": float(rewards[i]),
             "advantage": float(batch["advantages"][i]),
             "influence": float(influence[i]) if influence is not None else math.nan, "kept": bool(keep[i])}
            for i in range(len(prompts))]
