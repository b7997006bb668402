"""Cross-process helpers: sums over processes, gathers of per-sample values, and rebalancing rows.

Every function here is called by all processes together (each is a collective). With one process they
reduce to the identity, so single-process code runs the same path.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from llm_iif.core.records import concat_rows, map_tensors, pad_to_widths


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether this launch shards parameters over processes (FSDP or DeepSpeed ZeRO-3). Influence scoring needs
    whole LoRA weights on every process, so IIF refuses such launches until sharded scoring exists."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)


@contextmanager
def process_group_released():
    """Destroy the process group when the block ends, after collecting what the block left behind: a trainer
    held in reference cycles (trl's, through its callbacks) keeps a DDP model whose gloo threads abort the
    process at exit if they outlive the group."""
    try:
        yield
    finally:
        gc.collect()
        PartialState().destroy_process_group()


def gather_values(accelerator: Accelerator, local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's [B_p] values concatenated in process order (on the CPU, float32), and where this
    process's rows start in it."""
    counts = gather_object([len(local)])
    everything = torch.tensor(gather_object(local.tolist()), dtype=torch.float32)
    return everything, sum(counts[:accelerator.process_index])


def sum_gradients(accelerator: Accelerator, *gradients: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each {name: tensor} gradient summed over processes, in one all-reduce."""
    names = list(gradients[0])
    flat = accelerator.reduce(torch.cat([torch.cat([g[n].flatten() for n in names]) for g in gradients]), "sum")
    return [unflatten(part, gradients[0]) for part in flat.chunk(len(gradients))]


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped as ``like``'s values, in its key order."""
    parts = flat.split([t.numel() for t in like.values()])
    return {name: part.view_as(t) for (name, t), part in zip(like.items(), parts)}


def rebalance(accelerator: Accelerator, records: tuple, pad_token_id: int) -> tuple[tuple, bool]:
    """Spread per-sample records evenly over the processes, so that each runs the same optimiser steps however
    unevenly filtering kept them: the j-th row of the whole batch (in process order) goes to process j mod N.

    ``records`` are per-sample dataclasses with the same rows (e.g. a rollout and its advantages). Returns
    (this process's records, placeholder); a process left with no row (fewer rows than processes) gets a
    copy of one and ``placeholder`` is True, so it can take zero-weight steps.
    """
    if accelerator.num_processes == 1:
        return records, False
    widths = accelerator.reduce(torch.tensor([records[0].query_ids.shape[1], records[0].response_ids.shape[1]],
                                             device=accelerator.device), "max").tolist()

    def to_cpu(record):
        return map_tensors(pad_to_widths(record, *widths, pad_token_id), lambda _, t: t.cpu())

    shards = gather_object([tuple(to_cpu(r) for r in records)])
    every = [concat_rows([shard[i] for shard in shards]) for i in range(len(records))]
    mine = torch.arange(accelerator.process_index, len(every[0]), accelerator.num_processes)
    placeholder = len(mine) == 0
    if placeholder:
        mine = torch.tensor([accelerator.process_index % len(every[0])])
    return tuple(map_tensors(r.select(mine), lambda _, t: t.to(accelerator.device)) for r in every), placeholder
