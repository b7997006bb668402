"""Cross-process helpers: sums over processes, gathers of per-sample values, and rebalancing rows.

Every function here is called by all processes together (each is a collective). With one process they
reduce to the identity, so single-process code runs the same path.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from torch import nn

from llm_iif.core.errors import UserError
from llm_iif.core.records import concat_rows, map_tensors, pad_to_widths


def sharding_refusal(accelerator: Accelerator) -> str | None:
    """Why influence scoring cannot run under this launch's parameter sharding, or None when it can. FSDP2 can:
    the attribution hooks form every per-layer sum from whole activations and output gradients. FSDP1 and
    DeepSpeed ZeRO-3 are not supported, nor FSDP2 with parameters offloaded to the CPU (not run)."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.zero_stage == 3:
        return "DeepSpeed ZeRO-3 (zero_stage: 3) is not supported with influence scoring; use FSDP2, DDP or ZeRO-2"
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    fsdp = accelerator.state.fsdp_plugin
    if fsdp.fsdp_version != 2:
        return (f"fsdp_version: {fsdp.fsdp_version} (FSDP1) is not supported with influence scoring; "
                "expected fsdp_version: 2")
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(fsdp.cpu_offload, CPUOffloadPolicy):
        return "fsdp_offload_params: true is not supported with influence scoring (not run); expected false"
    return None


def check_scoring_supported(accelerator: Accelerator) -> None:
    """`UserError` naming the launch setting when influence scoring cannot run under this launch
    (`sharding_refusal`); callers skip the check when nothing is scored (``iif.mode: random``)."""
    refusal = sharding_refusal(accelerator)
    if refusal:
        raise UserError(f"{refusal} (or set iif.mode: random)")


def fsdp2_layer_classes(accelerator: Accelerator) -> list[str] | None:
    """The decoder layer classes an FSDP2 launch shards (``fsdp_transformer_layer_cls_to_wrap``), or None for a
    launch without FSDP2."""
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is None or fsdp.fsdp_version != 2:
        return None
    names = fsdp.transformer_cls_names_to_wrap
    if not names:
        raise UserError("fsdp_transformer_layer_cls_to_wrap: an FSDP2 launch needs the model's decoder layer "
                        "class (e.g. LlamaDecoderLayer)")
    return [names] if isinstance(names, str) else list(names)


def shard_with_fsdp2(model: nn.Module, layer_classes: list[str], generating: nn.Module) -> None:
    """Shard ``model``'s parameters over all processes with FSDP2 (torch's ``fully_shard``), in place, as
    Accelerate's FSDP2 plugin does: one unit per module of a class in ``layer_classes`` (the decoder layers),
    then ``model`` as the root. ``generating`` (the causal LM whose ``generate`` is called, inside ``model``)
    is a unit of its own, so that generation, which never calls the root, gathers its embeddings; the root is
    fixed now for the same reason (FSDP2 makes the first module to run its root).

    Raises `UserError` naming ``fsdp_transformer_layer_cls_to_wrap`` for a class the model does not have."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    present = {type(m).__name__ for m in model.modules()}
    for name in layer_classes:
        if name not in present:
            layers = sorted(c for c in present if c.endswith(("Block", "Layer")))
            raise UserError(f"fsdp_transformer_layer_cls_to_wrap: '{name}' is not a module class of the model "
                            f"(expected one of: {', '.join(layers) or 'its decoder layer class'})")
    units = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for module in [*units, generating, model]:
        fully_shard(module)
        if dist.get_backend() == "gloo":  # gloo has no pre-scaled sum; FSDP2 then sums and divides itself
            module.set_force_sum_reduction_for_comms(True)
        module._is_fsdp_managed_module = True  # transformers' generate then keeps the processes in step
    model._get_fsdp_state()._lazy_init()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(is_dtensor(p) for p in model.parameters())


def gradients_held_elsewhere(accelerator: Accelerator, model: nn.Module) -> str | None:
    """Why this process cannot set ``model``'s whole gradients itself, as in-run scoring does: FSDP2 shards
    them (a sharded model, or Accelerate's FSDP2 plugin, which shards when training starts) and DeepSpeed owns
    them. None when it can."""
    state = accelerator.state
    if is_sharded(model) or getattr(state, "fsdp_plugin", None) is not None:
        return "iif.scoring: in-run is not run under FSDP2 (its gradients are shards)"
    if getattr(state, "deepspeed_plugin", None) is not None:
        return "iif.scoring: in-run is not run under DeepSpeed, which owns the gradients"
    return None


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or the whole tensor gathered from an FSDP2 DTensor's shards (then every process must call
    this)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    # Nothing is a DTensor until FSDP2 has imported the module; importing it here would add half a second to
    # every start.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def whole_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(the trainable parameters by name, optimizer state dict) with whole tensors on the CPU, gathered from the
    shards of an FSDP2 model (the optimizer's complete on the main process; every process must call this).
    Only what training changes is gathered: the frozen base weights, and aliases of them such as a tied
    ``lm_head.weight``, stay sharded. The optimizer's state is keyed by parameter name, as `load_whole_state`
    reads it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = {name: whole_tensor(param).detach().cpu() for name, param in model.named_parameters()
               if param.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return weights, get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_whole_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load whole ``weights`` (the trainable parameters, `whole_state`) and an optimizer state into an FSDP2
    model's shards (every process must call this). Non-strict, as the frozen weights are not in ``weights``:
    the caller checks that every trainable name is."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optimizer_state,
                             options=StateDictOptions(full_state_dict=True))


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


@contextmanager
def accelerate_state_kept():
    """Run a block that sets up Accelerate for itself (an HF ``Trainer``: trl's ``RewardTrainer`` or
    ``GRPOTrainer``), then put the process's Accelerate state back as it was. Accelerate keeps one state per
    process and every later ``Accelerator()`` inherits it, so without this a reward model trained in bf16 would
    train and score every later run of the process in bf16."""
    from accelerate.state import AcceleratorState, GradientState

    shared = [PartialState._shared_state, AcceleratorState._shared_state, GradientState._shared_state]
    before = [dict(state) for state in shared]
    try:
        yield
    finally:
        for state, saved in zip(shared, before):  # in place: every Accelerator made before holds these dicts
            state.clear()
            state.update(saved)


def gather_values(accelerator: Accelerator, local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's [B_p] values concatenated in process order (on the CPU, float32), and where this
    process's rows start in it."""
    counts = gather_object([len(local)])
    everything = torch.tensor(gather_object(local.tolist()), dtype=torch.float32)
    return everything, sum(counts[:accelerator.process_index])


def global_sum(accelerator: Accelerator, values: torch.Tensor) -> float:
    """The sum of ``values`` over every process."""
    return accelerator.reduce(values.float().sum().to(accelerator.device), "sum").item()


def global_max(accelerator: Accelerator, value: torch.Tensor) -> float:
    """The largest of every process's one-element ``value``."""
    return accelerator.reduce(value.float().reshape(1).to(accelerator.device), "max").item()


def global_min(accelerator: Accelerator, value: torch.Tensor) -> float:
    """The smallest of every process's one-element ``value``."""
    return accelerator.gather(value.float().reshape(1).to(accelerator.device)).min().item()


def global_mean(accelerator: Accelerator, values: torch.Tensor) -> float:
    """The mean of ``values`` over every process's elements (0 when there are none)."""
    return global_sum(accelerator, values) / max(global_sum(accelerator, torch.ones_like(values)), 1.0)


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
