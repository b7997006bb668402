"""The PPO trainer for causal LMs with LoRA, run under `accelerate`.

One round follows the paper's Algorithm 1:

    rollout    = collect(prompts)                 # Stage I:  sample, reward, score tokens at θ(k)
    advantages = estimate_advantages(rollout)     #           KL-penalised rewards → GAE → whitening
    selection  = iif.select(policy, losses)       # Stage II: influence on a validation target at θ(k),
                                                  #           then drop the harmful samples (IIF)
    check_scores(rollout)                         #           at iif.lds_rounds only: LDS of the scores
    statistics = update(rollout[keep])            # Stage III: PPO epochs on the kept samples
    log(...)

Every process runs the same code on its own slice of the batch. Statistics that must agree across
processes (advantage whitening, KL for the controller, the target gradient, logged metrics) are all-reduced;
influence scores are gathered and filtered once over the whole batch; the number of optimiser steps is
agreed before the update so DDP never waits on a process that has finished. The trainer receives its
components ready-made; `llm_iif.training.factory.build_trainer` assembles them from a recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from llm_iif.attribution.gradients import scored_parameters
from llm_iif.attribution.influence import PerSampleLoss, PerSampleLossAndTarget
from llm_iif.attribution.precondition import adam_preconditioner
from llm_iif.attribution.stage import IIFStage, Selection
from llm_iif.core import ppo
from llm_iif.recipes import Recipe
from llm_iif.core.distributed import global_max, is_sharded, load_whole_state, rebalance, whole_state
from llm_iif.core.errors import UserError
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.core.records import Advantages, Rollout, UpdateStats
from llm_iif.core.timer import PhaseTimer
from llm_iif.lm.data import PromptQueue
from llm_iif.lm.evaluation import Evaluator
from llm_iif.lm.iif import (STATISTICS, mean_response_length, minibatch_loss, ppo_sample_loss,
                            ppo_sample_loss_and_target, ppo_terms, rollout_target_rows)
from llm_iif.lm.rollouts import RolloutCollector, drop_nonfinite_advantages, estimate_advantages
from llm_iif.lm.trusted import TrustedTriples
from llm_iif.runs import state as run_state
from llm_iif.training.lds_check import linear_datamodeling_check
from llm_iif.training.in_run import FirstEpoch, InRunScoring, check_in_run
from llm_iif.training.metrics import report_metrics, round_metrics
from llm_iif.runs.outputs import RunOutputs
from llm_iif.runs.signals import FinishOnSignal

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainerParts:
    """What a `PPOTrainer` is built from (see `llm_iif.training.factory.build_trainer`)."""
    recipe: Recipe
    accelerator: Accelerator
    policy: torch.nn.Module               # prepared (wrapped for DDP when distributed)
    optimizer: torch.optim.Optimizer      # prepared
    tokenizer: object
    collector: RolloutCollector           # Stage I
    prompts: PromptQueue
    kl_controller: object                 # ppo.AdaptiveKLController or ppo.FixedKLController
    iif: IIFStage | None                  # Stage II; None trains on every sample
    guard: NonfiniteGuard
    outputs: RunOutputs
    evaluator: Evaluator | None
    report_rewards: dict                  # name -> reward function logged as reward/NAME, never trained on
    minibatch_generator: torch.Generator  # per process
    filter_generator: torch.Generator     # the same on every process
    trusted: TrustedTriples | None = None  # the recipe's trusted triples: logged margin, DPO loss


class PPOTrainer:
    """Train with PPO (and IIF when the parts include an `IIFStage`). ``train()`` runs all rounds and returns
    the per-round metrics."""

    def __init__(self, parts: TrainerParts):
        self.parts = parts
        self.recipe, self.cfg, self.accelerator = parts.recipe, parts.recipe.ppo, parts.accelerator
        self.policy, self.optimizer, self.tokenizer = parts.policy, parts.optimizer, parts.tokenizer
        self.collector, self.prompts, self.kl_controller = parts.collector, parts.prompts, parts.kl_controller
        self.iif, self.guard, self.outputs, self.evaluator = parts.iif, parts.guard, parts.outputs, parts.evaluator
        self.trusted = parts.trusted
        self.in_run = None
        if self.iif is not None and self.recipe.iif.scoring == "in-run":
            check_in_run(self.recipe, self.accelerator.unwrap_model(self.policy), self.accelerator)
            self.in_run = InRunScoring(self.iif, self.accelerator, self.cfg, self.recipe.iif.train_grad,
                                       self.recipe.iif.score_batch_size)
        # After prepare: FSDP replaces parameters with sharded ones.
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.history: list[dict] = []
        self.stopped_by: str | None = None
        self.checkpoint: Path | None = None  # the last checkpoint saved
        self._bar, self._last_postfix = None, ""

    # ------------------------------------------------------------------ the round loop

    def train(self, resume_from: Path | None = None, overwrite: bool = False) -> list[dict]:
        """Run the rounds not yet done and return the metrics of all rounds.

        ``resume_from``: a checkpoint directory of this run (see `run_state.resolve_resume`); training
        continues exactly where it stopped, writing into the same run directory. Without it, a new run starts
        in ``run.output_dir``, which must not hold another run unless ``overwrite`` (which deletes that run's
        outputs first). SIGINT and SIGTERM finish the current round, save ``checkpoint-N/`` and return early,
        in the last round too (resuming saves ``final/``); ``self.stopped_by`` then names the signal. One that
        arrives during the final save lets it finish and sets ``self.stopped_by`` all the same, so that callers
        stop (`llm_iif.runs.signals`). ``self.checkpoint`` is where the last save went.
        """
        acc, run = self.accelerator, self.recipe.run
        start = self.restore(resume_from) if resume_from is not None else 0
        if resume_from is None:
            self.outputs.start(overwrite)
        self.outputs.open_trackers()
        self._bar = tqdm(range(start, run.rounds), desc="PPO rounds", initial=start, total=run.rounds,
                         disable=not acc.is_main_process)
        self.stopped_by = None
        with FinishOnSignal() as signals:
            for k in self._bar:
                metrics = self.run_round(k)
                if self.evaluator is not None and self.evaluator.due(k, run.rounds):
                    self._phase("evaluate")
                    metrics.update(self.evaluator(len(self.history) + 1))
                self.history.append(metrics)
                self._last_postfix = f"reward {metrics['reward_mean']:.3f} · KL {metrics['kl']:.2f}"
                self.outputs.log_round(k, metrics)
                self.stopped_by = signals.received_anywhere(acc)
                periodic = run.save_every and (k + 1) % run.save_every == 0 and k + 1 < run.rounds
                if self.stopped_by or periodic:
                    self.save(self.outputs.paths.checkpoint(k + 1))
                if self.stopped_by:
                    break
            if self.stopped_by is None:
                self.save(self.outputs.paths.final)
                self.stopped_by = signals.received_anywhere(acc)  # during the final save, which it let finish
        self.outputs.close_trackers()
        return self.history

    def run_round(self, k: int) -> dict:
        """One round of Algorithm 1 at θ(k); returns the round's metrics."""
        start, timer = time.perf_counter(), PhaseTimer()
        self.guard.start_round()
        # 1. Collect: sample, reward and score every token at θ(k).
        self._phase("generate")
        rollout, collect_seconds = self.collector(self.prompts.next_batch())
        trusted_metrics = self.trusted_metrics()
        # 2. Advantages, with the KL coefficient the round started with.
        kl_coef = self.kl_controller.value
        advantages = estimate_advantages(rollout, kl_coef, self.cfg, self.accelerator)
        rollout, advantages = drop_nonfinite_advantages(rollout, advantages, self.accelerator, self.guard)
        # 3. Select: influence of every sample on the validation target, then the filter.
        if self.iif is not None:
            self._phase("score")
        selection, first_epoch = self.select(rollout, advantages)
        scored = self.iif is not None and self.recipe.iif.mode != "random"
        checked = self.check_scores(k, rollout, advantages) if scored and k in self.recipe.iif.lds_rounds else {}
        # 4. Update: PPO epochs on the kept samples, spread evenly over the processes (in-run scoring made the
        #    first epoch's gradients in step 3).
        self._phase("update")
        with timer.phase("update"):
            (kept_rollout, kept_advantages), placeholder = rebalance(
                self.accelerator, (rollout.select(selection.keep), advantages.select(selection.keep)),
                self.tokenizer.pad_token_id)
            update_stats = self.update(kept_rollout, kept_advantages, placeholder, first_epoch)
        # 5. Log: the whole batch's statistics; the KL controller sees every sample, kept or not, as in the paper.
        metrics = {**round_metrics(k, rollout, advantages, update_stats, kl_coef, self.accelerator),
                   **report_metrics(rollout, self.parts.report_rewards, self.accelerator), **self.guard.end_round()}
        self.kl_controller.update(metrics["kl"], self.recipe.run.batch_size)
        self.outputs.log_samples(k, rollout)
        self.outputs.write_records(k, rollout, advantages, selection.influence, selection.keep)
        measuring = checked.get("time_lds_s", 0.0) + trusted_metrics.get("time_trusted_s", 0.0)
        return {**metrics, **trusted_metrics, **selection.metrics, **checked, **collect_seconds, **timer.as_metrics(),
                "time_round_s": time.perf_counter() - start - measuring}

    def trusted_metrics(self) -> dict:
        """The policy's margin and accuracy on the trusted triples at θ(k), the parameters this round's samples
        and report rewards come from; with ``time_trusted_s``, which, like the LDS check, is a measurement and
        not counted in ``time_round_s``."""
        if self.trusted is None:
            return {}
        start = time.perf_counter()
        with self.accelerator.autocast():
            metrics = self.trusted.metrics(self.accelerator.unwrap_model(self.policy))
        return {**metrics, "time_trusted_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ Stage II: select

    def select(self, rollout: Rollout, advantages: Advantages) -> tuple[Selection, FirstEpoch | None]:
        """The IIF stage's decision for this rollout, or every sample kept when IIF is off; with in-run scoring,
        also the first epoch made by the same pass (`llm_iif.training.in_run`)."""
        acc, iif = self.accelerator, self.recipe.iif
        if self.iif is None:
            return Selection(torch.ones(len(rollout), dtype=torch.bool, device=acc.device), None,
                             {"kept_fraction": 1.0}), None
        precondition = (adam_preconditioner(self.optimizer, scored_parameters(acc.unwrap_model(self.policy)))
                        if iif.precondition == "adam" else None)
        if self.in_run is not None:
            weights = (rollout_target_rows(iif.target, rollout, advantages, acc).weights
                       if iif.target_source == "batch" else None)
            return self.in_run.select(self.policy, rollout, advantages, mean_response_length(rollout, acc), weights,
                                      precondition)
        return self.iif.select(self.policy, self.per_sample_losses(rollout, advantages), len(rollout),
                               precondition), None

    def per_sample_losses(self, rollout: Rollout, advantages: Advantages) -> PerSampleLoss | PerSampleLossAndTarget:
        """Each sample's PPO loss as the stage scores it (with its target term, for ``target_source: batch``)."""
        acc, iif = self.accelerator, self.recipe.iif
        tokens_per_sample = mean_response_length(rollout, acc)
        if iif.target_source == "batch":  # the batch is its own target: loss and target term from one forward
            weights = rollout_target_rows(iif.target, rollout, advantages, acc).weights
            return ppo_sample_loss_and_target(rollout, advantages, self.cfg, iif.train_grad, tokens_per_sample,
                                              weights)
        return ppo_sample_loss(rollout, advantages, self.cfg, iif.train_grad, tokens_per_sample)

    def check_scores(self, k: int, rollout: Rollout, advantages: Advantages) -> dict:
        """The LDS check of round ``k`` (`llm_iif.training.lds_check`): its metrics, with ``time_lds_s``; the
        subsets' predicted and real changes go to lds/round_XXXX.json."""
        start = time.perf_counter()
        metrics, details = linear_datamodeling_check(self, rollout, advantages, seed=self.recipe.run.seed + k)
        self.outputs.write_lds(k, details)
        return {**metrics, "time_lds_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ Stage III: update

    def update(self, rollout: Rollout, advantages: Advantages, placeholder: bool = False,
               first_epoch: FirstEpoch | None = None) -> UpdateStats:
        """``ppo.epochs`` passes of clipped-PPO minibatch steps over ``rollout``; returns mean statistics.

        With ``placeholder`` every step has weight 0: this process only keeps DDP in step with the others. With
        ``first_epoch`` (in-run scoring, `llm_iif.training.in_run`) the first pass's steps take their gradients
        from it, this process's kept rows at θ(k), and the later passes train on ``rollout``.
        """
        acc, cfg = self.accelerator, self.cfg
        n_local = len(rollout)
        # Every process must take the same number of optimiser steps, even with uneven sample counts.
        n_max = int(global_max(acc, torch.tensor(n_local)))
        n_minibatches = max(1, math.ceil(n_max / cfg.mini_batch_size))
        # Statistics stay on the device until the end: one host sync per round, not five per step.
        totals = torch.zeros(STATISTICS + 1, dtype=torch.float64, device=acc.device)  # + the step count
        skipped = 0
        dpo_coef = self.recipe.trusted.dpo_coef if self.trusted is not None else 0.0
        dpo_total = torch.zeros((), dtype=torch.float64, device=acc.device)
        for epoch in range(cfg.epochs):
            if epoch == 0 and first_epoch is not None:
                order = torch.randperm(len(first_epoch), generator=self.parts.minibatch_generator)
                for rows in torch.tensor_split(order, n_minibatches):
                    totals += first_epoch.set_gradients(rows, acc.unwrap_model(self.policy), acc)
                    skipped += self._optimiser_step()
                continue
            order = torch.randperm(n_local, generator=self.parts.minibatch_generator)
            for index in torch.tensor_split(order, n_minibatches):
                weight = 0.0 if placeholder else 1.0
                if len(index) == 0:  # this process ran out of samples: a zero-weight step keeps DDP in step
                    index, weight = order[:1], 0.0
                index = index.to(acc.device)
                batch, mb = rollout.select(index), advantages.select(index)
                mask = batch.response_mask
                with acc.autocast():
                    logits, values = self.policy(batch.input_ids, batch.attention_mask)
                terms = ppo_terms(logits, values, batch, mb.advantages, mb.returns, cfg)
                loss = minibatch_loss(terms, mask, cfg.vf_coef)
                if dpo_coef:
                    with acc.autocast():  # through the unwrapped policy: DDP reduces the summed gradient once
                        dpo = self.trusted.dpo_loss(acc.unwrap_model(self.policy), cfg.mini_batch_size)
                    loss = loss + dpo_coef * dpo
                    dpo_total += weight * dpo.detach().double()
                acc.backward(weight * loss)
                skipped += self._optimiser_step()
                with torch.no_grad():  # ordered as UpdateStats' fields, then the step count
                    totals += weight * torch.stack([ppo.masked_mean(term, mask) for term in terms.statistics()]
                                                   + [torch.ones((), device=acc.device)]).double()
        summed = acc.reduce(totals, "sum")
        # DDP all-reduces gradients before the check, so every process skips the same steps.
        self.guard.flag("grad_steps", skipped, f"the gradient was NaN or inf in {skipped} of "
                        f"{cfg.epochs * n_minibatches} optimiser steps")
        stats = UpdateStats(*[(summed[i] / summed[-1].clamp(min=1)).item() for i in range(len(summed) - 1)])
        if dpo_coef:
            stats.dpo_loss = (acc.reduce(dpo_total, "sum") / summed[-1].clamp(min=1)).item()
        return stats

    def _optimiser_step(self) -> int:
        """Clip the gradient and step, unless it is NaN or inf; returns 1 for a skipped step, else 0."""
        acc = self.accelerator
        grad_norm = acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        skipped = 0
        # fp16's loss scaler skips overflowing steps itself; otherwise a NaN/inf gradient skips the step.
        if acc.scaler is None and grad_norm is not None and not torch.isfinite(grad_norm):
            skipped = 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: Path) -> None:
        """Checkpoint everything an exact resume needs (written by the main process; all take part)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        policy = acc.unwrap_model(self.policy)
        if is_sharded(policy):  # every process takes part in gathering FSDP2's shards
            weights, optimizer_state = whole_state(policy, self.optimizer)
        else:
            weights, optimizer_state = acc.get_state_dict(self.policy), self.optimizer.state_dict()
        rng = gather_object([run_state.rng_states(self._generators())])  # one entry per process
        if acc.is_main_process:
            trainable = {n: weights[n].detach().cpu().clone() for n, p in policy.named_parameters()
                         if p.requires_grad}
            training_state = {"trainable": trainable, "optimizer": optimizer_state, "fsdp2": is_sharded(policy),
                              "kl_coef": self.kl_controller.value, "history": self.history,
                              **self.prompts.state_dict(),
                              "nonfinite_rounds_in_a_row": self.guard.rounds_in_a_row, "rng": rng,
                              "iif_target": self.iif.state_dict() if self.iif is not None else {},
                              "trusted": self.trusted.state_dict() if self.trusted is not None else {}}
            manifest = {"rounds_completed": len(self.history), "kl_coef": self.kl_controller.value,
                        "base_model": self.recipe.model.name_or_path, "num_processes": acc.num_processes}
            run_state.save_checkpoint(policy, self.tokenizer, directory, manifest, weights, training_state)
            run_state.prune(self.outputs.paths.root, self.recipe.run.keep_last_n)
        acc.wait_for_everyone()
        self.checkpoint = directory

    def restore(self, checkpoint: Path) -> int:
        """Load a checkpoint written by `save` and return the number of rounds it completed. Outputs and
        checkpoints of rounds after it (from a run killed later) are removed, so the run directory reads as
        one run."""
        acc = self.accelerator
        state = run_state.load_checked(checkpoint, self.outputs.paths, self.recipe, acc.num_processes)
        policy = acc.unwrap_model(self.policy)
        sharded = is_sharded(policy)
        if state.get("fsdp2", False) != sharded:  # their optimiser states are laid out differently
            kind = {True: "an FSDP2", False: "a DDP or single-process"}
            raise UserError(f"{checkpoint}: written by {kind[not sharded]} launch; resume it with one like it, "
                            f"not {kind[sharded]} one")
        missing = [name for name, param in policy.named_parameters()
                   if param.requires_grad and name not in state["trainable"]]
        if missing:
            raise UserError(f"{checkpoint}: has no tensor for the trainable parameter '{missing[0]}' ({len(missing)} "
                            "missing); expected a checkpoint of this run's model and LoRA settings")
        if sharded:
            load_whole_state(policy, self.optimizer, state["trainable"], state["optimizer"])
        else:
            with torch.no_grad():
                for name, param in policy.named_parameters():
                    if param.requires_grad:
                        param.copy_(state["trainable"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.value = state["kl_coef"]
        self.history = state["history"]
        self.prompts.load_state_dict(state)
        self.guard.rounds_in_a_row = state["nonfinite_rounds_in_a_row"]
        if self.iif is not None and state.get("iif_target"):  # checkpoints before target sources have none
            self.iif.load_state_dict(state["iif_target"])
        if self.trusted is not None and state.get("trusted"):
            self.trusted.load_state_dict(state["trusted"])
        run_state.restore_rng_states(state["rng"][acc.process_index], self._generators())
        self.outputs.rewind(self.history)
        if acc.is_main_process:
            run_state.discard_checkpoints_after(self.outputs.paths.root, len(self.history))
        acc.wait_for_everyone()
        return len(self.history)

    def _generators(self) -> dict[str, torch.Generator]:
        return {"minibatch": self.parts.minibatch_generator, "filter": self.parts.filter_generator}

    def _phase(self, name: str) -> None:
        """Show the round's current phase beside the progress bar's rounds and ETA."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name} · {self._last_postfix}" if self._last_postfix else name)
