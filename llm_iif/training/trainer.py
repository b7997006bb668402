"""The PPO trainer for causal LMs with LoRA, run under `accelerate`.

One round follows the paper's Algorithm 1:

    rollout    = collect(prompts)           # Stage I:  sample, reward, score tokens at θ(k), GAE
    keep       = select(rollout)            # Stage II: influence of each sample on a validation target
                                            #           at θ(k), then drop the harmful ones (IIF)
    statistics = update(rollout[keep])      # Stage III: PPO epochs on the kept samples

Every process runs the same code on its own slice of the batch. Statistics that must agree across
processes (advantage whitening, KL for the controller, the target gradient, logged metrics) are all-reduced;
influence scores are gathered and filtered once over the whole batch; the number of optimiser steps is
agreed before the update so DDP never waits on a process that has finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from llm_iif.attribution import influence
from llm_iif.core import ppo
from llm_iif.attribution.filters import filter_mask
from llm_iif.attribution.gradients import grad_cosine
from llm_iif.core.config import Recipe, load_recipe
from llm_iif.lm.data import load_prompts, load_validation_set, read_prompts
from llm_iif.core.errors import UserError
from llm_iif.training import run_state as checkpoints
from llm_iif.core.fileio import append_jsonl, atomic_write_text, write_parquet
from llm_iif.training.run_outputs import open_trackers
from llm_iif.analysis.plots import plot_reward_curve
from llm_iif.lm.policy import load_policy, prompt_formatter
from llm_iif.training.run_outputs import environment
from llm_iif.core.records import Rollout, concat_rows, map_tensors, pad_to_widths, select_rows
from llm_iif.core.tokens import at_response_positions, response_logprobs
from llm_iif.lm.generation import sample_responses, score_tokens, tokenize_pairs
from reward_models import load_reward_model
from reward_models.python_callable import CallableReward

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Advantages:
    """Per-token training targets for one rollout, all [B, T]."""
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, index: torch.Tensor) -> "Advantages":
        return select_rows(self, index)


class PPOTrainer:
    """Train ``recipe`` with PPO. ``train()`` runs all rounds and returns the per-round metrics."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None):
        self.recipe = recipe
        self.cfg = recipe.ppo
        self.accelerator = accelerator or make_accelerator(recipe)
        acc = self.accelerator
        check_distributed_support(acc, recipe)
        if recipe.run.batch_size % acc.num_processes:
            raise UserError(f"run.batch_size: {recipe.run.batch_size} does not divide evenly over "
                            f"{acc.num_processes} processes")
        self.local_batch_size = recipe.run.batch_size // acc.num_processes
        self.output_dir = Path(recipe.run.output_dir)

        set_seed(recipe.run.seed)  # same LoRA and value-head init on every process
        with acc.main_process_first():  # built-in models are built once, by the main process
            policy, self.tokenizer = load_policy(recipe.model, recipe.lora)
            self.reward_model = load_reward_model(recipe.reward, device=acc.device)
            self.eval_rewards = {name: load_reward_model(cfg, device=acc.device)
                                 for name, cfg in recipe.eval.rewards.items()} if recipe.eval.every else {}
        self.format_prompt = prompt_formatter(self.tokenizer, recipe.model.chat_template)
        self.prompts = load_prompts(recipe.data, self.tokenizer, recipe.run.seed)
        self.eval_prompts = (read_prompts(recipe.eval.data, self.tokenizer, "eval.data")[0][:recipe.eval.size]
                             if recipe.eval.every else [])
        self.validation = None
        if recipe.iif.enabled:
            if recipe.iif.val_size % acc.num_processes:
                raise UserError(f"iif.val_size: {recipe.iif.val_size} does not divide evenly over "
                                f"{acc.num_processes} processes")
            self.validation = load_validation_set(recipe.iif, self.prompts)
        self.report_rewards = {name: CallableReward(path, key=f"reward.report.{name}")
                               for name, path in recipe.reward.report.items()}
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=self.cfg.learning_rate)
        if acc.state.deepspeed_plugin is not None:  # no data loader is prepared, so DeepSpeed must be told
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.cfg.mini_batch_size
        self.policy, self.optimizer = acc.prepare(policy, optimizer)
        # After prepare: FSDP replaces parameters with sharded ones.
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.kl_controller = (ppo.AdaptiveKLController(self.cfg.init_kl_coef, self.cfg.target_kl,
                                                       self.cfg.kl_horizon)
                              if self.cfg.adaptive_kl else ppo.FixedKLController(self.cfg.init_kl_coef))

        # Sampling differs per process; the prompt order is shared so processes take disjoint slices.
        set_seed(recipe.run.seed, device_specific=True)
        self.minibatch_generator = torch.Generator().manual_seed(recipe.run.seed + acc.process_index)
        self.filter_generator = torch.Generator().manual_seed(recipe.run.seed)  # the same on every process
        self._prompt_rng = random.Random(recipe.run.seed)
        self._prompt_queue: list[str] = []
        self.history: list[dict] = []
        self._nonfinite_rounds_in_a_row = 0
        self._round_nonfinite = dict.fromkeys(NONFINITE_KINDS, 0)
        self._bar, self._last_postfix = None, ""

    # ------------------------------------------------------------------ the round loop

    def train(self, resume_from: Path | None = None) -> list[dict]:
        """Run the rounds not yet done and return the metrics of all rounds.

        ``resume_from``: a checkpoint directory of this run (see `checkpoints.resolve_resume`); training
        continues exactly where it stopped, writing into the same run directory. SIGINT and SIGTERM finish
        the current round, save a checkpoint and return early; ``self.stopped_by`` then names the signal.
        """
        from tqdm.auto import tqdm

        acc, run = self.accelerator, self.recipe.run
        start = self.restore(resume_from) if resume_from is not None else 0
        if acc.is_main_process and resume_from is None:
            self._start_outputs()
        trackers = []
        if acc.is_main_process:
            trackers = open_trackers(run.report_to, self.output_dir, self.output_dir.name, self.recipe.to_dict())
        bar = tqdm(range(start, run.rounds), desc="PPO rounds", initial=start, total=run.rounds,
                   disable=not acc.is_main_process)
        self._bar = bar
        self.stopped_by = None
        with _FinishRoundOnSignal() as signals:
            for k in bar:
                metrics = self.run_round(k)
                if self.recipe.eval.every and ((k + 1) % self.recipe.eval.every == 0 or k + 1 == run.rounds):
                    self._phase("evaluate")
                    metrics.update(self.evaluate())
                self.history.append(metrics)
                self._last_postfix = f"reward {metrics['reward_mean']:.3f} · KL {metrics['kl']:.2f}"
                if acc.is_main_process:
                    self._append_metrics(metrics)
                    numbers = {n: v for n, v in metrics.items() if n != "round" and isinstance(v, (int, float))}
                    for tracker in trackers:
                        tracker.log(numbers, step=k)
                # Every process stops after the same round, whichever of them received the signal.
                stop = acc.reduce(torch.tensor(float(signals.received is not None), device=acc.device), "max")
                if k + 1 < run.rounds and (stop.item() or (run.save_every and (k + 1) % run.save_every == 0)):
                    self.save(self.output_dir / f"checkpoint-{k + 1}")
                if stop.item() and k + 1 < run.rounds:
                    self.stopped_by = signals.received or "a signal on another process"
                    break
        if self.stopped_by is None:
            self.save(self.output_dir / "final")
        if acc.is_main_process:
            for tracker in trackers:
                tracker.finish()
            plot_reward_curve(self.history, self.output_dir / "reward_curve.png",
                              title=f"{self.recipe.model.name_or_path} · {self.recipe.reward.name}")
        return self.history

    def run_round(self, k: int) -> dict:
        """One round of Algorithm 1 at θ(k); returns the round's metrics."""
        start = time.perf_counter()
        self._round_nonfinite = dict.fromkeys(NONFINITE_KINDS, 0)
        self._phase("generate")
        rollout, timings = self.collect(self._next_prompts())
        rollout, targets = self.drop_nonfinite_advantages(rollout, self.estimate_advantages(rollout))
        kl_coef = self.kl_controller.value
        if self.recipe.iif.enabled:
            self._phase("score")
        keep, scores, select_metrics = self.select(rollout, targets)
        self._phase("update")
        t_update = time.perf_counter()
        update_stats = self.update(*self.rebalance(rollout.select(keep), targets.select(keep)))
        timings["time_update_s"] = time.perf_counter() - t_update

        metrics = {**self._round_metrics(k, rollout, targets, update_stats, kl_coef),
                   **self._report_metrics(rollout),
                   **{f"nonfinite_{kind}": count for kind, count in self._round_nonfinite.items()}}
        bad_round = any(self._round_nonfinite.values())
        self._nonfinite_rounds_in_a_row = self._nonfinite_rounds_in_a_row + 1 if bad_round else 0
        # The controller sees the whole batch's KL, filtered or not, as in the paper.
        self.kl_controller.update(metrics["kl"], self.recipe.run.batch_size)
        self._log_samples(k, rollout)
        self._write_records(k, rollout, targets, scores, keep)
        return {**metrics, **select_metrics, **timings, "time_round_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ Stage I: collect

    def collect(self, prompts: list[str]) -> tuple[Rollout, dict]:
        """Sample responses, reward them and score every token at the round's start parameters θ(k).

        Samples with a NaN or inf reward, log-prob or value are dropped here, before they reach any
        statistic, within `run.nonfinite_patience` (`_flag_nonfinite`). Returns (rollout, timings).
        """
        acc, policy = self.accelerator, self.accelerator.unwrap_model(self.policy)
        t0 = time.perf_counter()
        with acc.autocast():
            query_ids, query_mask, response_ids, response_mask = sample_responses(
                policy.lm, self.tokenizer, [self.format_prompt(p) for p in prompts], self.cfg, acc.device)
        responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        t1 = time.perf_counter()
        scores = torch.tensor(self.reward_model(prompts, responses), dtype=torch.float32, device=acc.device)
        if scores.shape != (len(prompts),):
            raise UserError(f"reward.name: '{self.recipe.reward.name}' returned {tuple(scores.shape)} scores "
                            f"for {len(prompts)} samples; expected one float per sample")
        t2 = time.perf_counter()
        with acc.autocast():
            tokens = score_tokens(policy, query_ids, query_mask, response_ids, response_mask,
                                  self.cfg.temperature, self.cfg.forward_batch_size)
        t3 = time.perf_counter()
        rollout = Rollout(prompts, responses, query_ids, query_mask, response_ids, response_mask, scores, **tokens)

        finite_reward = torch.isfinite(scores)
        finite_policy = rows_finite(response_mask, tokens["logprobs"], tokens["ref_logprobs"], tokens["values"])
        keep = finite_reward & finite_policy
        bad_reward, bad_policy, kept = (int(n) for n in acc.reduce(torch.stack([
            (~finite_reward).sum(), (finite_reward & ~finite_policy).sum(), keep.sum()]), "sum").tolist())
        total, nothing_left = len(prompts) * acc.num_processes, kept == 0
        example = ""
        if not finite_reward.all():  # one offending sample from this process, to debug the reward model with
            i = int((~finite_reward).nonzero()[0])
            example = f"; e.g. prompt {prompts[i]!r}, response {responses[i]!r}"
        self._flag_nonfinite("reward", bad_reward, f"reward.name: '{self.recipe.reward.name}' returned NaN or inf "
                             f"for {bad_reward} of {total} samples{example}", nothing_left)
        self._flag_nonfinite("policy", bad_policy, f"the policy's log-probs or values are NaN or inf for "
                             f"{bad_policy} of {total} samples", nothing_left)
        if not keep.all():
            rollout = rollout.select(keep)
        return rollout, {"time_generate_s": t1 - t0, "time_reward_s": t2 - t1, "time_forward_s": t3 - t2}

    def _flag_nonfinite(self, kind: str, count: int, message: str, nothing_left: bool = False) -> None:
        """Record ``count`` NaN/inf ``kind`` events of this round (already summed over processes).

        The affected samples or steps are skipped and counted in ``nonfinite_<kind>``. The run stops with
        ``message`` when this would make more than `run.nonfinite_patience` such rounds in a row, or when
        ``nothing_left`` to train on.
        """
        if not count:
            return
        self._round_nonfinite[kind] += count
        in_a_row, patience = self._nonfinite_rounds_in_a_row + 1, self.recipe.run.nonfinite_patience
        if nothing_left or in_a_row > patience:
            hint = "" if nothing_left else "; run.nonfinite_patience > 0 skips them instead"
            raise UserError(f"{message} ({in_a_row} round(s) in a row){hint}")
        logger.warning("%s; skipped (%d of run.nonfinite_patience=%d rounds in a row)", message, in_a_row, patience)

    def drop_nonfinite_advantages(self, rollout: Rollout, targets: Advantages) -> tuple[Rollout, Advantages]:
        """Drop samples whose advantages or returns came out NaN or inf (e.g. an overflow)."""
        finite = rows_finite(rollout.response_mask, targets.advantages, targets.returns)
        bad, kept = (int(n) for n in self.accelerator.reduce(torch.stack([(~finite).sum(), finite.sum()]),
                                                             "sum").tolist())
        self._flag_nonfinite("advantage", bad, f"advantages or returns are NaN or inf for {bad} samples", kept == 0)
        return (rollout, targets) if not bad else (rollout.select(finite), targets.select(finite))

    def estimate_advantages(self, rollout: Rollout) -> Advantages:
        """KL-penalised per-token rewards → GAE → advantages whitened with statistics over all processes."""
        mask = rollout.response_mask
        rewards, kl = ppo.kl_penalized_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                               self.kl_controller.value)
        advantages, returns = ppo.gae(rewards, rollout.values, mask, self.cfg.gamma, self.cfg.lam)
        moments = self.accelerator.reduce(ppo.masked_moments(advantages, mask), "sum")
        return Advantages(kl, ppo.masked_whiten(advantages, mask, moments), returns)

    # ------------------------------------------------------------------ Stage II: select

    def select(self, rollout: Rollout, targets: Advantages) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Which samples the update trains on.

        Scores every sample's influence on the validation target at θ(k), then filters over the whole batch
        (all processes) with ``iif.mode``. Returns this process's [B] bool keep-mask, its [B] scores (None
        when nothing was scored: IIF off, or the score-blind ``random`` mode) and the stage's metrics.
        """
        iif, acc = self.recipe.iif, self.accelerator
        if not iif.enabled:
            return torch.ones(len(rollout), dtype=torch.bool, device=acc.device), None, {"kept_fraction": 1.0}
        start = time.perf_counter()
        metrics, scores, filtering = {}, None, True
        if iif.mode != "random":
            target, metrics["target_split_cos"], metrics["time_val_generate_s"] = self.target_gradient()
            tokens, samples = acc.reduce(torch.stack([rollout.response_mask.sum().float(),
                                                      torch.tensor(float(len(rollout)), device=acc.device)]),
                                         "sum").tolist()
            # Scoring gradients are per process: DDP must not all-reduce them.
            with acc.no_sync(self.policy), acc.autocast():
                scores = influence.influence_scores(acc.unwrap_model(self.policy), rollout, targets.advantages,
                                                    targets.returns, target, self.cfg, iif.train_grad,
                                                    tokens / samples, iif.score_batch_size)
            filtering = iif.min_split_cos is None or metrics["target_split_cos"] >= iif.min_split_cos
        # One decision over every process's scores, so N processes filter exactly as one would.
        local = scores if scores is not None else torch.zeros(len(rollout), device=acc.device)
        counts = gather_object([len(rollout)])
        all_scores = torch.tensor(gather_object(local.tolist()), dtype=torch.float32)
        scored = torch.isfinite(all_scores)
        self._flag_nonfinite("score", int((~scored).sum()), f"influence scores are NaN or inf for "
                             f"{int((~scored).sum())} of {len(all_scores)} samples", not scored.any())
        keep_all = torch.zeros_like(scored)  # a sample without a usable score is not trained on
        keep_all[scored] = filter_mask(all_scores[scored], iif.mode if filtering else "none", iif.p,
                                       self.filter_generator)
        offset = sum(counts[:acc.process_index])
        keep = keep_all[offset:offset + len(rollout)].to(acc.device)

        metrics["kept_fraction"] = keep_all.float().mean().item()
        metrics["filtered"] = int(filtering)
        if scores is not None:
            metrics["score_mean"] = all_scores[scored].mean().item()
            metrics["score_neg_fraction"] = (all_scores[scored] < 0).float().mean().item()
        metrics["time_influence_s"] = time.perf_counter() - start - metrics.get("time_val_generate_s", 0.0)
        return keep, scores, metrics

    def target_gradient(self) -> tuple[dict[str, torch.Tensor], float, float]:
        """The target ∇L_val = -∇f over the LoRA parameters at θ(k), from this round's validation responses
        on all processes. Returns (target, cosine between the two halves' gradients, seconds spent
        generating and rewarding the validation responses)."""
        acc, iif = self.accelerator, self.recipe.iif
        policy = acc.unwrap_model(self.policy)
        start = time.perf_counter()
        prompts = self._validation_rows("prompt")
        if iif.target == "gold":
            ids = tokenize_pairs(self.tokenizer, [self.format_prompt(p) for p in prompts],
                                 self._validation_rows("response"), acc.device)
            weights = influence.target_token_weights("gold", None, None, ids[3])
        else:
            rollout, _ = self.collect(prompts)
            advantages = self.estimate_advantages(rollout).advantages
            ones = torch.ones_like(rollout.scores)
            rewards = ppo.masked_whiten(rollout.scores, ones, acc.reduce(ppo.masked_moments(rollout.scores, ones), "sum"))
            ids = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
            weights = influence.target_token_weights(iif.target, advantages, rewards, rollout.response_mask)
        generate_seconds = time.perf_counter() - start
        # Each process's part is summed by the explicit reduce below.
        with acc.no_sync(self.policy), acc.autocast():
            half_a, half_b = influence.target_gradient_halves(policy, *ids, weights, self.cfg.temperature,
                                                              iif.score_batch_size)
        names = list(half_a)
        flat = acc.reduce(torch.cat([torch.cat([h[n].flatten() for n in names]) for h in (half_a, half_b)]), "sum")
        flat_a, flat_b = flat.chunk(2)
        half_a, half_b = _unflatten(flat_a, half_a), _unflatten(flat_b, half_b)
        n_total = acc.reduce(torch.tensor(float(len(prompts)), device=acc.device), "sum").item()
        target = {n: (half_a[n] + half_b[n]) / n_total for n in names}
        return target, grad_cosine(half_a, half_b), generate_seconds

    def _validation_rows(self, column: str) -> list[str]:
        """This process's share of the round's ``iif.val_size`` validation rows, cycling the set as needed."""
        rows = self.validation[column]
        size = self.recipe.iif.val_size // self.accelerator.num_processes
        start = self.accelerator.process_index * size
        return [rows[i % len(rows)] for i in range(start, start + size)]

    # ------------------------------------------------------------------ Stage III: update

    def rebalance(self, rollout: Rollout, targets: Advantages) -> tuple[Rollout, Advantages, bool]:
        """Spread the kept samples evenly over the processes, so that each runs the same optimiser steps
        however unevenly filtering kept them: the j-th kept sample of the whole batch (in process order)
        goes to process j mod N. Returns (rollout, targets, placeholder); a process left with no sample
        (fewer kept samples than processes) gets a copy of one and ``placeholder`` is True."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return rollout, targets, False
        widths = acc.reduce(torch.tensor([rollout.query_ids.shape[1], rollout.response_ids.shape[1]],
                                         device=acc.device), "max").tolist()

        def to_cpu(record):
            return map_tensors(pad_to_widths(record, *widths, self.tokenizer.pad_token_id), lambda _, t: t.cpu())

        shards = gather_object([(to_cpu(rollout), to_cpu(targets))])
        every_rollout, every_target = concat_rows([r for r, _ in shards]), concat_rows([t for _, t in shards])
        mine = torch.arange(acc.process_index, len(every_rollout), acc.num_processes)
        placeholder = len(mine) == 0
        if placeholder:
            mine = torch.tensor([acc.process_index % len(every_rollout)])

        def mine_on_device(record):
            return map_tensors(record.select(mine), lambda _, t: t.to(acc.device))

        return mine_on_device(every_rollout), mine_on_device(every_target), placeholder

    def update(self, rollout: Rollout, targets: Advantages, placeholder: bool = False) -> dict:
        """``ppo.epochs`` passes of clipped-PPO minibatch steps over ``rollout``; returns mean statistics.

        With ``placeholder`` every step has weight 0: this process only keeps DDP in step with the others.
        """
        acc, cfg = self.accelerator, self.cfg
        n_local = len(rollout)
        # Every process must take the same number of optimiser steps, even with uneven sample counts.
        n_max = int(acc.reduce(torch.tensor(n_local, device=acc.device), "max").item())
        n_minibatches = max(1, math.ceil(n_max / cfg.mini_batch_size))
        response_len = rollout.response_ids.shape[1]
        # Statistics stay on the device until the end: one host sync per round, not five per step.
        totals = torch.zeros(len(_UPDATE_STATS) + 1, dtype=torch.float64, device=acc.device)  # + step count
        skipped = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(n_local, generator=self.minibatch_generator)
            for index in torch.tensor_split(order, n_minibatches):
                weight = 0.0 if placeholder else 1.0
                if len(index) == 0:  # this process ran out of samples: a zero-weight step keeps DDP in step
                    index, weight = order[:1], 0.0
                index = index.to(acc.device)
                batch, mb = rollout.select(index), targets.select(index)
                mask = batch.response_mask
                with acc.autocast():
                    logits, values = self.policy(batch.input_ids, batch.attention_mask)
                logprobs = response_logprobs(logits, batch.response_ids, cfg.temperature)
                values = at_response_positions(values, response_len)
                pg_loss, pg_clipped = ppo.clipped_policy_loss(logprobs, batch.logprobs, mb.advantages,
                                                              cfg.clip_range)
                vf_loss, vf_clipped = ppo.clipped_value_loss(values, batch.values, mb.returns,
                                                             cfg.clip_range_value)
                policy_loss, value_loss = ppo.masked_mean(pg_loss, mask), ppo.masked_mean(vf_loss, mask)
                acc.backward(weight * (policy_loss + cfg.vf_coef * value_loss))
                grad_norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                # fp16's loss scaler skips overflowing steps itself; otherwise a NaN/inf gradient skips the step.
                if acc.scaler is None and grad_norm is not None and not torch.isfinite(grad_norm):
                    skipped += 1
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():  # ordered as _UPDATE_STATS, then the step count
                    totals += weight * torch.stack([
                        policy_loss, value_loss, ppo.masked_mean(pg_clipped, mask), ppo.masked_mean(vf_clipped, mask),
                        ppo.masked_mean(ppo.approx_kl(logprobs, batch.logprobs), mask),
                        torch.ones((), device=acc.device)]).double()
        summed = acc.reduce(totals, "sum")
        # DDP all-reduces gradients before the check, so every process skips the same steps.
        self._flag_nonfinite("grad_steps", skipped, f"the gradient was NaN or inf in {skipped} of "
                             f"{cfg.epochs * n_minibatches} optimiser steps")
        return {k: (summed[i] / summed[-1].clamp(min=1)).item() for i, k in enumerate(_UPDATE_STATS)}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """``eval/<name>``: the mean score of each ``eval.rewards`` model on one sampled response to each of
        the ``eval.size`` evaluation prompts, at the current parameters (after this round's update)."""
        acc, policy = self.accelerator, self.accelerator.unwrap_model(self.policy)
        prompts = self.eval_prompts[acc.process_index::acc.num_processes]
        start = time.perf_counter()
        responses = []
        # Its own seeded random numbers: evaluating (or not) must not change what training samples next.
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            torch.manual_seed(self.recipe.run.seed + 1_000_003 * (len(self.history) + 1) + acc.process_index)
            if prompts:
                with acc.autocast():
                    _, _, response_ids, _ = sample_responses(policy.lm, self.tokenizer,
                                                             [self.format_prompt(p) for p in prompts], self.cfg,
                                                             acc.device)
                responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        metrics = {}
        for name, reward_model in self.eval_rewards.items():
            scores = torch.tensor(reward_model(prompts, responses) if prompts else [], dtype=torch.float64,
                                  device=acc.device)
            if not torch.isfinite(scores).all():
                raise UserError(f"eval.rewards.{name}: returned NaN or inf for "
                                f"{int((~torch.isfinite(scores)).sum())} of {len(scores)} evaluation responses")
            total, count = acc.reduce(torch.stack([scores.sum(), torch.tensor(float(len(scores)),
                                                                              device=acc.device,
                                                                              dtype=torch.float64)]), "sum")
            metrics[f"eval/{name}"] = (total / count).item()
        metrics["time_eval_s"] = time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------ outputs

    def save(self, directory: Path) -> None:
        """Checkpoint everything an exact resume needs (written by the main process; all take part)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        weights = acc.get_state_dict(self.policy)  # every process takes part: ZeRO-3 / FSDP gather shards here
        rng = gather_object([checkpoints.rng_states(self._generators())])  # one entry per process
        if acc.is_main_process:
            policy = acc.unwrap_model(self.policy)
            trainable = {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad}
            training_state = {"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                              "kl_coef": self.kl_controller.value, "history": self.history,
                              "prompt_queue": self._prompt_queue, "prompt_rng": self._prompt_rng.getstate(),
                              "nonfinite_rounds_in_a_row": self._nonfinite_rounds_in_a_row, "rng": rng}
            state = {"rounds_completed": len(self.history), "kl_coef": self.kl_controller.value,
                     "base_model": self.recipe.model.name_or_path, "num_processes": acc.num_processes}
            checkpoints.save_checkpoint(policy, self.tokenizer, directory, state, weights, training_state)
            checkpoints.prune(self.output_dir, self.recipe.run.keep_last_n)
        acc.wait_for_everyone()

    def restore(self, checkpoint: Path) -> int:
        """Load a checkpoint written by `save` and return the number of rounds it completed. Outputs of
        rounds after it (from a run killed later) are removed, so the run directory reads as one run."""
        acc = self.accelerator
        if Path(checkpoint).resolve().parent != self.output_dir.resolve():
            raise UserError(f"--resume: {checkpoint} is not in run.output_dir {self.output_dir}")
        manifest = checkpoints.verify(checkpoint)
        saved = load_recipe(self.output_dir / "recipe.yaml")
        changed = _recipe_changes(saved, self.recipe) - {"run.rounds", "run.output_dir"}
        if changed:
            raise UserError(f"--resume: the recipe differs from {self.output_dir / 'recipe.yaml'} in "
                            f"{', '.join(sorted(changed))}; only run.rounds may change on resume")
        if self.recipe.run.rounds < manifest["rounds_completed"]:
            raise UserError(f"run.rounds: {checkpoint} has already completed {manifest['rounds_completed']} "
                            f"rounds; set run.rounds to more to continue")
        if manifest.get("num_processes", 1) != acc.num_processes:
            raise UserError(f"--resume: {checkpoint} was written by {manifest['num_processes']} process(es); "
                            f"resume it with the same number, not {acc.num_processes}")
        state = checkpoints.load_training_state(checkpoint)
        policy = acc.unwrap_model(self.policy)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if param.requires_grad:
                    param.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.value = state["kl_coef"]
        self.history = state["history"]
        self._prompt_queue, self._nonfinite_rounds_in_a_row = state["prompt_queue"], state["nonfinite_rounds_in_a_row"]
        self._prompt_rng.setstate(state["prompt_rng"])
        checkpoints.restore_rng_states(state["rng"][acc.process_index], self._generators())
        done = len(self.history)
        if acc.is_main_process:
            for name in ("metrics.jsonl", "timings.jsonl"):
                atomic_write_text(self.output_dir / name, "")
            for metrics in self.history:
                self._append_metrics(metrics)
            samples = self.output_dir / "samples.jsonl"
            if samples.exists():
                kept = [line for line in samples.read_text().splitlines() if json.loads(line)["round"] < done]
                atomic_write_text(samples, "".join(line + "\n" for line in kept))
            for path in (self.output_dir / "records").glob("round_*.parquet"):
                if int(path.stem.split("_")[1]) >= done:
                    path.unlink()
            atomic_write_text(self.output_dir / "recipe.yaml", yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        acc.wait_for_everyone()
        return done

    def _append_metrics(self, metrics: dict) -> None:
        """metrics.jsonl gets what training computed, so a seeded run reproduces it byte for byte;
        timings.jsonl gets the wall-clock ``time_*`` fields, which never repeat."""
        timings = {name: value for name, value in metrics.items() if name.startswith("time_")}
        append_jsonl(self.output_dir / "metrics.jsonl", {n: v for n, v in metrics.items() if n not in timings})
        append_jsonl(self.output_dir / "timings.jsonl", {"round": metrics["round"], **timings})

    def _generators(self) -> dict[str, torch.Generator]:
        return {"minibatch": self.minibatch_generator, "filter": self.filter_generator}

    def _round_metrics(self, k, rollout, targets, update_stats, kl_coef) -> dict:
        """The round's metrics over all processes' samples."""
        acc, mask = self.accelerator, rollout.response_mask.float()
        reward_mean, reward_var = ppo.mean_var_from_moments(
            acc.reduce(ppo.masked_moments(rollout.scores, torch.ones_like(rollout.scores)), "sum"))
        samples, kl_sum, tokens, entropy_sum = acc.reduce(torch.stack([
            torch.tensor(float(len(rollout)), device=acc.device), targets.kl.sum(), mask.sum(),
            (rollout.entropy * mask).sum()]), "sum").tolist()
        token_lists = gather_object([ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, mask)])
        return {
            "round": k,
            "samples": int(samples),
            "reward_mean": reward_mean.item(),
            "reward_std": reward_var.sqrt().item(),
            "kl": kl_sum / samples,
            "kl_coef": kl_coef,
            "entropy": entropy_sum / max(tokens, 1.0),
            **update_stats,
            "response_len_mean": tokens / samples,
            "distinct_2": ppo.distinct_n(token_lists, 2),
        }

    def _report_metrics(self, rollout: Rollout) -> dict:
        """reward/NAME: the mean of each `reward.report` score over all processes' samples."""
        if not self.report_rewards:
            return {}
        sums = torch.tensor([sum(score(rollout.prompts, rollout.responses)) for score in self.report_rewards.values()]
                            + [float(len(rollout))], dtype=torch.float64, device=self.accelerator.device)
        sums = self.accelerator.reduce(sums, "sum").tolist()
        return {f"reward/{name}": total / max(sums[-1], 1.0) for name, total in zip(self.report_rewards, sums)}

    def _next_prompts(self) -> list[str]:
        """This process's slice of the next global batch, drawn without replacement from shuffled passes."""
        global_batch = self.recipe.run.batch_size
        while len(self._prompt_queue) < global_batch:
            shuffled = list(self.prompts.train)
            self._prompt_rng.shuffle(shuffled)
            self._prompt_queue.extend(shuffled)
        batch, self._prompt_queue = self._prompt_queue[:global_batch], self._prompt_queue[global_batch:]
        start = self.accelerator.process_index * self.local_batch_size
        return batch[start:start + self.local_batch_size]

    def _write_records(self, k: int, rollout: Rollout, targets: Advantages, scores: torch.Tensor | None,
                       keep: torch.Tensor) -> None:
        """records/round_XXXX.parquet: every sample of the round with its reward, last-token advantage,
        influence score (NaN when not scored) and whether the update kept it."""
        rows = torch.arange(len(rollout), device=rollout.scores.device)
        last_advantage = targets.advantages[rows, ppo.last_token_index(rollout.response_mask)]
        local = [{"prompt": rollout.prompts[i], "response": rollout.responses[i],
                  "reward": rollout.scores[i].item(), "advantage": last_advantage[i].item(),
                  "score": scores[i].item() if scores is not None else math.nan, "kept": bool(keep[i])}
                 for i in range(len(rollout))]
        records = gather_object(local)
        if self.accelerator.is_main_process:
            write_parquet(self.output_dir / "records" / f"round_{k:04d}.parquet", records)

    def _start_outputs(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / "recipe.yaml", yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        atomic_write_text(self.output_dir / "environment.json", json.dumps(environment(self.accelerator), indent=2))
        for name in ("metrics.jsonl", "timings.jsonl", "samples.jsonl"):
            atomic_write_text(self.output_dir / name, "")

    def _phase(self, name: str) -> None:
        """Show the round's current phase beside the progress bar's rounds and ETA."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name} · {self._last_postfix}" if self._last_postfix else name)

    def _log_samples(self, k: int, rollout: Rollout) -> None:
        if not self.accelerator.is_main_process:
            return
        for i in range(min(self.recipe.run.log_samples, len(rollout))):
            append_jsonl(self.output_dir / "samples.jsonl", {
                "round": k, "prompt": rollout.prompts[i], "response": rollout.responses[i],
                "reward": rollout.scores[i].item()})


class _FinishRoundOnSignal:
    """While active, SIGINT and SIGTERM only set ``received`` (the signal's name), so the trainer can finish
    its round and save. A second signal acts as usual (stops at once)."""

    def __enter__(self):
        self.received, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing this round, then saving a checkpoint (send it again to stop now)",
                       self.received)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def rows_finite(mask: torch.Tensor, *per_token: torch.Tensor) -> torch.Tensor:
    """[B] True where every [B, T] tensor of ``per_token`` is finite at the positions ``mask`` marks."""
    ok = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    for values in per_token:
        ok &= torch.where(mask.bool(), values, 0.0).isfinite().all(dim=1)
    return ok


def _recipe_changes(a: Recipe, b: Recipe) -> set[str]:
    """The ``section.key`` names whose values differ between two recipes."""
    da, db = a.to_dict(), b.to_dict()
    return {f"{section}.{key}" for section in da for key in da[section]
            if da[section][key] != db[section][key]}


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The Accelerator for ``recipe``: its ``run.mixed_precision`` overrides the `accelerate launch` setting."""
    if recipe.run.mixed_precision is None:
        return Accelerator()
    return Accelerator(mixed_precision=recipe.run.mixed_precision)


def check_distributed_support(accelerator: Accelerator, recipe: Recipe) -> None:
    """Influence scoring reads every LoRA weight whole on every process; ZeRO-3 and FSDP shard them, which
    would give wrong scores, so that combination is refused. Standard PPO and random filtering run."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    sharded = (accelerator.distributed_type == DistributedType.FSDP
               or (plugin is not None and plugin.zero_stage == 3))
    if sharded and recipe.iif.enabled and recipe.iif.mode != "random":
        raise UserError("iif.enabled: influence scoring needs whole LoRA weights on every process, and this "
                        "launch shards them (DeepSpeed ZeRO-3 or FSDP); use DDP or ZeRO-2 "
                        "(recipes/accelerate/multi_gpu.yaml, deepspeed_zero2.yaml), or iif.mode: random")


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped as ``like``'s values, in its key order."""
    parts = flat.split([t.numel() for t in like.values()])
    return {name: part.view_as(t) for (name, t), part in zip(like.items(), parts)}


NONFINITE_KINDS = ("reward", "policy", "advantage", "score", "grad_steps")
_UPDATE_STATS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl")

