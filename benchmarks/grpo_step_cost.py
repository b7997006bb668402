"""The per-step cost of IIFGRPOTrainer against trl's own GRPOTrainer, measured side by side.

    .venv/bin/python benchmarks/grpo_step_cost.py [--recipe recipes/tiny-addition-grpo.yaml] [--steps 8] [--repeats 3]

Methods: ``grpo`` (trl's GRPOTrainer class itself), ``iif-batch`` and ``iif-fresh`` (IIFGRPOTrainer with
each target source). Every block builds one trainer from the recipe (same model, seed and data, so the first
generation batch is the same for all) and trains ``--steps`` steps; blocks alternate between the methods
``--repeats`` times, so that a slowdown of the machine part-way hits all alike. The first step of a block is
a warm-up and is not counted. Prints the median seconds per step, the ratio to grpo's, the filter's own
median seconds (scoring, plus fresh validation generation), and the median share of a step spent generating
(trl's `_generate_single_turn`: sampling the completions, and the fresh target's).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback
from trl import GRPOTrainer

from llm_iif.core.config import GRPORecipe, load_recipe
from llm_iif.core.imports import import_object
from llm_iif.core.paths import RunPaths
from llm_iif.grpo import IIFGRPOTrainer
from llm_iif.grpo.run import grpo_config, grpo_datasets, peft_config
from llm_iif.lm.policy import load_tokenizer
from llm_iif.training.builtins import resolve_builtin

REPO = Path(__file__).resolve().parents[1]
METHODS = ("grpo", "iif-batch", "iif-fresh")


class StepTimes(TrainerCallback):
    def __init__(self):
        self.seconds, self.filter_seconds, self.generation_seconds = [], [], []
        self._start, self._generating = 0.0, 0.0

    def timed(self, generate):
        """``generate`` (a trainer's generation method), adding its seconds to the current step's."""
        @functools.wraps(generate)
        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating += time.perf_counter() - start
        return timed_generate

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._generating = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.generation_seconds.append(self._generating)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "iif/time_filter_s" in logs:
            self.filter_seconds.append(logs["iif/time_filter_s"])


def run_block(recipe: GRPORecipe, method: str, steps: int, out: Path) -> StepTimes:
    model_dir = resolve_builtin(recipe.model.name_or_path)
    recipe.run.steps, recipe.run.report_to = steps, []
    recipe.grpo["disable_tqdm"] = True  # trl's per-step log lines would bury the table
    train, validation, _ = grpo_datasets(recipe.data)
    times = StepTimes()
    common = dict(model=model_dir, reward_funcs=[import_object(n, f"rewards.{n}") for n in recipe.rewards],
                  args=grpo_config(recipe, RunPaths(out)), train_dataset=train, processing_class=load_tokenizer(model_dir),
                  peft_config=peft_config(recipe), callbacks=[times])
    if method == "grpo":
        trainer = GRPOTrainer(**common)
    else:
        recipe.iif.enabled, recipe.iif.target_source = True, method.removeprefix("iif-")
        trainer = IIFGRPOTrainer(**common, iif=recipe.iif, validation_dataset=validation)
    trainer._generate_single_turn = times.timed(trainer._generate_single_turn)
    trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-addition-grpo.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    step_seconds = {m: [] for m in METHODS}
    filter_seconds = {m: [] for m in METHODS}
    generation_shares = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for method in METHODS:
                recipe = load_recipe(args.recipe, args.overrides, kind=GRPORecipe)
                times = run_block(recipe, method, args.steps, Path(tmp) / f"{method}-{repeat}")
                step_seconds[method] += times.seconds[1:]
                filter_seconds[method] += times.filter_seconds[1:]
                generation_shares[method] += [g / s for g, s in zip(times.generation_seconds[1:], times.seconds[1:])]
                print(f"repeat {repeat} {method}: median step {statistics.median(times.seconds[1:]):.3f} s", flush=True)
    base = statistics.median(step_seconds["grpo"])
    print(f"\n{'method':<10} {'s/step':>8} {'× grpo':>7} {'filter s':>9} {'generating':>10}   "
          f"({args.repeats} × {args.steps - 1} steps each)")
    for method in METHODS:
        median = statistics.median(step_seconds[method])
        filtering = f"{statistics.median(filter_seconds[method]):>9.3f}" if filter_seconds[method] else f"{'-':>9}"
        generating = statistics.median(generation_shares[method])
        print(f"{method:<10} {median:>8.3f} {median / base:>7.2f} {filtering} {generating:>10.0%}")


if __name__ == "__main__":
    main()
