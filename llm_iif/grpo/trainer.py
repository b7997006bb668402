"""`IIFGRPOTrainer`: trl's `GRPOTrainer` that filters each generation batch before training on it.

trl generates one generation batch every ``steps_per_generation × num_iterations`` optimiser steps, in
`_generate_and_score_completions`, while the model still holds the parameters θ(k) that sampled it. This
subclass takes the batch from there and, before trl buffers it:

1. applies a group filter, if any (DAPO's dynamic sampling, PODS's max-variance down-sampling;
   `llm_iif.grpo.groups.GroupFiltering`), then IIF, if any, among what the group filter kept: it scores every
   candidate completion at θ(k) with the shared attribution core, the gradient of its GRPO loss term
   (`llm_iif.grpo.losses`) against the target gradient, and decides once over all processes
   (`llm_iif.grpo.scoring.GRPOScoring`, with a target of `llm_iif.grpo.targets`);
2. removes the dropped completions, so that the update runs on fewer sequences (`llm_iif.grpo.batches`);
3. fixes the loss normaliser so that it counts only the kept completions or tokens
   (`llm_iif.grpo.losses.rescaled_to_kept`).

With trusted triples (``trusted``), each generation batch also logs the policy's margin on them at θ(k), and
``trusted.dpo_coef`` adds their DPO loss to every training step's loss (`llm_iif.grpo.trusted`).

Everything else is trl's: generation, rewards, advantages, the loss, the optimiser, logging. This class keeps
only what overrides trl's hooks and wires the parts together. Supported trl range: see ``TRL_RANGE``; the
overridden internals are `_generate_and_score_completions`, `_calculate_rewards`, `_compute_loss`,
`training_step` and `_save_checkpoint`. With ``iif.scoring: in-run``, steps 1-3 move into the update itself:
the batch is cut to its candidates only, and the scores come from trl's training backward
(`llm_iif.grpo.in_run`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import trl
from packaging.specifiers import SpecifierSet
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from llm_iif.attribution.stage import IIFStage
from llm_iif.core.distributed import global_sum
from llm_iif.core.errors import UserError
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.grpo.batches import generation_records, kept_rows, loss_mask, process_slice
from llm_iif.grpo.checkpoint import FilterState
from llm_iif.grpo.checks import check_filter_settings, check_preferences, in_run_obstacle
from llm_iif.grpo.groups import GroupFilter, GroupFiltering, group_ids
from llm_iif.grpo.in_run import InRunScoring
from llm_iif.grpo.losses import rescaled_to_kept
from llm_iif.grpo.rewards import BatchRewards
from llm_iif.grpo.scoring import GRPOScoring, TrlLoss
from llm_iif.grpo.targets import FreshGroupTarget, PreferenceTarget
from llm_iif.grpo.trusted import (TrustedSet, grpo_trusted_triples, set_reference_at_first_use, trusted_metrics,
                                  trusted_prompt_ids)
from llm_iif.lm.trusted import TrustedTriples
from llm_iif.recipes import GRPOIIFConfig

logger = logging.getLogger(__name__)

TRL_RANGE = ">=1.16,<1.17"  # the versions whose GRPOTrainer internals were checked


class IIFGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with influence-based filtering (``iif``) or a group filter (``group_filter``).

    Takes every `GRPOTrainer` argument, plus:
      iif: what to score against and how much to drop (`llm_iif.recipes.GRPOIIFConfig`; ``target_source``
        ``batch`` or ``fresh``). Passing one turns filtering on (its ``enabled`` field is the recipe's switch
        and is not read here); None, and no group_filter, trains as plain GRPO.
      group_filter: a `GroupFilter`: a baseline instead of ``iif``, or, for ``dapo``, the filter IIF runs after.
      validation_dataset: rows with a ``prompt`` column (and whatever the reward functions read), for
        ``target_source: fresh`` with ``iif.target: seq``: each round samples ``num_generations`` completions
        for each of ``iif.val_size / num_generations`` of its prompts and builds f_seq from their group
        advantages.
      trusted: a `TrustedSet` of (prompt, chosen, rejected) triples, each process taking an equal contiguous
        share. Every generation batch logs ``trusted/margin`` and ``trusted/accuracy`` at θ(k) (and
        ``time_trusted_s``); ``iif.target: preference`` scores against the margin of all of them
        (`PreferenceTarget`); ``config.dpo_coef`` > 0 adds dpo_coef × their DPO loss, on
        ``per_device_train_batch_size`` triples drawn anew, to every micro-batch's loss (logged as
        ``dpo_loss``). Prompts are tokenised as trl tokenises the policy's: through the chat template when the
        run's prompts are conversational (a plain-text trusted prompt as one user turn) or the trusted prompt
        is a message list. The reference is the model with its adapter disabled (trl's ``ref`` adapter, if
        loaded), or, without peft, the model as this trainer is built.
      nonfinite_patience: generation batches in a row that may contain NaN or inf rewards from a reward
        function; those completions are dropped and counted. One more such batch stops training.

    Filtering metrics go to trl's logs under ``iif/``: ``kept_fraction``, ``influence_mean``,
    ``influence_neg_fraction``, ``target_split_cos`` (the target's reliability), ``time_influence_s``.
    ``generation_records`` holds this process's rows of the latest training generation batch (prompt,
    completion, reward, advantage, influence, kept), for run outputs to write.

    Checkpoints are trl's (``save_steps``, ``train(resume_from_checkpoint=...)``) plus ``iif_state.pt``: the
    filter's random generators, the NaN patience count, the fresh target's position in the validation set and
    every process's DPO generator, loaded with ``weights_only=True``, so that a resumed run filters (and draws
    DPO mini-batches) as an uninterrupted one would.
    """

    def __init__(self, *args, iif: GRPOIIFConfig | None = None, group_filter: GroupFilter | None = None,
                 validation_dataset=None, nonfinite_patience: int = 0, trusted: TrustedSet | None = None,
                 **kwargs):
        if trl.__version__ not in SpecifierSet(TRL_RANGE):
            raise UserError(f"trl {trl.__version__}: IIFGRPOTrainer overrides GRPOTrainer internals checked for trl "
                            f"{TRL_RANGE}; install a version in that range")
        super().__init__(*args, **kwargs)
        if iif is not None and iif.score_batch_size is None:  # the rows a training micro-batch already holds
            iif = dataclasses.replace(iif, score_batch_size=self.args.per_device_train_batch_size)
        self.iif, self.group_filter, self.validation_dataset = iif, group_filter, validation_dataset
        check_filter_settings(self)
        self._trusted = self._trusted_triples(trusted)
        if iif is not None and iif.target == "preference":
            check_preferences(iif, self._trusted, self.accelerator.num_processes)
        self._guard = NonfiniteGuard(nonfinite_patience)
        self._rewards = BatchRewards(self.accelerator, self._guard)
        self.reward_funcs = self._rewards.checked(self.reward_funcs)
        refill_generator = torch.Generator().manual_seed(self.args.seed + 1)  # the same draws on every process
        self._group_filtering = None if group_filter is None else GroupFiltering(
            group_filter, self.accelerator, self.num_generations, self.scale_rewards, self.train_dataset,
            refill_generator, self._tokenizer.pad_token_id, self._generated)
        self._scoring = None if iif is None else self._iif_scoring(iif)
        self._filter_state = FilterState(self.accelerator, refill_generator, self._guard,
                                         self._scoring.stage if self._scoring is not None else None, self._trusted)
        self._kept_rows_in_window = 0.0  # kept completions behind the optimiser step being accumulated
        self._window = None  # in-run scoring: the open window's records, metrics, batch size and seconds so far
        self.generation_records: list[dict] = []

    @property
    def _in_run(self) -> InRunScoring | None:
        """In-run scoring's window, when IIF scores in-run."""
        return self._scoring.in_run if self._scoring is not None else None

    def _iif_scoring(self, iif: GRPOIIFConfig) -> GRPOScoring:
        """The IIF stage with its target source, scoring in-run where ``iif.scoring`` asks and the settings
        allow it."""
        acc = self.accelerator
        if iif.target == "preference":
            source = PreferenceTarget(self._trusted)
        elif iif.target_source == "fresh":
            source = FreshGroupTarget(self.validation_dataset, acc,
                                      iif.val_size // self.num_generations // acc.num_processes, self._validation_batch)
        else:
            source = None  # the batch target: from the scored batch itself
        generator = torch.Generator().manual_seed(self.args.seed)  # the same draws on every process
        stage = IIFStage(iif, acc, source, self._sequence_logprobs, self._guard, generator)
        obstacle = in_run_obstacle(self) if iif.scoring != "separate" else None
        if iif.scoring == "in-run" and obstacle:
            raise UserError(obstacle)
        in_run = None
        if iif.scoring != "separate" and obstacle is None:
            in_run = InRunScoring(stage, acc, self.loss_type)
        elif iif.scoring == "auto" and acc.is_main_process:
            logger.info("iif.scoring auto: the separate scoring pass, since %s", obstacle.split(";")[0])
        loss = TrlLoss(self.loss_type, self.beta, self.args.use_bias_correction_kl, self.epsilon_high,
                       self.importance_sampling_level, self.max_completion_length)
        return GRPOScoring(stage, acc, loss, self._sequence_logprobs, lambda: self.optimizer, in_run)

    # ---------------------------------------------------------------------------------------- trusted triples
    def _trusted_triples(self, trusted: TrustedSet | None) -> TrustedTriples | None:
        """This process's share of ``trusted``, tokenised as trl tokenises the policy's prompts; without peft,
        with its reference margins at the parameters the run starts from (with peft, at the first use)."""
        if trusted is None:
            return None
        if self._is_vlm:
            raise UserError("trusted: trusted triples support text-only models; this processing class is a "
                            "multimodal processor")
        first = self.train_dataset[0] if hasattr(self.train_dataset, "__getitem__") else next(iter(self.train_dataset))
        chat = is_conversational({"prompt": first["prompt"]})

        def prompt_ids(prompts: list) -> list[list[int]]:
            return trusted_prompt_ids(self.processing_class, prompts, chat, self.tools, self.chat_template,
                                      self.chat_template_kwargs)

        triples = grpo_trusted_triples(trusted, self._tokenizer, prompt_ids, self._sequence_logprobs, self.accelerator,
                                       torch.Generator().manual_seed(self.args.seed + self.accelerator.process_index),
                                       chunk_size=self.args.per_device_train_batch_size // 2)
        if not hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            triples.set_reference(self.model)
        return triples

    @property
    def dpo_coef(self) -> float:
        """``trusted.dpo_coef``, 0 without trusted triples."""
        return self._trusted.cfg.dpo_coef if self._trusted is not None else 0.0

    # ------------------------------------------------------------------------------------------- trl hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """trl's rewards [N, F] over all processes, whose weighted sum `BatchRewards` keeps for the filters."""
        self._rewards.start()
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards.record(rewards_per_func, self.reward_weights, len(inputs))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return batch
        if self._trusted is not None:  # at θ(k), the parameters that sampled this batch
            for name, value in trusted_metrics(self._trusted, self.model, self.accelerator).items():
                self._metrics["train"][name].append(value)
        acc, size = self.accelerator, len(inputs)
        rewards = self._rewards.latest[process_slice(acc, size)]
        if self._scoring is None and self._group_filtering is None:
            self.generation_records = self._records(batch, rewards, torch.ones(size, dtype=torch.bool), None)
            return batch
        start = time.perf_counter()
        self._guard.start_round()
        # 1. The candidates: every completion with a finite reward, or those a group filter keeps.
        nonfinite = self._rewards.nonfinite_mask(size)
        keep, metrics, groups = ~nonfinite, {}, group_ids(acc, size, self.num_generations)
        if self._group_filtering is not None:
            batch, keep, metrics, rewards, groups = self._group_filtering(batch, self._rewards.latest, nonfinite,
                                                                          rewards)
        # 2. In-run scoring decides in the update's backward (training_step closes the window).
        if self._in_run is not None:
            records = self._records(batch, rewards, torch.zeros_like(keep), torch.full(keep.shape, math.nan))
            batch = self._scoring.open_window(self.model, batch, keep, groups, self.args.steps_per_generation)
            self._window = (records, metrics, size, time.perf_counter() - start)
            return batch
        # 3. Otherwise IIF decides among the candidates now, and the batch is cut to what it keeps.
        influence = None
        if self._scoring is not None:
            keep, influence, scored = self._scoring.decide(self.model, batch, keep, groups)
            metrics.update(scored)
        self.generation_records = self._records(batch, rewards, keep, influence)
        batch = kept_rows(batch, keep, acc, self.args.steps_per_generation)
        self._log_filter_round(metrics, global_sum(acc, keep), size, time.perf_counter() - start)
        return batch

    def _generated(self, inputs: list) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """A refill batch for the group filter: trl's batch, every process's rewards [N], this process's
        NaN-or-inf mask [B]."""
        batch = super()._generate_and_score_completions(inputs)
        return batch, self._rewards.latest, self._rewards.nonfinite_mask(len(inputs))

    def _close_window(self) -> None:
        """In-run scoring at the end of the generation batch's accumulation window: the decision, the corrected
        gradient, and the batch's records and ``iif/`` metrics."""
        (records, metrics, batch_size, seconds), self._window = self._window, None
        start = time.perf_counter()
        keep, influence, scored = self._scoring.close_window(self.model)
        metrics.update(scored)
        for record, kept, value in zip(records, keep.tolist(), influence.tolist()):
            record.update(kept=bool(kept), influence=float(value))
        self.generation_records = records
        self._kept_rows_in_window = global_sum(self.accelerator, keep)
        self._log_filter_round(metrics, self._kept_rows_in_window, batch_size, seconds + time.perf_counter() - start)

    def _log_filter_round(self, metrics: dict, kept: float, batch_size: int, seconds: float) -> None:
        """End the guard's round and log the batch's ``iif/`` metrics: ``kept`` completions of ``batch_size`` per
        process kept over all processes, the non-finite counts and ``seconds`` of filtering."""
        metrics["kept_fraction"] = kept / (batch_size * self.accelerator.num_processes)
        counts = self._guard.end_round()
        metrics.update({name: counts[name] for name in ("nonfinite_reward", "nonfinite_target", "nonfinite_influence")})
        metrics["time_filter_s"] = seconds
        for name, value in metrics.items():
            self._metrics["train"][f"iif/{name}"].append(float(value))

    def create_optimizer(self, model=None):
        """trl's optimiser, whose step is skipped (with a warning) when filtering kept no completion behind it:
        with zero gradients AdamW would still move the weights by its momentum."""
        optimizer = super().create_optimizer(model)
        if (self.iif is None and self.group_filter is None) or hasattr(optimizer, "iif_unfiltered_step"):
            return optimizer
        optimizer.iif_unfiltered_step = optimizer.step

        def step_unless_nothing_kept(*args, **kwargs):
            kept, self._kept_rows_in_window = self._kept_rows_in_window, 0.0
            if kept == 0 and not self.dpo_coef:  # a DPO term still has a gradient
                logger.warning("filtering kept no completion for optimiser step %d; the step is skipped",
                               self.state.global_step + 1)
                return None
            return optimizer.iif_unfiltered_step(*args, **kwargs)

        optimizer.step = step_unless_nothing_kept
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._in_run is not None and self._in_run.capturing:
            self._in_run.end_micro_batch()
            if self.accelerator.sync_gradients:  # the window's last micro-batch: before clipping and the step
                self._close_window()
        return loss

    def _compute_loss(self, model, inputs):
        if self.model.training:
            self._kept_rows_in_window += float(inputs["iif_kept_rows"]) if "iif_kept_rows" in inputs else 1.0
            if self._in_run is not None and self._in_run.is_open:
                self._in_run.start_micro_batch(model, inputs["iif_row"])
        loss = super()._compute_loss(model, inputs)
        if "iif_kept_rows" in inputs:
            loss = rescaled_to_kept(loss, self.loss_type, inputs["completion_ids"].shape[0], loss_mask(inputs).sum(),
                                    inputs["iif_kept_rows"], inputs["num_items_in_batch"],
                                    self.accelerator.num_processes * self.args.steps_per_generation)
        if self.dpo_coef and self.model.training:
            # Through the unwrapped model: DDP reduces the summed gradient of both terms once. Divided by the
            # accumulation steps as trl divides its loss (loss_is_scaled_for_ga), so that an optimiser step adds
            # dpo_coef × the mean DPO loss of its micro-batches.
            set_reference_at_first_use(self._trusted, self.model, self.accelerator)
            dpo = self._trusted.dpo_loss(self.accelerator.unwrap_model(model), self.args.per_device_train_batch_size)
            self._metrics["train"]["dpo_loss"].append(self.accelerator.gather(dpo.detach()[None]).mean().item())
            loss = loss + self.dpo_coef * dpo / self.current_gradient_accumulation_steps
        return loss

    def _records(self, batch: dict, rewards: torch.Tensor, keep: torch.Tensor, influence: torch.Tensor | None
                 ) -> list[dict]:
        decode = functools.partial(self.processing_class.batch_decode, skip_special_tokens=True)
        return generation_records(batch, decode, rewards, keep, influence)

    # ------------------------------------------------------------------------------------------ checkpoints
    def iif_state_dict(self) -> dict:
        """What filtering adds to trl's checkpoint (`llm_iif.grpo.checkpoint.FilterState`)."""
        return self._filter_state.state_dict()

    def load_iif_state_dict(self, state: dict) -> None:
        self._filter_state.load_state_dict(state)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        directory = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self._filter_state.save(directory, main_process=self.args.should_save)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """trl's ``train``; resuming also restores the filter's state from the checkpoint's ``iif_state.pt``."""
        if resume_from_checkpoint:
            self._filter_state.load(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------------------ trl's forward and generation
    def _sequence_logprobs(self, model, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        """[b, T] log π(y_t) of given completions, computed as trl's loss computes them (temperature-scaled)."""
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, response_ids.shape[1])
        return logps

    def _validation_batch(self, rows: list) -> dict:
        """trl's generation batch for ``num_generations`` completions of each of ``rows``, kept out of the logs."""
        with self._quiet_generation():
            # a copy per completion: trl writes into its input rows
            return super()._generate_and_score_completions([copy.deepcopy(row) for row in rows
                                                            for _ in range(self.num_generations)])

    @contextmanager
    def _quiet_generation(self):
        """Generate validation completions without their metrics, samples or tokens entering trl's logs."""
        saved = self._metrics, self._logs, self.state.num_input_tokens_seen, self._rewards.latest
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logs = copy.deepcopy(self._logs)
        try:
            yield
        finally:
            self._metrics, self._logs, self.state.num_input_tokens_seen, self._rewards.latest = saved
