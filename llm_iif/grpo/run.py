"""`llm-iif train` for a GRPO recipe: the recipe mapped onto trl's GRPOConfig and an `IIFGRPOTrainer`.

A run directory holds recipe.yaml, metrics.jsonl (one line per optimiser step), reward_curve.png,
tensorboard/ and final/ (the LoRA adapter in HF format). After every step, `HeldOutEvaluation` samples one
completion for each held-out prompt and scores it with every reward function; the first function's mean is
the step's ``reward_mean``, the curve `llm-iif compare` summarises. Its time is not counted in the step's.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

from llm_iif.core.config import GRPODataConfig, GRPORecipe
from llm_iif.core.errors import UserError, first_line
from llm_iif.core.fileio import append_jsonl, atomic_write_text
from llm_iif.core.imports import import_object
from llm_iif.core.paths import RunPaths
from llm_iif.grpo.trainer import GroupFilter, IIFGRPOTrainer
from llm_iif.lm.addition import addition_problems
from llm_iif.lm.policy import load_tokenizer
from llm_iif.training.builtins import resolve_builtin
from llm_iif.training.run_outputs import claim_run_directory, delete_outputs

BUILTIN_ADDITION = "builtin:addition"
# Seeds of the generated problem sets: the same problems for every run seed, disjoint draws per split.
ADDITION_SEEDS = {"train": 1, "validation": 2, "eval": 3}


def train_grpo(recipe: GRPORecipe, overwrite: bool = False) -> list[dict]:
    """Train ``recipe`` into ``run.output_dir``; returns the per-step metrics (also in metrics.jsonl)."""
    paths = RunPaths(recipe.run.output_dir)
    delete_outputs(claim_run_directory(paths, overwrite))
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.recipe, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    model_dir = resolve_builtin(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    train, validation, evaluation = grpo_datasets(recipe.data)
    reward_funcs = [import_object(name, f"rewards.{name}") for name in recipe.rewards]
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.tensorboard)  # transformers 5 reads it from here only
    evaluator = HeldOutEvaluation(evaluation, reward_funcs, tokenizer, paths)
    trainer = IIFGRPOTrainer(
        model=model_dir, reward_funcs=reward_funcs, args=grpo_config(recipe, paths), train_dataset=train,
        processing_class=tokenizer, peft_config=peft_config(recipe), callbacks=[evaluator],
        iif=recipe.iif if recipe.iif.enabled else None, group_filter=group_filter(recipe),
        validation_dataset=validation, nonfinite_patience=recipe.run.nonfinite_patience)
    evaluator.trainer = trainer
    trainer.train()
    trainer.save_model(str(paths.final))
    trainer.accelerator.end_training()
    return evaluator.history


def grpo_config(recipe: GRPORecipe, paths: RunPaths):
    """trl's GRPOConfig: the recipe's ``grpo`` section as given, over the run's own settings."""
    from trl import GRPOConfig

    settings = {"output_dir": str(paths.root), "max_steps": recipe.run.steps, "seed": recipe.run.seed,
                "reward_weights": list(recipe.rewards.values()), "logging_steps": 1, "save_strategy": "no",
                "report_to": list(recipe.run.report_to),
                # trl's defaults suit GPUs: bf16 and gradient checkpointing only slow a CPU down.
                "use_cpu": not torch.cuda.is_available(), "bf16": torch.cuda.is_available(),
                "gradient_checkpointing": torch.cuda.is_available()}
    settings.update(recipe.grpo)
    try:
        return GRPOConfig(**settings)
    except TypeError as err:  # an unknown field
        raise UserError(f"grpo: {first_line(err)} (expected fields of trl's GRPOConfig)") from err
    except ValueError as err:
        raise UserError(f"grpo: {first_line(err)}") from err


def peft_config(recipe: GRPORecipe):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def group_filter(recipe: GRPORecipe) -> GroupFilter | None:
    cfg = recipe.group_filter
    if cfg.kind is None:
        return None
    return GroupFilter(cfg.kind, cfg.refill, cfg.max_refill_batches, cfg.keep_per_group)


def grpo_datasets(data: GRPODataConfig):
    """(train, validation, evaluation) `datasets.Dataset`s with a ``prompt`` column: generated problems for
    ``builtin:addition``; otherwise a local file's rows, whose last validation_size + eval_size rows are
    held out."""
    from datasets import Dataset

    if data.source == BUILTIN_ADDITION:
        sizes = {"train": data.train_size, "validation": data.validation_size, "eval": data.eval_size}
        return tuple(Dataset.from_list(addition_problems(sizes[split], ADDITION_SEEDS[split]))
                     for split in ("train", "validation", "eval"))
    rows = _local_rows(data)
    held_out = data.validation_size + data.eval_size
    if len(rows) <= held_out:
        raise UserError(f"data.source: {data.source} has {len(rows)} rows; expected more than "
                        f"data.validation_size + data.eval_size = {held_out}")
    train, validation = rows[:-held_out], rows[-held_out:-data.eval_size]
    return Dataset.from_list(train), Dataset.from_list(validation), Dataset.from_list(rows[-data.eval_size:])


def _local_rows(data: GRPODataConfig) -> list[dict]:
    from datasets import load_dataset

    path = Path(data.source)
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if not path.is_file() or path.suffix not in kinds:
        raise UserError(f"data.source: expected {BUILTIN_ADDITION} or a local .json/.jsonl/.parquet file, "
                        f"got {data.source!r}")
    try:
        rows = load_dataset(kinds[path.suffix], data_files=str(path), split="train").to_list()
    except Exception as err:  # datasets raises many types for unreadable files
        raise UserError(f"data.source: cannot read {path} ({first_line(err)})") from err
    if not rows or data.prompt_column not in rows[0]:
        raise UserError(f"data.prompt_column: {path} has no column '{data.prompt_column}'")
    return [{**row, "prompt": row[data.prompt_column]} for row in rows]


class HeldOutEvaluation(TrainerCallback):
    """After every optimiser step: the step's wall time (generation, filtering and update), the held-out
    rewards, and KL(π ‖ π_ref) per completion; one metrics.jsonl line per step, with trl's logged metrics."""

    def __init__(self, rows, reward_funcs: list, tokenizer, paths: RunPaths, seed: int = 0):
        self.rows, self.reward_funcs, self.tokenizer, self.paths, self.seed = rows, reward_funcs, tokenizer, paths, seed
        self.trainer: IIFGRPOTrainer | None = None
        self.history: list[dict] = []
        self._step_start, self._pending = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._step_start
        self._pending = {"round": state.global_step - 1, "step": state.global_step, "time_round_s": seconds,
                         **self.evaluate()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or "loss" not in (logs or {}):
            return
        entry, self._pending = self._pending, None
        entry["train_reward"] = logs.get("reward", float("nan"))
        entry["kept_fraction"] = logs.get("iif/kept_fraction", 1.0)
        entry.update({key[len("iif/"):]: value for key, value in logs.items() if key.startswith("iif/")})
        self.history.append(entry)
        if state.is_world_process_zero:
            append_jsonl(self.paths.metrics, entry)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out means of every reward function (``eval/<name>``; the first is ``reward_mean``) and KL."""
        trainer = self.trainer
        model = trainer.model
        was_training = model.training
        model.eval()
        prompts = list(self.rows["prompt"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # every evaluation samples alike, so steps and methods compare
            encoded = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
            encoded = encoded.to(trainer.accelerator.device)
            out = model.generate(**encoded, max_new_tokens=trainer.max_completion_length, do_sample=True,
                                 temperature=trainer.temperature, top_k=0, top_p=1.0,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        completion_ids = out[:, encoded["input_ids"].shape[1]:]
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        columns = {k: list(self.rows[k]) for k in self.rows.column_names if k != "prompt"}
        metrics = {}
        for func in self.reward_funcs:
            rewards = [r for r in func(prompts=prompts, completions=completions, **columns) if r is not None]
            mean = sum(rewards) / max(len(rewards), 1)
            metrics[f"eval/{getattr(func, '__name__', 'reward')}"] = mean
            if "reward_mean" not in metrics:  # the first reward function is the run's curve
                metrics["reward_mean"] = mean
                metrics["reward_std"] = statistics.pstdev(rewards) if rewards else 0.0
        metrics["kl"] = self._kl(encoded, completion_ids)
        model.train(was_training)
        return metrics

    def _kl(self, encoded, completion_ids) -> float:
        """Mean Σ_t log π(y_t) - log π_ref(y_t) over the sampled completions (π_ref: adapters disabled)."""
        trainer = self.trainer
        eos = self.tokenizer.eos_token_id
        # Tokens up to and including the first EOS count; generate pads the rest.
        ended = (completion_ids == eos).int().cumsum(dim=1)
        mask = ((ended == 0) | ((ended == 1) & (completion_ids == eos))).long()
        ids = torch.cat([encoded["input_ids"], completion_ids], dim=1)
        attention = torch.cat([encoded["attention_mask"], mask], dim=1)
        model = trainer.accelerator.unwrap_model(trainer.model)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, completion_ids.shape[1])
        with model.disable_adapter():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, completion_ids.shape[1])
        return ((logps - ref) * mask).sum(dim=1).mean().item()


def grpo_run_title(recipe: GRPORecipe) -> str:
    """The title of a GRPO run's figures: its model and first reward function."""
    return f"{recipe.model.name_or_path} · {next(iter(recipe.rewards)).split(':')[-1]}"
