"""The callbacks of a GRPO run (`llm_iif.grpo.run.train_grpo`): held-out evaluation and the step's metrics line
(`HeldOutEvaluation`), checkpoint manifests and a clean stop at a generation batch's end
(`CheckpointsAndSignals`), and the progress bar (`StepProgress`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from llm_iif.core.errors import UserError, first_line
from llm_iif.grpo.trainer import IIFGRPOTrainer
from llm_iif.recipes import GRPORecipe
from llm_iif.runs import state as run_state
from llm_iif.runs.outputs import RunOutputs
from llm_iif.runs.signals import FinishOnSignal


class StepProgress(ProgressCallback):
    """transformers' progress bar over the steps; metrics go to metrics.jsonl and the trackers, not the terminal."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass

    def close(self) -> None:
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class CheckpointsAndSignals(TrainerCallback):
    """Writes each trl checkpoint's manifest once every process has saved its part, and stops the run cleanly
    on SIGINT/SIGTERM: at the end of the current generation batch, after saving a checkpoint there."""

    def __init__(self, outputs: RunOutputs, recipe: GRPORecipe):
        self.outputs, self.recipe = outputs, recipe
        self.trainer: IIFGRPOTrainer | None = None
        self.signals: FinishOnSignal | None = None
        self.stopped_by: str | None = None
        self.last_saved: Path | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if not ends_generation_batch(self.trainer, state.global_step):
            return
        self.stopped_by = self.signals.received_anywhere(self.trainer.accelerator)
        if self.stopped_by:  # in the last batch too: the checkpoint is saved here, final/ when the run resumes
            control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.write_manifest(state.global_step)

    def write_manifest(self, step: int) -> None:
        """Every process has written its files (trl saves RNG states per process); the main one lists them."""
        acc = self.trainer.accelerator
        acc.wait_for_everyone()
        checkpoint = self.outputs.paths.checkpoint(step)
        if acc.is_main_process:
            run_state.write_manifest(checkpoint, {"steps_completed": step, "num_processes": acc.num_processes,
                                                  "base_model": self.recipe.model.name_or_path},
                                     run_state.TRL_MANIFEST_FILE)
        acc.wait_for_everyone()
        self.last_saved = checkpoint


class HeldOutEvaluation(TrainerCallback):
    """After every ``run.eval_every`` steps (and the last): every reward function's mean over the held-out rows
    and KL(π ‖ π_ref), each process generating for its share of the rows. One metrics.jsonl line per step with
    trl's logged metrics (the filter's, without their ``iif/``; each reward function's ``rewards/<name>/mean`` on
    the training batch; ``trusted/margin``, ``trusted/accuracy`` and ``dpo_loss`` with a trusted set) and the
    step's wall time; the evaluation's time and the trusted margin's are logged apart (``time_eval_s``,
    ``time_trusted_s``), as measurements outside ``time_round_s``."""

    def __init__(self, rows, reward_funcs: list, outputs: RunOutputs, recipe: GRPORecipe, history: list[dict]):
        self.rows, self.reward_funcs, self.outputs, self.run = rows, reward_funcs, outputs, recipe.run
        self.trainer: IIFGRPOTrainer | None = None
        self.history = list(history)
        self._step_start, self._pending = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._step_start
        k = state.global_step - 1
        self._pending = {"round": k, "step": state.global_step, "time_round_s": seconds}
        trainer = self.trainer
        if trainer.generation_records:  # a generation batch was sampled for this step
            self.outputs.write_record_rows(k, trainer.generation_records)
            self.outputs.log_sample_rows(k, trainer.generation_records)
            trainer.generation_records = []
        every = self.run.eval_every
        if every and (state.global_step % every == 0 or state.global_step == state.max_steps):
            start = time.perf_counter()
            self._pending.update(self.evaluate())
            self._pending["time_eval_s"] = time.perf_counter() - start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or "loss" not in (logs or {}):
            return
        entry, self._pending = self._pending, None
        entry["train_reward"] = logs.get("reward", math.nan)
        entry["kept_fraction"] = logs.get("iif/kept_fraction", 1.0)
        if "entropy" in logs:
            entry["entropy"] = logs["entropy"]
        entry.update({key[len("iif/"):]: value for key, value in logs.items() if key.startswith("iif/")})
        entry.update({key: value for key, value in logs.items()  # rewards/<name>/mean: on the training batch
                      if key.startswith(("trusted/", "rewards/")) or key in ("dpo_loss", "time_trusted_s")})
        entry["time_round_s"] -= entry.get("time_trusted_s", 0.0)
        self.history.append(entry)
        self.outputs.log_round(entry["round"], entry)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out means of every reward function (``eval/<name>``; the first is ``reward_mean``) and KL, over
        every process's share of the rows."""
        trainer = self.trainer
        acc = trainer.accelerator
        model = acc.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        share = self.rows.shard(num_shards=acc.num_processes, index=acc.process_index, contiguous=True)
        names = [getattr(func, "__name__", f"reward_{i}") for i, func in enumerate(self.reward_funcs)]
        # Per function: Σ reward, Σ reward², count; then Σ KL and the number of completions.
        totals = torch.zeros(3 * len(names) + 2, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.run.seed + acc.process_index)  # every evaluation samples alike
            for start in range(0, len(share), self.run.eval_batch_size):
                totals += self._evaluate_batch(share.select(range(start, min(start + self.run.eval_batch_size,
                                                                                len(share)))), names)
        model.train(was_training)
        totals = acc.reduce(totals.to(acc.device), "sum").cpu()
        metrics = {}
        for i, name in enumerate(names):
            total, squares, count = totals[3 * i:3 * i + 3].tolist()
            if count == 0 and i == 0:  # the run's curve: without it there is nothing to measure
                raise UserError(f"rewards.{name}: returned no finite reward for any of the {len(self.rows)} "
                                "held-out completions")
            mean = total / count if count else math.nan  # written as null
            metrics[f"eval/{name}"] = mean
            if i == 0:  # the first reward function is the run's curve
                metrics["reward_mean"] = mean
                metrics["reward_std"] = math.sqrt(max(squares / count - mean * mean, 0.0))
        metrics["kl"] = totals[-2].item() / max(totals[-1].item(), 1.0)
        metrics["eval_completions"] = int(totals[-1].item())  # over all processes: each row exactly once
        return metrics

    def _evaluate_batch(self, rows, names: list[str]) -> torch.Tensor:
        """[3F + 2] this batch's sums (see `evaluate`)."""
        from trl.data_utils import maybe_apply_chat_template

        trainer, tokenizer = self.trainer, self.trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompts = list(rows["prompt"])
        texts = [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]
        encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                            add_special_tokens=False).to(trainer.accelerator.device)
        sampled = self.run.eval_decoding == "sampled"
        out = model.generate(**encoded, max_new_tokens=trainer.max_completion_length, do_sample=sampled,
                             **({"temperature": trainer.temperature, "top_k": 0, "top_p": 1.0} if sampled else {}),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completion_ids = out[:, encoded["input_ids"].shape[1]:]
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        if prompts and isinstance(prompts[0], list):  # conversational: trl hands rewards assistant messages
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        columns = {k: list(rows[k]) for k in rows.column_names if k != "prompt"}
        sums = []
        for name, func in zip(names, self.reward_funcs):
            try:
                rewards = func(prompts=prompts, completions=completions, **columns)
            except Exception as err:  # a user's reward function: name it, in one line
                raise UserError(f"rewards.{name}: raised {type(err).__name__} on held-out completions "
                                f"({first_line(err)})") from err
            values = [float(r) for r in rewards if r is not None and math.isfinite(r)]
            sums += [sum(values), sum(v * v for v in values), len(values)]
        kl = self._kl(encoded, completion_ids)
        return torch.tensor([*sums, kl.sum().item(), len(kl)], dtype=torch.float64)

    def _kl(self, encoded, completion_ids) -> torch.Tensor:
        """[b] Σ_t log π(y_t) − log π_ref(y_t) of each completion (π_ref: adapters disabled)."""
        trainer = self.trainer
        eos = trainer.processing_class.eos_token_id
        # Tokens up to and including the first EOS count; generate pads the rest.
        ended = (completion_ids == eos).int().cumsum(dim=1)
        mask = ((ended == 0) | ((ended == 1) & (completion_ids == eos))).long()
        ids = torch.cat([encoded["input_ids"], completion_ids], dim=1)
        attention = torch.cat([encoded["attention_mask"], mask], dim=1)
        model = trainer.accelerator.unwrap_model(trainer.model)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, completion_ids.shape[1])
        with model.disable_adapter():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, completion_ids.shape[1])
        return ((logps - ref) * mask).sum(dim=1)


def ends_generation_batch(trainer: IIFGRPOTrainer, step: int) -> bool:
    """Whether optimiser step ``step`` ends a generation batch. trl generates every steps_per_generation ×
    num_iterations micro-batches, and an optimiser step takes gradient_accumulation_steps of them."""
    args = trainer.args
    return step * args.gradient_accumulation_steps % (args.steps_per_generation * trainer.num_iterations) == 0
