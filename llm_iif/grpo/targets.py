"""The target rows `IIFGRPOTrainer` scores against, as `TargetSource`s of the attribution core
(`llm_iif.attribution.stage`). The batch target needs none: it is built from the scored batch itself
(`llm_iif.grpo.scoring.GRPOScoring.loss_and_target`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from accelerate import Accelerator

from llm_iif.attribution.influence import TargetBatch
from llm_iif.grpo.batches import loss_mask
from llm_iif.lm.trusted import TrustedTriples


class FreshGroupTarget:
    """The fresh target: each round, a group of completions for each of this process's next
    ``prompts_per_process`` validation prompts (cycling ``validation_dataset``; ``round`` is saved in
    checkpoints), weighted by their group-relative advantages, so that f = Σ_v Σ_t log π(y_{v,t}) Â_v (f_seq with
    the group as baseline). ``generate_groups`` turns prompt rows into trl's generation batch for a group of
    completions of each, kept out of the run's logs."""

    def __init__(self, validation_dataset, accelerator: Accelerator, prompts_per_process: int,
                 generate_groups: Callable[[list[dict]], dict]):
        self.validation_dataset, self.accelerator = validation_dataset, accelerator
        self.prompts_per_process, self.generate_groups = prompts_per_process, generate_groups
        self.round, self.metrics = 0, {}

    def next_rows(self) -> list[dict]:
        """This process's prompt rows for the next round; processes take consecutive, disjoint slices."""
        processes, rank, size = self.accelerator.num_processes, self.accelerator.process_index, self.prompts_per_process
        first = (self.round * processes + rank) * size
        self.round += 1
        data = self.validation_dataset
        return [data[(first + i) % len(data)] for i in range(size)]

    def __call__(self, model) -> TargetBatch:
        start = time.perf_counter()
        batch = self.generate_groups(self.next_rows())
        self.metrics = {"time_val_generate_s": time.perf_counter() - start}
        mask = loss_mask(batch)
        return TargetBatch(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
                           batch["advantages"][:, None].expand_as(mask).float())


class PreferenceTarget:
    """The preference target: every trusted triple of this process, every generation batch,
    f = Σ log π(chosen) − log π(rejected) (`TrustedTriples.target_rows`); nothing is generated."""

    def __init__(self, trusted: TrustedTriples):
        self.trusted, self.metrics = trusted, {}

    def __call__(self, model) -> TargetBatch:
        return self.trusted.target_rows()
