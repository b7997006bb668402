"""The per-step cost of IIFGRPOTrainer against trl's own GRPOTrainer, measured side by side.

    .venv/bin/python benchmarks/grpo_step_cost.py [--recipe recipes/tiny-addition-grpo.yaml] [--steps 8]
        [--repeats 3] [--methods grpo,iif-batch,iif-batch-in-run]

Methods: ``grpo`` (trl's GRPOTrainer class itself), ``iif-batch`` and ``iif-fresh`` (IIFGRPOTrainer with
each target source and a separate scoring pass), ``iif-batch-in-run`` and ``iif-fresh-in-run`` (the same with
``iif.scoring: in-run``). IIF runs alone, without the recipe's group filter. Every block builds one trainer
from the recipe (same model, seed and data, so the first generation batch is the same for all) and trains
``--steps`` steps; blocks alternate between the methods ``--repeats`` times, so that a slowdown of the machine
part-way hits all alike. The first step of a block is a warm-up and is not counted. Prints, per method, the
median seconds per step and its ratio to grpo's, and where a step's time goes (medians): generating (trl's
`_generate_single_turn`: sampling the completions, and the fresh target's), the filter's own time
(``iif/time_filter_s``: the scoring pass, or in-run the target, the scores from the kept gradients and the
correction) and the rest (rewards, log-probs, the update's forward and backward, in-run with its hooks, and the
optimiser step). A fresh target's generation counts both in generating and in the filter's time, so its rest
reads low.

Then an estimate, not a measurement, of the same ratios on a GPU where generation (vLLM) takes a share g of a
GRPO step: IIF's extra time over grpo's, less any change in generating, as a multiple of grpo's time outside
generation, is assumed to stay that multiple, so a step costs 1 + (1 − g) × multiple of grpo's. g = 0.72 is
Qwen2.5-0.5B GRPO with 1,024-token completions (verl issue 6747: 31.3 of 43.6 s); g = 0.90 is OpenRLHF's figure
for long reasoning chains, as for a 7B model.
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

from llm_iif.recipes import GRPORecipe, load_recipe
from llm_iif.grpo.run import bare_trainer, grpo_datasets

REPO = Path(__file__).resolve().parents[1]
GPU_GENERATION_SHARES = {"0.5B, g 0.72": 0.72, "7B, g 0.90": 0.90}
METHODS = ("grpo", "iif-batch", "iif-batch-in-run", "iif-fresh", "iif-fresh-in-run")


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
    times = StepTimes()
    if method == "grpo":
        trainer = bare_trainer(recipe, out, steps, GRPOTrainer, callbacks=[times])
    else:
        recipe.iif.enabled, recipe.iif.target_source = True, method.split("-")[1]
        recipe.iif.scoring = "in-run" if method.endswith("in-run") else "separate"
        _, validation, _ = grpo_datasets(recipe.data)
        trainer = bare_trainer(recipe, out, steps, iif=recipe.iif, validation_dataset=validation,
                               callbacks=[times])
    trainer._generate_single_turn = times.timed(trainer._generate_single_turn)
    trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-addition-grpo.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="grpo,iif-batch,iif-batch-in-run",
                        help=f"comma-separated, of {', '.join(METHODS)}; grpo first")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "grpo" or not set(methods) <= set(METHODS):
        parser.error(f"--methods: {args.methods}; expected grpo first, then any of {', '.join(METHODS[1:])}")
    step_seconds = {m: [] for m in methods}
    filter_seconds = {m: [] for m in methods}
    generation_seconds = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for method in methods:
                recipe = load_recipe(args.recipe, args.overrides, kind=GRPORecipe)
                times = run_block(recipe, method, args.steps, Path(tmp) / f"{method}-{repeat}")
                step_seconds[method] += times.seconds[1:]
                filter_seconds[method] += times.filter_seconds[1:]
                generation_seconds[method] += times.generation_seconds[1:]
                print(f"repeat {repeat} {method}: median step {statistics.median(times.seconds[1:]):.3f} s", flush=True)
    base = statistics.median(step_seconds["grpo"])
    print(f"\n{Path(args.recipe).name}: {args.repeats} × {args.steps - 1} steps per method; seconds are medians")
    print(f"{'method':<18} {'s/step':>8} {'× grpo':>7} {'generating':>11} {'filter':>8} {'rest':>8}")
    for method in methods:
        median = statistics.median(step_seconds[method])
        generating = statistics.median(generation_seconds[method])
        filtering = statistics.median(filter_seconds[method]) if filter_seconds[method] else 0.0
        print(f"{method:<18} {median:>8.3f} {median / base:>7.2f} {generating:>11.3f} {filtering:>8.3f} "
              f"{median - generating - filtering:>8.3f}")
    base_generating = statistics.median(generation_seconds["grpo"])
    print(f"\nestimated × grpo on a GPU (not measured; see the docstring)")
    print(f"{'method':<18} {'multiple':>9}" + "".join(f"{name:>14}" for name in GPU_GENERATION_SHARES))
    for method in methods[1:]:
        extra = (statistics.median(step_seconds[method]) - base
                 - (statistics.median(generation_seconds[method]) - base_generating))
        multiple = extra / (base - base_generating)
        print(f"{method:<18} {multiple:>9.2f}"
              + "".join(f"{1 + (1 - share) * multiple:>14.2f}" for share in GPU_GENERATION_SHARES.values()))


if __name__ == "__main__":
    main()
