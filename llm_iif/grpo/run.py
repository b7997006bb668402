"""`llm-iif train` for a GRPO recipe: the recipe mapped onto trl's GRPOConfig and an `IIFGRPOTrainer`, on the
run infrastructure the PPO trainer uses.

The run directory has the PPO run's layout (`llm_iif.runs.paths.RunPaths`), written by the same `RunOutputs`:
recipe.yaml, environment.json, metrics.jsonl (one line per optimiser step; ``round`` = step − 1),
timings.jsonl, samples.jsonl, records/round_XXXX.parquet (every completion of the generation batch sampled at
that step, with reward, advantage, influence and whether it was kept), tensorboard/, reward_curve.png,
report.html and final/. Checkpoints are trl's ``checkpoint-N/`` plus ``iif_state.pt`` and a ``manifest.json``
written last (`llm_iif.runs.state`), so ``--resume`` continues exactly and damage is caught.

Only the main process writes; every process evaluates its share of the held-out rows (`HeldOutEvaluation`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llm_iif.recipes import GRPORecipe, GRPORewardModel
from llm_iif.core.errors import UserError, damaged_weight_files, first_line
from llm_iif.core.imports import import_object
from llm_iif.core.fileio import write_directory_atomically
from llm_iif.runs.paths import RunPaths
from llm_iif.grpo.data import check_chat_template, grpo_datasets, is_conversational
from llm_iif.grpo.groups import GroupFilter
from llm_iif.grpo.trainer import IIFGRPOTrainer
from llm_iif.grpo.trusted import TrustedSet
from llm_iif.lm.data import check_tokenizable, read_trusted_triples
from llm_iif.lm.policy import load_tokenizer
from llm_iif.runs import state as run_state
from llm_iif.models.builtins import resolve_builtin, resolve_reward_config
from reward_models import load_reward_model
from llm_iif.runs.outputs import (RunOutputs, check_trackers_installed, check_writable_directory,
                                         claim_run_directory)
from llm_iif.runs.signals import FinishOnSignal
from llm_iif.grpo.callbacks import CheckpointsAndSignals, HeldOutEvaluation, StepProgress, ends_generation_batch


@dataclass
class GRPORunResult:
    history: list[dict]          # one entry per optimiser step of the whole run, resumed steps included
    stopped_by: str | None       # the signal that stopped the run early, else None
    checkpoint: Path | None      # where a stopped run saved
    already_finished: bool = False  # resume_from had completed every step: nothing was loaded or trained


def train_grpo(recipe: GRPORecipe, overwrite: bool = False, resume_from: Path | None = None,
               on_loaded: Callable[[], None] | None = None) -> GRPORunResult:
    """Train ``recipe`` into ``run.output_dir``, or continue the run there from its checkpoint ``resume_from``.

    1. check the run directory (nothing is written yet; a ``resume_from`` that completed every step returns at
    once, ``already_finished``); 2. load the model, data, rewards and trainer, which
    validates the recipe, then call ``on_loaded`` (a comparison deletes its earlier outputs then); 3. only then
    delete an earlier run's outputs (``overwrite``) or rewind the files of a resumed one; 4. train with trl,
    stopping at the next generation batch's end on SIGINT/SIGTERM, the last one's too
    (`llm_iif.runs.signals`); 5. save final/.
    """
    paths = RunPaths(recipe.run.output_dir)
    # 1. Check: every process refuses alike, before anything slow (a caller with on_loaded, a comparison, has
    # checked the folder itself and empties it in on_loaded: nothing may be written there before).
    args = grpo_config(recipe, paths)  # which also sets up this launch's processes: args.world_size
    if resume_from is not None:
        check_writable_directory(paths.root)
        if run_state.finished(resume_from, recipe):  # e.g. a requeued job whose run had already finished
            return GRPORunResult([], None, resume_from, already_finished=True)
        completed = run_state.check_resumable(resume_from, paths, recipe, args.world_size)
        run_state.check_grpo_pickles(resume_from)
    elif on_loaded is None:
        claim_run_directory(paths, overwrite)
    # 2. Load.
    model_dir = resolve_builtin(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    damaged = damaged_weight_files(model_dir)  # trl loads the model itself, and would show a traceback
    if damaged:
        raise UserError(f"model.name_or_path: cannot load '{recipe.model.name_or_path}' as a causal LM "
                        f"({', '.join(damaged)}: damaged or truncated)")
    if recipe.data.system_prompt is not None and not tokenizer.chat_template:
        raise UserError(f"data.system_prompt: the tokenizer of '{recipe.model.name_or_path}' has no chat template "
                        "to put a system turn in (expected a model whose tokenizer has one, or no "
                        "data.system_prompt)")
    train, validation, evaluation = grpo_datasets(recipe.data, recipe.model.chat_template)
    trusted = trusted_set(recipe, tokenizer)
    check_chat_template(tokenizer, recipe.model.chat_template or is_conversational(train), str(model_dir))
    reward_funcs = reward_functions(recipe)
    check_trackers_installed(recipe.run.report_to)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.tensorboard)  # transformers 5 reads it from here only
    try:
        trainer = IIFGRPOTrainer(
            model=model_dir, reward_funcs=reward_funcs, args=args, train_dataset=train,
            processing_class=tokenizer, peft_config=peft_config(recipe),
            iif=recipe.iif if recipe.iif.enabled else None, group_filter=group_filter(recipe),
            validation_dataset=validation, nonfinite_patience=recipe.run.nonfinite_patience, trusted=trusted)
    except ValueError as err:
        if "target modules" in str(err).lower():  # peft found no layer to adapt
            raise UserError(f"lora.target_modules: {recipe.lora.target_modules} match no layer of "
                            f"'{recipe.model.name_or_path}' ({first_line(err)})") from err
        raise
    check_save_every(recipe, trainer)
    if on_loaded is not None:
        on_loaded()
    # 3. Outputs: a new run's files, or a resumed run's files as they were at its checkpoint.
    outputs = RunOutputs(paths, recipe, trainer.accelerator)
    history: list[dict] = []
    if resume_from is None:
        outputs.start(overwrite)
    else:
        history = paths.logged_history(completed)
        outputs.rewind(history)
        if trainer.accelerator.is_main_process:
            run_state.discard_checkpoints_after(paths.root, completed)
        trainer.accelerator.wait_for_everyone()
    evaluator = HeldOutEvaluation(evaluation, reward_funcs, outputs, recipe, history)
    checkpoints = CheckpointsAndSignals(outputs, recipe)
    for callback in (evaluator, checkpoints):
        callback.trainer = trainer
        trainer.add_callback(callback)
    for printer in (ProgressCallback, PrinterCallback):  # the bar stays, without a dict of logs printed per step
        trainer.remove_callback(printer)
    trainer.add_callback(StepProgress)
    # 4. Train.
    progress = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepProgress))
    with FinishOnSignal() as signals:
        checkpoints.signals = signals
        try:
            # A run stopped by a signal in its last step has only final/ left to save; trl would train a step more.
            if resume_from is None or completed < recipe.run.steps:
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:  # an error (a reward function's, say) then starts on a line of its own, not after the bar
            progress.close()
        # 5. Save, unless a signal stopped the run; one during the save lets it finish, and stops the caller.
        if checkpoints.stopped_by is None:
            save_final(trainer, checkpoints, paths)
            checkpoints.stopped_by = signals.received_anywhere(trainer.accelerator)
    return GRPORunResult(evaluator.history, checkpoints.stopped_by, checkpoints.last_saved)


def bare_trainer(recipe: GRPORecipe, output_dir: Path, steps: int, trainer_class: type = IIFGRPOTrainer, **kwargs):
    """A trainer of ``recipe``'s model, LoRA, training data, reward functions and trl settings for ``steps``
    steps, writing into ``output_dir``, without a run's outputs, evaluation, trackers, progress bar or
    checkpoints: what the benchmarks time and probe.
    ``kwargs`` go to ``trainer_class`` (``iif=``, ``validation_dataset=``, ``callbacks=``, ...); an
    `IIFGRPOTrainer` also gets the recipe's trusted triples."""
    recipe.run.steps, recipe.run.report_to = steps, []
    recipe.grpo["disable_tqdm"] = True  # trl's per-step log lines would bury a benchmark's table
    model_dir = resolve_builtin(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_dir)
    train, _, _ = grpo_datasets(recipe.data)
    if issubclass(trainer_class, IIFGRPOTrainer):
        kwargs.setdefault("trusted", trusted_set(recipe, tokenizer))
    return trainer_class(model=model_dir, args=grpo_config(recipe, RunPaths(output_dir)), train_dataset=train,
                         reward_funcs=reward_functions(recipe), processing_class=tokenizer,
                         peft_config=peft_config(recipe), **kwargs)


def trusted_set(recipe: GRPORecipe, tokenizer) -> TrustedSet | None:
    """The recipe's trusted triples (`read_trusted_triples`), checked for characters ``tokenizer`` cannot read
    (a message-list prompt by its messages' text), or None without one (``trusted.source`` null)."""
    if recipe.trusted.source is None:
        return None
    triples = read_trusted_triples(recipe.trusted)
    prompts = [p if isinstance(p, str) else "".join(m["content"] for m in p) for p in triples["prompt"]]
    check_tokenizable({**triples, "prompt": prompts}, tokenizer, "trusted.source", recipe.trusted.source)
    return TrustedSet(triples, recipe.trusted)


def reward_functions(recipe: GRPORecipe) -> list:
    """The recipe's reward functions: imported, or a reward model loaded (on this process's device) and called as
    a trl reward function; `UserError` for a name that is not a function or a model that does not load."""
    from accelerate import PartialState

    funcs = []
    for name, entry in recipe.rewards.items():
        if isinstance(entry, GRPORewardModel):
            cfg = resolve_reward_config(entry, f"rewards.{name}")
            funcs.append(model_reward_function(name, load_reward_model(cfg, PartialState().device, f"rewards.{name}")))
            continue
        func = import_object(name, f"rewards.{name}")
        if not callable(func):
            raise UserError(f"rewards.{name}: is a {type(func).__name__}, not a function of (prompts, completions, "
                            "**columns)")
        funcs.append(func)
    return funcs


def model_reward_function(name: str, reward_model) -> Callable:
    """``reward_model`` (`reward_models.RewardModel`) as a trl reward function named ``name``: it scores each
    prompt (text or messages) with the completion's text (a conversational completion's last message)."""
    def reward(prompts, completions, **columns) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return reward_model(prompts, texts)

    reward.__name__ = name
    return reward


def grpo_config(recipe: GRPORecipe, paths: RunPaths):
    """trl's GRPOConfig: the run's own settings, and the recipe's ``grpo`` section for everything else (the
    fields the run section owns are refused in ``grpo``, see `RUN_OWNED_GRPO_FIELDS`)."""
    from trl import GRPOConfig

    run = recipe.run
    weights = [entry.weight if isinstance(entry, GRPORewardModel) else entry for entry in recipe.rewards.values()]
    settings = {"output_dir": str(paths.root), "max_steps": run.steps, "seed": run.seed, "reward_weights": weights,
                "logging_steps": 1,
                "save_strategy": "steps" if run.save_every else "no", "save_steps": run.save_every or 500,
                "save_total_limit": run.keep_last_n or None, "report_to": list(run.report_to),
                # trl's defaults suit GPUs: bf16 and gradient checkpointing only slow a CPU down.
                "use_cpu": not torch.cuda.is_available(), "bf16": torch.cuda.is_available(),
                "gradient_checkpointing": torch.cuda.is_available(), **recipe.grpo}
    check_field_types(GRPOConfig, recipe.grpo)
    if run.batch_size is not None:
        # the launch's process count, as accelerate launch and torchrun export it (the config sets the processes up)
        per_device = settings.get("per_device_train_batch_size", _default(GRPOConfig, "per_device_train_batch_size"))
        settings["gradient_accumulation_steps"] = accumulation_steps(run.batch_size, per_device,
                                                                     int(os.environ.get("WORLD_SIZE", "1")))
    try:
        return GRPOConfig(**settings)
    except TypeError as err:  # an unknown field, or a value of the wrong type
        raise UserError(f"grpo: {first_line(err)} (expected fields of trl's GRPOConfig)") from err
    except ValueError as err:
        raise UserError(f"grpo: {first_line(err)}") from err


def accumulation_steps(batch_size: int, per_device: int, processes: int) -> int:
    """trl's gradient_accumulation_steps for ``batch_size`` completions a step over ``processes`` processes of
    ``per_device`` completions per micro-batch; `UserError` when they do not divide it."""
    per_micro_batch = per_device * processes
    if batch_size % per_micro_batch:
        raise UserError(f"run.batch_size: {batch_size} completions a step do not divide over {processes} "
                        f"process(es) × grpo.per_device_train_batch_size {per_device}; expected a multiple of "
                        f"{per_micro_batch}")
    return batch_size // per_micro_batch


def _default(config_class, name: str):
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


def check_field_types(config_class, values: dict) -> None:
    """`UserError` for a ``grpo`` value whose GRPOConfig field is a plain number, flag or text of another type
    (trl would fail on it later, mid-training, with a traceback)."""
    plain = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}
    expected = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}
    fields = {f.name: str(getattr(f.type, "__name__", f.type)) for f in dataclasses.fields(config_class)}
    for key, value in values.items():
        kind = fields.get(key, "")
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if kind not in plain or (optional and value is None):
            continue
        if not isinstance(value, plain[kind]) or (kind != "bool" and isinstance(value, bool)):
            raise UserError(f"grpo.{key}: expected {expected[kind]}{' or null' if optional else ''}, got {value!r}")


def check_save_every(recipe: GRPORecipe, trainer: IIFGRPOTrainer) -> None:
    """A checkpoint must fall between generation batches: trl's buffered batch is not saved, so a resume from
    the middle of one would generate anew and part from an uninterrupted run."""
    if not ends_generation_batch(trainer, recipe.run.save_every):
        args = trainer.args
        raise UserError(f"run.save_every: {recipe.run.save_every} steps would save inside a generation batch; "
                        f"expected a multiple of the optimiser steps per batch, steps_per_generation × "
                        f"num_iterations / gradient_accumulation_steps = {args.steps_per_generation} × "
                        f"{trainer.num_iterations} / {args.gradient_accumulation_steps}")


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


def save_final(trainer: IIFGRPOTrainer, checkpoints: CheckpointsAndSignals, paths: RunPaths) -> None:
    """final/: trl's checkpoint of the last step (the adapter in HF format, optimiser, RNG, IIF state), so a
    finished run can be extended with ``--resume`` and ``--set run.steps=N``. A periodic checkpoint-N/ of the
    same step stays; otherwise the temporary one is removed."""
    step, save_every = checkpoints.recipe.run.steps, checkpoints.recipe.run.save_every
    checkpoint = paths.checkpoint(step)
    periodic = bool(save_every) and step % save_every == 0
    if not checkpoint.is_dir():  # with save_every, or when a signal stopped the last step, trl has saved it
        trainer._save_checkpoint(trainer.model, trial=None)
        checkpoints.write_manifest(step)
    if trainer.accelerator.is_main_process:
        write_directory_atomically(paths.final, lambda tmp: shutil.copytree(checkpoint, tmp, dirs_exist_ok=True))
        if not periodic:
            shutil.rmtree(checkpoint)
    trainer.accelerator.wait_for_everyone()
    checkpoints.last_saved = paths.final


def grpo_run_title(recipe: GRPORecipe) -> str:
    """The title of a GRPO run's figures: its model and first reward function."""
    return f"{recipe.model.name_or_path} · {next(iter(recipe.rewards)).split(':')[-1]}"
