"""Group filters, the baselines IIF-GRPO is compared with. Rewards [N] come in groups of G consecutive
completions of one prompt, trl's layout. A NaN reward (a completion no reward function could score, or one
whose reward was NaN or inf) is never kept and takes no part in its group's spread or variance.

`GroupFiltering` applies one to a generation batch of `IIFGRPOTrainer`, refilling DAPO's dropped groups with
new batches when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator

from llm_iif.core.distributed import global_mean, global_min
from llm_iif.grpo.batches import concatenated, first_kept, process_slice

EQUAL_REWARD_ATOL = 1e-6
"""Rewards closer than this count as equal: float noise must not make a group look informative."""


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling (arXiv 2503.14476): the [N] keep-mask that drops every group whose finite
    rewards are all equal (or that has fewer than two). Such a group's group-relative advantages are all zero,
    so it adds no policy gradient. Completions with a NaN reward are dropped too."""
    grouped = rewards.view(-1, group_size)
    finite = grouped.isfinite()
    spread = (torch.where(finite, grouped, -torch.inf).amax(dim=1)
              - torch.where(finite, grouped, torch.inf).amin(dim=1))
    varied = (finite.sum(dim=1) >= 2) & (spread > EQUAL_REWARD_ATOL)
    return varied.repeat_interleave(group_size) & finite.flatten()


def max_variance_subsets(rewards: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """PODS max-variance down-sampling (arXiv 2504.13818): the [N] keep-mask that keeps, in each group, the
    ``keep`` completions (or all its finite ones, if fewer) whose rewards have the largest variance.

    A max-variance subset of sorted values always takes the i lowest and the keep - i highest for some i, so
    trying the keep + 1 splits of each sorted group is exact, O(G log G) per group."""
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep={keep}: expected 1..{group_size} completions per group")
    grouped = rewards.view(-1, group_size)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    for g, group in enumerate(grouped):
        finite = group.isfinite().nonzero().flatten()
        order = finite[torch.sort(group[finite], stable=True).indices]
        size = min(keep, len(order))
        best, best_rows = -1.0, order[:0]
        for low in range(size + 1):
            rows = torch.cat([order[:low], order[len(order) - (size - low):]])
            variance = group[rows].var(unbiased=False).item() if size > 1 else 0.0
            if variance > best:
                best, best_rows = variance, rows
        mask[g, best_rows] = True
    return mask.flatten()


def subset_advantages(rewards: torch.Tensor, keep: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """[N] group-relative advantages computed over each group's kept completions only, as PODS does (the
    authors' code centres on the mean of the down-sampled group and divides by its std); 0 where not kept.

    ``scale`` is trl's ``scale_rewards``: ``group`` divides by the kept group's std, ``batch`` by the std of
    every kept reward, ``none`` not at all (trl's nanstd with Bessel's correction, plus 1e-4)."""
    kept = torch.where(keep, rewards, torch.nan).view(-1, group_size)
    centred = kept - kept.nanmean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(kept, dim=1) + 1e-4)
    elif scale == "batch":
        centred = centred / (_nanstd(kept.flatten(), dim=0) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards '{scale}': expected group, batch or none")
    return centred.flatten().nan_to_num(0.0)


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    count = values.isfinite().sum(dim=dim, keepdim=True)
    variance = ((values - values.nanmean(dim=dim, keepdim=True)) ** 2).nansum(dim=dim, keepdim=True)
    return (variance / (count - 1).clamp(min=1)).sqrt()


@dataclass
class GroupFilter:
    """A filter that decides from the rewards of each group of ``num_generations`` completions.

    ``dapo``: drop the groups whose rewards are all equal; with ``refill``, generate up to
    ``max_refill_batches`` more generation batches of new prompts to put informative groups in their place.
    ``pods``: keep the ``keep_per_group`` completions of each group whose rewards vary most."""
    kind: Literal["dapo", "pods"]
    refill: bool = False
    max_refill_batches: int = 4
    keep_per_group: int = 4


def group_ids(accelerator: Accelerator, size: int, group_size: int, generation: int = 0) -> torch.Tensor:
    """[size] ids of the prompt groups of this process's rows of a generation batch (``generation`` 0, or the
    n-th refill batch), unique over processes and batches: a group's ``group_size`` completions are consecutive
    rows."""
    processes, rank = accelerator.num_processes, accelerator.process_index
    return generation * processes * size + (rank * size + torch.arange(size)) // group_size


# A refill batch: trl's generation batch for given input rows, with every process's rewards [N] and this
# process's NaN-or-inf mask [B].
Generate = Callable[[list], tuple[dict, torch.Tensor, torch.Tensor]]


class GroupFiltering:
    """A `GroupFilter` applied to this process's rows of a generation batch.

    ``generate`` makes a refill batch; ``train_dataset`` is where its prompts come from, drawn with
    ``generator`` (seeded alike on every process, so that processes draw different prompts in step);
    ``scale_rewards`` is trl's, for PODS's advantages over the kept subset."""

    def __init__(self, spec: GroupFilter, accelerator: Accelerator, group_size: int, scale_rewards,
                 train_dataset, generator: torch.Generator, pad_token_id: int, generate: Generate):
        self.spec, self.accelerator, self.group_size = spec, accelerator, group_size
        self.scale_rewards, self.train_dataset, self.generator = scale_rewards, train_dataset, generator
        self.pad_token_id, self.generate = pad_token_id, generate

    def __call__(self, batch: dict, everyone: torch.Tensor, nonfinite: torch.Tensor, rewards: torch.Tensor):
        """The decision on ``batch`` (B rows here) from ``everyone``'s rewards [N] and this process's
        ``nonfinite`` [B] mask and ``rewards`` [B]: (batch, keep-mask, metrics, rewards, group ids), the last
        three over the batch's rows, refills included. DAPO with refill generates more batches of new prompts
        until every process has as many completions in informative groups as its batch had rows, or
        ``max_refill_batches`` is spent."""
        spec, group, size, acc = self.spec, self.group_size, len(nonfinite), self.accelerator
        local = process_slice(acc, size)
        if spec.kind == "pods":
            subsets = max_variance_subsets(everyone, group, spec.keep_per_group)
            batch["advantages"] = subset_advantages(everyone, subsets, group, self.scale_rewards)[local].to(
                batch["advantages"].device)
        else:
            subsets = varied_groups(everyone, group)
        keep = subsets[local].to(nonfinite.device) & ~nonfinite
        groups = group_ids(acc, size, group)
        metrics = {"informative_fraction": global_mean(acc, keep), "refill_batches": 0}
        if spec.kind == "dapo" and spec.refill:
            # Every process refills until it has its own batch's worth of informative completions, and keeps no
            # more, so that no process trains on (and pads every other process up to) a larger batch.
            while global_min(acc, keep.sum()) < size and metrics["refill_batches"] < spec.max_refill_batches:
                extra, extra_everyone, extra_nonfinite = self.generate(self.refill_inputs(size))
                extra_keep = varied_groups(extra_everyone, group)[local].to(keep.device) & ~extra_nonfinite
                batch, keep = concatenated(batch, extra, self.pad_token_id), torch.cat([keep, extra_keep])
                rewards = torch.cat([rewards, extra_everyone[local]])
                metrics["refill_batches"] += 1
                groups = torch.cat([groups, group_ids(acc, size, group, metrics["refill_batches"])])
            keep = first_kept(keep, size)
        return batch, keep, metrics, rewards, groups

    def refill_inputs(self, size: int) -> list:
        """``size`` new rows (size / group_size prompts, each repeated), drawn at random from the train set."""
        acc, prompts = self.accelerator, size // self.group_size
        draws = torch.randint(len(self.train_dataset), (acc.num_processes, prompts),
                              generator=self.generator)[acc.process_index]
        return [self.train_dataset[int(i)] for i in draws for _ in range(self.group_size)]
