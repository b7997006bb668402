"""`IIFGRPOTrainer`: trl's `GRPOTrainer` that filters each generation batch before training on it.

trl generates one generation batch every ``steps_per_generation × num_iterations`` optimiser steps, in
`_generate_and_score_completions`, while the model still holds the parameters θ(k) that sampled it. This
subclass takes the batch from there and, before trl buffers it:

1. applies a group filter, if any (DAPO's dynamic sampling, PODS's max-variance down-sampling), then IIF, if
   any, among what the group filter kept: it scores every candidate completion at θ(k) with the shared
   attribution core (`IIFStage`), the gradient of its GRPO loss term (`llm_iif.grpo.losses`) against the
   target gradient, and decides once over all processes;
2. removes the dropped completions, so that the update runs on fewer sequences;
3. fixes the loss normaliser so that it counts only the kept completions or tokens.

With trusted triples (``trusted``), each generation batch also logs the policy's margin on them at θ(k), and
``trusted.dpo_coef`` adds their DPO loss to every training step's loss (`llm_iif.grpo.trusted`).

Everything else is trl's: generation, rewards, advantages, the loss, the optimiser, logging. Supported trl
range: see ``TRL_RANGE``; the overridden internals are `_generate_and_score_completions`, `_calculate_rewards`,
`_compute_loss` and `training_step`. With ``iif.scoring: in-run``, steps 1-3 move into the update itself: the
batch is cut to its candidates only, and the scores come from trl's training backward (`llm_iif.grpo.in_run`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import trl
from accelerate.utils import gather_object
from packaging.specifiers import SpecifierSet
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import is_async_callable, use_adapter

from llm_iif.attribution.gradients import scored_layers, scored_parameters
from llm_iif.attribution.influence import TargetBatch
from llm_iif.attribution.precondition import adam_preconditioner, check_second_moments
from llm_iif.attribution.stage import IIFStage
from llm_iif.recipes import GRPOIIFConfig
from llm_iif.core.distributed import check_scoring_supported, is_sharded
from llm_iif.core.errors import UserError, first_line
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.core.timer import PhaseTimer
from llm_iif.grpo.groups import max_variance_subsets, subset_advantages, varied_groups
from llm_iif.grpo.in_run import InRunScoring, WindowRows
from llm_iif.grpo.losses import (RESCALED_LOSSES, SUPPORTED_LOSSES, completion_losses, completion_normalisers,
                                 group_target_terms, token_losses)
from llm_iif.grpo.trusted import TrustedSet, grpo_trusted_triples, trusted_prompt_ids
from llm_iif.lm.trusted import TrustedTriples
from llm_iif.runs.state import IIF_STATE_FILE, load_plain

logger = logging.getLogger(__name__)

TRL_RANGE = ">=1.16,<1.17"  # the versions whose GRPOTrainer internals were checked

# Per-row tensors of trl's generation batch: [B, ...] and cut or padded together.
LEFT_PADDED = ("prompt_ids", "prompt_mask")
RIGHT_PADDED = ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps",
                "sampling_per_token_logps", "importance_sampling_ratio", "tool_mask")


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
        self._check_settings()
        self._trusted = self._trusted_triples(trusted)
        if iif is not None and iif.target == "preference":
            self._check_preferences(iif)
        self._guard = NonfiniteGuard(nonfinite_patience)
        self._nonfinite_rows: set[int] = set()
        self.reward_funcs = [_checked_reward(f, self._nonfinite_rows) for f in self.reward_funcs]
        self._rewards = None  # the latest generation batch's weighted rewards [N], all processes
        self._kept_rows_in_window = 0.0  # kept completions behind the optimiser step being accumulated
        generator = torch.Generator().manual_seed(self.args.seed)  # the same draws on every process
        self._refill_generator = torch.Generator().manual_seed(self.args.seed + 1)
        self._stage = None
        self.generation_records: list[dict] = []
        self._in_run, self._window = None, None
        if iif is not None:
            source = (PreferenceTarget(self) if iif.target == "preference"
                      else FreshGroupTarget(self) if iif.target_source == "fresh" else None)
            self._stage = IIFStage(iif, self.accelerator, source, self._sequence_logprobs, self._guard, generator)
            obstacle = self._in_run_obstacle() if iif.scoring != "separate" else None
            if iif.scoring == "in-run" and obstacle:
                raise UserError(obstacle)
            if iif.scoring != "separate" and obstacle is None:
                self._in_run = InRunScoring(self._stage, self.accelerator, self.loss_type)
            elif iif.scoring == "auto" and self.accelerator.is_main_process:
                logger.info("iif.scoring auto: the separate scoring pass, since %s", obstacle.split(";")[0])

    # ------------------------------------------------------------------------------------------------ checks
    def _check_settings(self) -> None:
        """One-line errors for settings that conflict with filtering."""
        iif, args = self.iif, self.args
        if iif is None and self.group_filter is None:
            return
        if iif is not None and self.group_filter is not None and self.group_filter.kind != "dapo":
            raise UserError(f"iif and group_filter.kind {self.group_filter.kind}: IIF runs after a dapo group filter "
                            "only (expected group_filter.kind dapo, or one filter)")
        if self._is_vlm:
            raise UserError("model: filtering supports text-only models; this processing class is a multimodal "
                            "processor")
        if self.loss_type not in SUPPORTED_LOSSES:
            raise UserError(f"loss_type: '{self.loss_type}' is not supported with filtering "
                            f"(expected one of {', '.join(SUPPORTED_LOSSES)})")
        if self.loss_type in RESCALED_LOSSES and (self._entropy_bonus_enabled or self.aux_loss_enabled):
            raise UserError(f"entropy_coef / router aux loss: loss_type '{self.loss_type}' is rescaled to the kept "
                            "completions, which would rescale these terms too; use loss_type dapo")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise UserError("multi_objective_aggregation: filtering needs per-group rewards "
                            "(expected sum_then_normalize)")
        if self.group_filter is not None:
            kind = self.group_filter.kind
            if kind not in ("dapo", "pods"):
                raise UserError(f"group_filter.kind: '{kind}' (expected dapo or pods)")
            if kind == "pods" and not 1 <= self.group_filter.keep_per_group < self.num_generations:
                raise UserError(f"group_filter.keep_per_group: {self.group_filter.keep_per_group} would keep no "
                                f"or every completion; expected 1..{self.num_generations - 1}")
            if self.group_filter.max_refill_batches < 0:
                raise UserError("group_filter.max_refill_batches: expected 0 or more")
            per_process = args.generation_batch_size // self.accelerator.num_processes
            if kind == "dapo" and self.group_filter.refill and per_process % self.num_generations:
                raise UserError(f"group_filter.refill: each process's generation batch of {per_process} completions "
                                f"must hold whole groups (expected a multiple of num_generations = "
                                f"{self.num_generations})")
            if iif is None:
                return
        if iif.mode != "random":
            check_scoring_supported(self.accelerator)
        if iif.target_source not in ("batch", "fresh"):
            raise UserError(f"iif.target_source: '{iif.target_source}' is not available for GRPO "
                            "(expected batch or fresh)")
        groups = args.generation_batch_size // self.num_generations  # per generation batch, over all processes
        if iif.target_source == "batch" and iif.folds > groups:
            raise UserError(f"iif.folds: {iif.folds} folds of a generation batch of {groups} prompts (folds take "
                            f"whole groups of {self.num_generations} completions); expected at most {groups}")
        if iif.mode in ("bottom", "random") and iif.p >= 1.0:
            raise UserError(f"iif.p: {iif.p} with iif.mode {iif.mode} would drop every completion; expected p < 1")
        if args.top_entropy_quantile < 1.0:
            raise UserError("top_entropy_quantile: < 1 masks tokens per micro-batch after scoring; the scores "
                            "would not match the update (expected 1.0 with iif)")
        # Terms of trl's loss that the scored per-completion loss (llm_iif.grpo.losses) leaves out.
        if self._entropy_bonus_enabled or self.aux_loss_enabled:
            raise UserError("entropy_coef / router aux loss: these terms are trained but not scored; expected "
                            "entropy_coef 0 and no router aux loss with iif")
        if self.off_policy_mask_threshold is not None:
            raise UserError("off_policy_mask_threshold: masks sequences per micro-batch after scoring; the scores "
                            "would not match the update (expected null with iif)")
        if self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction:
            raise UserError("loss_type: vespo weighs completions by vLLM's importance-sampling ratio, which IIF's "
                            "scores leave out; use another loss_type or vllm_importance_sampling_correction: false")
        try:
            scored_layers(self.accelerator.unwrap_model(self.model))
        except ValueError as err:
            raise UserError(f"iif: {err}; pass a peft_config or leave some nn.Linear layers trainable") from err
        if iif.target != "preference" and iif.target_source == "fresh":
            self._check_validation(iif)

    def _in_run_obstacle(self) -> str | None:
        """The one-line error for a setting that in-run scoring cannot honour (`llm_iif.grpo.in_run`), or None."""
        iif, args = self.iif, self.args
        separate = "; or set iif.scoring: separate"
        model = self.accelerator.unwrap_model(self.model)
        if iif.mode == "random":
            return ("iif.scoring: in-run with iif.mode random: random dropping scores nothing; expected "
                    "iif.scoring: separate")
        if self.num_iterations != 1:
            return (f"num_iterations: {self.num_iterations}; in-run scoring takes its scores from the first "
                    f"update's backward, and later iterations train at moved parameters: expected 1{separate}")
        if args.steps_per_generation != args.gradient_accumulation_steps:
            return (f"steps_per_generation: {args.steps_per_generation} with gradient_accumulation_steps "
                    f"{args.gradient_accumulation_steps}; in-run scoring decides before the generation batch's "
                    f"one optimiser step: expected them equal{separate}")
        if self.beta != 0.0 and iif.target_source == "batch":
            return (f"beta: {self.beta} with iif.target_source batch; in-run scoring builds the batch target "
                    f"from the policy term's gradient, which the KL term changes: expected beta 0{separate}")
        if self._dpo_coef():
            return (f"trusted.dpo_coef: {self._dpo_coef()}; the DPO term runs through the scored layers in "
                    f"the same backward: expected 0 with in-run scoring{separate}")
        if self.use_vllm:
            return f"use_vllm: in-run scoring is not run with vLLM's importance-sampling ratios{separate}"
        state = self.accelerator.state
        if is_sharded(model) or getattr(state, "fsdp_plugin", None) is not None:  # Accelerate shards in train()
            return f"iif.scoring: in-run is not run under FSDP2 (its gradients are shards){separate}"
        if getattr(state, "deepspeed_plugin", None) is not None:
            return f"iif.scoring: in-run is not run under DeepSpeed, which owns the gradients{separate}"
        dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropout and not args.disable_dropout:
            return (f"disable_dropout: false with dropout p={dropout[0].p} in the model; in-run scores would "
                    f"carry the update's dropout noise: expected disable_dropout: true{separate}")
        scored = {id(p) for p in scored_parameters(model).values()}
        unscored = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in scored]
        if unscored:
            return (f"iif.scoring: in-run corrects the scored (LoRA) parameters' gradient only, and "
                    f"'{unscored[0]}' is trainable too ({len(unscored)} such){separate}")
        return None

    def _check_validation(self, iif: GRPOIIFConfig) -> None:
        data, per_round = self.validation_dataset, self.num_generations * self.accelerator.num_processes
        if data is None or len(data) == 0 or "prompt" not in data.column_names:
            columns = "none" if data is None else ", ".join(data.column_names) or "none"
            raise UserError(f"validation_dataset: iif.target_source fresh needs validation rows with a 'prompt' "
                            f"column (got columns: {columns})")
        if iif.val_size % per_round:
            raise UserError(f"iif.val_size: {iif.val_size} completions; expected a multiple of num_generations × "
                            f"processes = {per_round}")

    def _check_preferences(self, iif: GRPOIIFConfig) -> None:
        if iif.target_source != "fresh":
            raise UserError(f"iif.target_source: '{iif.target_source}' with iif.target preference; expected fresh "
                            "(the training batch holds no preferences)")
        if self._trusted is None:
            raise UserError("trusted: iif.target preference needs trusted (prompt, chosen, rejected) triples; "
                            "expected a trusted set (a recipe's trusted section, the trainer's trusted argument)")
        if self._trusted.size % 2:
            processes = self.accelerator.num_processes
            raise UserError(f"trusted.size: {self._trusted.size * processes} triples give each of {processes} "
                            "process(es) an odd number; expected an even number per process (the preference "
                            "target's two halves take whole triples)")

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
        if not self._is_peft():
            triples.set_reference(self.model)
        return triples

    def _is_peft(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

    def _trusted_reference(self) -> None:
        """With peft, the reference margins at their first use: the adapter disabled (trl's "ref" one, if any),
        as trl computes its reference log-probs."""
        if self._trusted.reference_margins is None:
            model = self.accelerator.unwrap_model(self.model)
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                self._trusted.set_reference(self.model)

    def _trusted_metrics(self) -> dict[str, float]:
        """The policy's margin and accuracy on the trusted triples at θ(k), with ``time_trusted_s``."""
        start = time.perf_counter()
        self._trusted_reference()
        metrics = self._trusted.metrics(self.model)
        return {**metrics, "time_trusted_s": time.perf_counter() - start}

    def _dpo_coef(self) -> float:
        return self._trusted.cfg.dpo_coef if self._trusted is not None else 0.0

    # ------------------------------------------------------------------------------------------- trl hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """trl's rewards [N, F] over all processes; keeps the weighted sum for the group filters, NaN where no
        function scored the completion (as trl's advantages treat it) or one returned NaN or inf."""
        self._nonfinite_rows.clear()
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(rewards_per_func.device)
        self._rewards = (rewards_per_func * weights).nansum(dim=1)
        flagged = torch.zeros(len(inputs), dtype=torch.bool, device=rewards_per_func.device)
        flagged[sorted(self._nonfinite_rows)] = True
        unscored = rewards_per_func.isnan().all(dim=1) | self.accelerator.gather(flagged)
        self._rewards[unscored] = torch.nan
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return batch
        if self._trusted is not None:  # at θ(k), the parameters that sampled this batch
            for name, value in self._trusted_metrics().items():
                self._metrics["train"][name].append(value)
        rewards = self._rewards[_process_slice(self.accelerator, len(inputs))]
        if self.iif is None and self.group_filter is None:
            self.generation_records = self._records(batch, rewards, torch.ones(len(inputs), dtype=torch.bool), None)
            return batch
        start = time.perf_counter()
        self._guard.start_round()
        nonfinite = self._nonfinite_mask(len(inputs))
        influence, metrics, groups = None, {}, self._group_ids(len(inputs), generation=0)
        keep = ~nonfinite
        if self.group_filter is not None:
            batch, keep, metrics, rewards, groups = self._group_filtered(batch, inputs, nonfinite, rewards)
        if self._in_run is not None:  # the scores come from the update's backward (_close_window)
            return self._open_window(batch, keep, groups, rewards, metrics, len(inputs), start)
        if self._stage is not None:  # IIF, alone or among the groups a dapo filter kept
            keep, influence, scored = self._influence_filtered(batch, keep, groups)
            metrics.update(scored)
        self.generation_records = self._records(batch, rewards, keep, influence)
        batch = self._kept_rows(batch, keep)
        self._log_filter_round(metrics, self._global_sum(keep), len(inputs), time.perf_counter() - start)
        return batch

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
            if kept == 0 and not self._dpo_coef():  # a DPO term still has a gradient
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
        loss = self._rescaled(super()._compute_loss(model, inputs), inputs)
        if self._dpo_coef() and self.model.training:
            # Through the unwrapped model: DDP reduces the summed gradient of both terms once. Divided by the
            # accumulation steps as trl divides its loss (loss_is_scaled_for_ga), so that an optimiser step adds
            # dpo_coef × the mean DPO loss of its micro-batches.
            self._trusted_reference()
            dpo = self._trusted.dpo_loss(self.accelerator.unwrap_model(model), self.args.per_device_train_batch_size)
            self._metrics["train"]["dpo_loss"].append(self.accelerator.gather(dpo.detach()[None]).mean().item())
            loss = loss + self._dpo_coef() * dpo / self.current_gradient_accumulation_steps
        return loss

    def _rescaled(self, loss: torch.Tensor, inputs) -> torch.Tensor:
        if "iif_kept_rows" not in inputs or self.loss_type not in RESCALED_LOSSES:
            return loss
        # trl averages these over one micro-batch (its rows, padding included, or bnpo's tokens), so after
        # filtering micro-batches and processes would weigh their completions unequally: rescale to a mean over
        # the whole batch's kept rows or tokens, the way trl's dapo loss uses num_items_in_batch (_kept_rows).
        micro_batches = self.accelerator.num_processes * self.args.steps_per_generation
        if self.loss_type == "bnpo":
            tokens = _loss_mask(inputs).sum().clamp(min=1)
            return loss * tokens * micro_batches / inputs["num_items_in_batch"].clamp(min=1)
        rows = inputs["completion_ids"].shape[0]
        return loss * rows * micro_batches / inputs["iif_kept_rows"].clamp(min=1)

    def _records(self, batch: dict, rewards: torch.Tensor, keep: torch.Tensor, influence: torch.Tensor | None
                 ) -> list[dict]:
        """One row per completion of this process's generation batch (before dropped rows leave it)."""
        decode = functools.partial(self.processing_class.batch_decode, skip_special_tokens=True)
        prompts, completions = decode(batch["prompt_ids"]), decode(batch["completion_ids"])
        return [{"prompt": prompts[i], "response": completions[i], "reward": float(rewards[i]),
                 "advantage": float(batch["advantages"][i]),
                 "influence": float(influence[i]) if influence is not None else math.nan, "kept": bool(keep[i])}
                for i in range(len(prompts))]

    # ------------------------------------------------------------------------------------------ checkpoints
    def iif_state_dict(self) -> dict:
        """What filtering adds to trl's checkpoint: tensors and plain values only (``weights_only`` loading)."""
        state = {"refill_generator": self._refill_generator.get_state(),
                 "nonfinite_batches_in_a_row": self._guard.rounds_in_a_row}
        if self._stage is not None:
            state["filter_generator"] = self._stage.generator.get_state()
            if hasattr(self._stage.target_source, "round"):
                state["target_round"] = self._stage.target_source.round
        if self._trusted is not None:  # one generator per process: gathered, every process takes its own
            state["trusted_generators"] = gather_object([self._trusted.generator.get_state()])
        return state

    def load_iif_state_dict(self, state: dict) -> None:
        self._refill_generator.set_state(state["refill_generator"])
        self._guard.rounds_in_a_row = state["nonfinite_batches_in_a_row"]
        if self._stage is not None:
            self._stage.generator.set_state(state["filter_generator"])
            if hasattr(self._stage.target_source, "round"):  # "fresh_target_round": checkpoints of version 0.1
                self._stage.target_source.round = state.get("target_round", state.get("fresh_target_round"))
        if self._trusted is not None and "trusted_generators" in state:
            self._trusted.generator.set_state(state["trusted_generators"][self.accelerator.process_index])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.iif_state_dict()  # on every process: it gathers the DPO generators
        if self.args.should_save:  # the main process; the filter's generators are alike on every process
            directory = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            torch.save(state, directory / IIF_STATE_FILE)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """trl's ``train``; resuming also restores the filter's state from the checkpoint's ``iif_state.pt``."""
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / IIF_STATE_FILE
            if path.is_file():
                state = load_plain(path, "IIF state")
                try:
                    self.load_iif_state_dict(state)
                except (KeyError, TypeError, RuntimeError) as err:
                    raise UserError(f"{path}: not a readable IIF state ({first_line(err)})") from err
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------------------------------ scoring
    def _preconditioner(self):
        """P from trl's optimiser at θ(k) with ``iif.precondition: adam`` (None before its first step)."""
        if self.iif.precondition != "adam":
            return None
        check_second_moments(self.optimizer)
        return adam_preconditioner(self.optimizer, scored_parameters(self.accelerator.unwrap_model(self.model)))

    def _sequence_logprobs(self, model, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        """[b, T] log π(y_t) of given completions, computed as trl's loss computes them (temperature-scaled)."""
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, response_ids.shape[1])
        return logps

    def _loss_and_target(self, batch: dict):
        """The `PerSampleLossAndTarget` of this process's rows: (L_i, -Σ_t log π(y_{i,t}) Â_i), one forward."""
        mask = _loss_mask(batch).float()
        advantages = batch["advantages"]
        num_completions = self.accelerator.reduce(torch.tensor(float(len(mask)), device=mask.device), "sum").item()
        normalisers = completion_normalisers(self.loss_type, mask, num_completions, batch["num_items_in_batch"].item(),
                                             self.max_completion_length)
        ratio = batch.get("importance_sampling_ratio") if self.loss_type != "vespo" else None
        policy_scale = min(1.0, self.epsilon_high) if self.loss_type == "cispo" else 1.0
        sequence_level = self.importance_sampling_level == "sequence"

        def loss_and_target(model, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logps = self._sequence_logprobs(model, batch["prompt_ids"][rows], batch["prompt_mask"][rows],
                                            batch["completion_ids"][rows], batch["completion_mask"][rows])
            ref = batch["ref_per_token_logps"][rows] if self.beta else None
            per_token = token_losses(logps, advantages[rows], ref, self.beta, self.args.use_bias_correction_kl,
                                     ratio[rows] if ratio is not None else None, policy_scale,
                                     mask[rows] if sequence_level else None)
            return (completion_losses(per_token, mask[rows], normalisers[rows]),
                    group_target_terms(logps, mask[rows], advantages[rows]))

        if self.iif.target_source == "batch":
            return loss_and_target
        return lambda model, rows: loss_and_target(model, rows)[0]

    def _validation_batch(self, rows: list) -> dict:
        """trl's generation batch for ``num_generations`` completions of each of ``rows``, kept out of the logs."""
        with self._quiet_generation():
            # a copy per completion: trl writes into its input rows
            return super()._generate_and_score_completions([copy.deepcopy(row) for row in rows
                                                            for _ in range(self.num_generations)])

    @contextmanager
    def _quiet_generation(self):
        """Generate validation completions without their metrics, samples or tokens entering trl's logs."""
        saved = self._metrics, self._logs, self.state.num_input_tokens_seen, self._rewards
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logs = copy.deepcopy(self._logs)
        try:
            yield
        finally:
            self._metrics, self._logs, self.state.num_input_tokens_seen, self._rewards = saved

    def _influence_filtered(self, batch: dict, candidates: torch.Tensor, groups: torch.Tensor):
        """IIF's decision among this process's ``candidates`` [B] rows of ``batch`` (a group filter's kept rows,
        or every row with a finite reward), folded by ``groups`` [B]: the keep-mask [B], the influence [B]
        (NaN where not scored) and the stage's metrics."""
        rows = candidates.nonzero().flatten()
        scored = batch if len(rows) == len(candidates) else _rows_of(batch, rows)
        selection = self._stage.select(self.model, self._loss_and_target(scored), len(rows), self._preconditioner(),
                                       groups=groups[rows.cpu()])
        keep = torch.zeros_like(candidates)
        keep[rows] = selection.keep.to(keep.device)
        influence = torch.full(candidates.shape, torch.nan)
        if selection.influence is not None:
            influence[rows.cpu()] = selection.influence.float().cpu()
        return keep, influence, selection.metrics

    def _open_window(self, batch: dict, candidates: torch.Tensor, groups: torch.Tensor, rewards: torch.Tensor,
                     metrics: dict, batch_size: int, start: float) -> dict:
        """In-run scoring: cut the batch to its ``candidates`` [B] (every row with a finite reward, or a group
        filter's kept rows), build a fresh or preference target at θ(k) and open the window that
        `_close_window` decides; the rows carry their index (``iif_row``) through trl's shuffle."""
        stage, acc = self._stage, self.accelerator
        stage.timer = PhaseTimer()
        target, split_cos = None, math.nan
        if self.iif.target_source == "fresh":
            target, split_cos = stage.target_gradient(self.model)
            precondition = self._preconditioner()
            target = precondition(target) if precondition else target
        rows = candidates.nonzero().flatten()
        records = self._records(batch, rewards, torch.zeros_like(candidates), torch.full(candidates.shape, math.nan))
        batch = self._kept_rows(batch, candidates)
        count = len(rows)
        mask = _loss_mask(batch)[:count].float()
        total_rows = acc.reduce(torch.tensor(float(len(batch["advantages"])), device=acc.device), "sum").item()
        kappa = float(batch["iif_kept_rows"]) / total_rows if self.loss_type in ("dr_grpo", "luspo") else 1.0
        normalisers = completion_normalisers(self.loss_type, mask, int(batch["iif_kept_rows"]),
                                             batch["num_items_in_batch"].item(), self.max_completion_length)
        self._in_run.open(WindowRows(count, groups[rows.cpu()], batch["advantages"][:count].float(), normalisers,
                                     mask.sum(dim=1), kappa,
                                     min(1.0, self.epsilon_high) if self.loss_type == "cispo" else 1.0),
                          target, split_cos)
        batch["iif_row"] = torch.arange(len(batch["advantages"]), device=batch["advantages"].device)
        self._window = (rows, records, metrics, batch_size, time.perf_counter() - start)
        return batch

    def _close_window(self) -> None:
        """In-run scoring at the end of the generation batch's accumulation window: the decision, the corrected
        gradient, and the batch's records and ``iif/`` metrics."""
        rows, records, metrics, batch_size, seconds = self._window
        start = time.perf_counter()
        selection = self._in_run.close(self.model, self._preconditioner())
        metrics.update(selection.metrics)
        for row, kept, influence in zip(rows.tolist(), selection.keep.tolist(),
                                        (selection.influence if selection.influence is not None
                                         else torch.full((len(rows),), math.nan)).tolist()):
            records[row].update(kept=bool(kept), influence=float(influence))
        self.generation_records = records
        self._kept_rows_in_window = self._global_sum(selection.keep)
        self._log_filter_round(metrics, self._kept_rows_in_window, batch_size, seconds + time.perf_counter() - start)

    def _group_ids(self, size: int, generation: int) -> torch.Tensor:
        """[size] ids of the prompt groups of this process's rows of a generation batch (``generation`` 0, or the
        n-th refill batch), unique over processes and batches: a group's G completions are consecutive rows."""
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        return generation * processes * size + (rank * size + torch.arange(size)) // self.num_generations

    # ---------------------------------------------------------------------------------------- group filters
    def _group_filtered(self, batch: dict, inputs: list, nonfinite: torch.Tensor, rewards: torch.Tensor):
        """A group filter's decision: (batch, keep-mask, metrics, this process's rows' rewards, their group ids
        for `_group_ids`). DAPO with refill generates more batches of new prompts until every process has as many
        completions in informative groups as its batch had rows, or ``max_refill_batches`` is spent."""
        flt, group = self.group_filter, self.num_generations
        local = _process_slice(self.accelerator, len(inputs))
        if flt.kind == "pods":
            everyone = max_variance_subsets(self._rewards, group, flt.keep_per_group)
            batch["advantages"] = subset_advantages(self._rewards, everyone, group, self.scale_rewards)[local].to(
                batch["advantages"].device)
        else:
            everyone = varied_groups(self._rewards, group)
        keep = everyone[local].to(nonfinite.device) & ~nonfinite
        groups = self._group_ids(len(inputs), generation=0)
        metrics = {"informative_fraction": self._global_mean(keep), "refill_batches": 0}
        if flt.kind == "dapo" and flt.refill:
            # Every process refills until it has its own batch's worth of informative completions, and keeps no
            # more, so that no process trains on (and pads every other process up to) a larger batch.
            while self._global_min(keep.sum()) < len(inputs) and metrics["refill_batches"] < flt.max_refill_batches:
                extra_inputs = self._refill_inputs(len(inputs))
                extra = super()._generate_and_score_completions(extra_inputs)
                extra_keep = varied_groups(self._rewards, group)[local].to(keep.device)
                extra_keep &= ~self._nonfinite_mask(len(extra_inputs))
                batch, keep = _concatenated(batch, extra, self._tokenizer.pad_token_id), torch.cat([keep, extra_keep])
                rewards = torch.cat([rewards, self._rewards[local]])
                metrics["refill_batches"] += 1
                groups = torch.cat([groups, self._group_ids(len(inputs), generation=metrics["refill_batches"])])
            keep = _first_kept(keep, len(inputs))
        return batch, keep, metrics, rewards, groups

    def _refill_inputs(self, size: int) -> list:
        """``size`` new rows (size / num_generations prompts, each repeated), drawn at random from the train set
        with a generator seeded alike on every process, so processes draw different prompts in step."""
        prompts = size // self.num_generations
        draws = torch.randint(len(self.train_dataset), (self.accelerator.num_processes, prompts),
                              generator=self._refill_generator)[self.accelerator.process_index]
        return [self.train_dataset[int(i)] for i in draws for _ in range(self.num_generations)]

    # ------------------------------------------------------------------------------------- dropping rows
    def _nonfinite_mask(self, batch_size: int) -> torch.Tensor:
        """[B] True for this process's completions with a NaN or inf reward; reports them to the guard."""
        bad = torch.zeros(batch_size, dtype=torch.bool, device=self.accelerator.device)
        bad[sorted(self._nonfinite_rows)] = True
        count = int(self._global_sum(bad))
        total = int(self._global_sum(torch.ones_like(bad)))
        self._guard.flag("reward", count, f"reward: NaN or inf for {count} of {total} completions",
                         nothing_left=count == total)
        return bad

    def _kept_rows(self, batch: dict, keep: torch.Tensor) -> dict:
        """The batch cut to its kept rows. Every process keeps the same number of rows R (a multiple of
        steps_per_generation, so that trl's buffer splits evenly): a process that kept fewer pads with dropped
        rows whose loss mask is zero. The loss normalisers then count kept completions and tokens only."""
        acc, chunks = self.accelerator, self.args.steps_per_generation
        kept = int(keep.sum())
        most = int(acc.gather(torch.tensor([kept], device=acc.device)).max())
        rows_per_process = max(chunks, math.ceil(most / chunks) * chunks)
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])[:rows_per_process]
        cut = _rows_of(batch, order)
        padding = ~keep[order]
        for key in ("completion_mask", "tool_mask"):
            if key in cut:
                cut[key] = cut[key].masked_fill(padding[:, None].to(cut[key].device), 0)
        cut["advantages"] = cut["advantages"].masked_fill(padding.to(cut["advantages"].device), 0.0)
        cut["num_items_in_batch"] = acc.gather(_loss_mask(cut).sum()[None]).sum()
        cut["iif_kept_rows"] = acc.reduce(torch.tensor(float(kept), device=acc.device), "sum")
        return cut

    def _global_sum(self, values: torch.Tensor) -> float:
        return self.accelerator.reduce(values.float().sum().to(self.accelerator.device), "sum").item()

    def _global_min(self, value: torch.Tensor) -> float:
        return self.accelerator.gather(value.float().reshape(1).to(self.accelerator.device)).min().item()

    def _global_mean(self, values: torch.Tensor) -> float:
        return self._global_sum(values) / max(self._global_sum(torch.ones_like(values)), 1.0)


class FreshGroupTarget:
    """The fresh target's rows (a `TargetSource`): each round, ``num_generations`` completions for each of this
    process's next ``iif.val_size / (num_generations × processes)`` validation prompts (cycling
    ``validation_dataset``; ``round`` is saved in checkpoints), weighted by their group-relative advantages, so
    that f = Σ_v Σ_t log π(y_{v,t}) Â_v (f_seq with the group as baseline)."""

    def __init__(self, trainer: IIFGRPOTrainer):
        self.trainer, self.round, self.metrics = trainer, 0, {}

    def _next_rows(self, per_process: int) -> list[dict]:
        processes, rank = self.trainer.accelerator.num_processes, self.trainer.accelerator.process_index
        first = (self.round * processes + rank) * per_process
        self.round += 1
        data = self.trainer.validation_dataset
        return [data[(first + i) % len(data)] for i in range(per_process)]

    def __call__(self, model) -> TargetBatch:
        trainer = self.trainer
        start = time.perf_counter()
        per_process = trainer.iif.val_size // trainer.num_generations // trainer.accelerator.num_processes
        batch = trainer._validation_batch(self._next_rows(per_process))
        self.metrics = {"time_val_generate_s": time.perf_counter() - start}
        mask = _loss_mask(batch)
        return TargetBatch(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
                           batch["advantages"][:, None].expand_as(mask).float())


class PreferenceTarget:
    """The preference target's rows (a `TargetSource`): every trusted triple of this process, every generation
    batch, f = Σ log π(chosen) − log π(rejected) (`TrustedTriples.target_rows`); nothing is generated."""

    def __init__(self, trainer: IIFGRPOTrainer):
        self.trainer, self.metrics = trainer, {}

    def __call__(self, model) -> TargetBatch:
        return self.trainer._trusted.target_rows()


def _loss_mask(batch: dict) -> torch.Tensor:
    """[B, T] the tokens trl's loss counts: the completion mask, times the tool mask in multi-turn runs."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


def _process_slice(accelerator, batch_size: int) -> slice:
    start = accelerator.process_index * batch_size
    return slice(start, start + batch_size)


def _rows_of(batch: dict, rows: torch.Tensor) -> dict:
    """The batch's per-row tensors cut to ``rows``; everything else as it is."""
    size = len(batch["advantages"])
    return {key: (value[rows.to(value.device)] if isinstance(value, torch.Tensor) and value.dim() > 0
                  and value.shape[0] == size else value) for key, value in batch.items()}


def _first_kept(keep: torch.Tensor, most: int) -> torch.Tensor:
    """``keep`` limited to its first ``most`` kept completions."""
    limited = keep.clone()
    limited[keep.nonzero().flatten()[most:]] = False
    return limited


def _concatenated(first: dict, second: dict, pad_token_id: int) -> dict:
    """Two generation batches as one: prompts re-padded on the left, completions and per-token values on the
    right, per-row values concatenated; ``num_items_in_batch`` is recounted later by `_kept_rows`."""
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


def _checked_reward(func, nonfinite_rows: set[int]):
    """A synchronous reward function whose NaN or inf rewards are recorded in ``nonfinite_rows`` and handed
    to trl as None, so that they stay out of their group's baseline. Models and async functions pass through."""
    if isinstance(func, torch.nn.Module) or is_async_callable(func):
        return func

    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def checked(*args, **kwargs):
        try:
            rewards = list(func(*args, **kwargs))
        except Exception as err:  # a user's function: one line naming it, not trl's traceback
            raise UserError(f"rewards.{name}: raised {type(err).__name__} ({first_line(err)})") from err
        check_rewards(name, rewards, len(kwargs.get("completions", rewards)))
        for i, reward in enumerate(rewards):
            if reward is not None and not math.isfinite(reward):
                nonfinite_rows.add(i)
                rewards[i] = None
        return rewards

    return checked


def check_rewards(name: str, rewards: list, completions: int) -> None:
    """`UserError` unless a reward function returned one number (or None) per completion."""
    if len(rewards) != completions:
        raise UserError(f"rewards.{name}: returned {len(rewards)} rewards for {completions} completions; expected "
                        "one per completion")
    wrong = next((r for r in rewards if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)))),
                 None)
    if wrong is not None:
        raise UserError(f"rewards.{name}: returned {wrong!r} ({type(wrong).__name__}); expected a number or None "
                        "per completion")
