"""Methods × seeds comparisons: `llm-iif compare` (LM recipes) and `llm-iif classic compare` (classic recipes).

Both train every (seed, method) pair with `run_grid` into ``GridPaths(OUTPUT_DIR).run(method, seed)``, then
write the comparison with `write_comparison`: summary.json (the paper's SE_ave / SE_peak / RT_peak, see
`llm_iif.analysis.summary`), reward_curves.png, influence.png (when the IIF runs kept records) and, for LM
runs, report.html.

Validate, then delete: the methods, seeds and every method's recipe are checked, and the directory claimed,
before the first run loads its model and data; an earlier comparison is deleted only once that run has loaded
(the ``ready`` of `TrainOne`), so a start that fails leaves the directory as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

from llm_iif.analysis.plots import plot_influence, plot_reward_curves, run_title, write_run_figures
from llm_iif.analysis.report import influence_by_round, picked_rounds, write_report
from llm_iif.analysis.summary import summarize
from llm_iif.recipes import (SEED_EXPECTED, TARGET_SOURCES, ClassicRecipe, GRPORecipe, Recipe, is_seed,
                                 load_recipe)
from llm_iif.core.distributed import accelerate_state_kept
from llm_iif.core.errors import UserError
from llm_iif.core.fileio import atomic_write_text
from llm_iif.runs.paths import GridPaths, RunPaths, check_inside
from llm_iif.runs.outputs import check_writable_directory, delete_outputs, listed

# `llm-iif compare`: the recipe overrides of each method.
LM_METHODS = {
    "standard": ["iif.enabled=false"],
    "iif": ["iif.enabled=true"],
    # Size-matched: each round drops as many samples as IIF would (p × the negative scores), chosen at random
    # from the whole batch; what IIF gains over it comes from which samples it drops, not how many.
    "random": ["iif.enabled=true", "iif.mode=matched-random"],
    # IIF with each target source, whatever the recipe chooses.
    **{f"iif-{source}": ["iif.enabled=true", f"iif.target_source={source}"] for source in TARGET_SOURCES},
    # IIF scoring with Adam's direction (`llm_iif.attribution.precondition`), whatever the recipe chooses.
    "iif-adam": ["iif.enabled=true", "iif.precondition=adam"],
}

# `llm-iif compare` on a GRPO recipe: plain GRPO is "standard", the baseline every summary compares against.
NO_FILTER = ["iif.enabled=false", "group_filter.kind=null"]
GRPO_METHODS = {
    "standard": NO_FILTER,
    "iif": ["iif.enabled=true", "group_filter.kind=null"],
    "random": ["iif.enabled=true", "iif.mode=matched-random", "group_filter.kind=null"],
    **{f"iif-{source}": ["iif.enabled=true", f"iif.target_source={source}", "group_filter.kind=null"]
       for source in ("fresh", "batch")},
    "dapo": [*NO_FILTER[:1], "group_filter.kind=dapo", "group_filter.refill=false"],
    "dapo-refill": [*NO_FILTER[:1], "group_filter.kind=dapo", "group_filter.refill=true"],
    "pods": [*NO_FILTER[:1], "group_filter.kind=pods"],
    "dapo-refill-iif": ["iif.enabled=true", "group_filter.kind=dapo", "group_filter.refill=true"],
}

# `llm-iif classic compare`: the (filter mode, p) of each method, given the recipe's ``iif`` section.
CLASSIC_METHODS = {
    "standard": lambda iif: ("none", 0.0),
    "iif": lambda iif: (iif.mode, iif.p),
    # Size-matched, as in `LM_METHODS`: each round drops as many transitions as neg-bottom would (p × the
    # negative scores), chosen at random from the whole buffer.
    "random": lambda iif: ("matched-random", iif.p),
}

# train_one(method, seed, run, ready): train one run into ``run``, calling ready() once its recipe, model and data
# have loaded and before it writes anything (the grid deletes an earlier comparison only then); returns its
# per-round metrics.
TrainOne = Callable[[str, int, RunPaths, Callable[[], None]], list[dict]]
# (recipe, accelerator) -> a PPO trainer whose train() returns the metrics of each round and which says what stopped
# it (`stopped_by`): `llm_iif.training.build_trainer`, passed in by the caller, so that analysis reaches into
# no trainer's package for it
BuildPPOTrainer = Callable[[Recipe, object], object]

# The reward axis of a comparison's curves, by kind of recipe (PPO's is write_comparison's default).
GRPO_CURVE = "held-out reward (first reward function)"
CLASSIC_CURVE = "test return (stochastic policy)"


def run_grid(table: Mapping[str, object], methods: list[str], seeds: list[int], output_dir: Path,
             train_one: TrainOne, overwrite: bool = False, main_process: bool = True
             ) -> dict[str, dict[int, list[dict]]]:
    """Train every pair of ``seeds`` × ``methods``, seed-major (all methods of the first seed, then the next
    seed), by calling ``train_one(method, seed, run, ready)`` with the pair's run directory ``run`` =
    ``GridPaths(output_dir).run(method, seed)``; returns {method: {seed: per-round metrics}}.

    table: the known methods (`LM_METHODS` or `CLASSIC_METHODS`); every one of ``methods`` must be in it.
    overwrite: delete an earlier comparison in ``output_dir`` (without it, one is an error); deleted when the
    first run calls ``ready``, with comparison.json written then.
    main_process: print a line naming each run before it starts, and delete (False on the other processes).
    """
    check_methods(methods, table)
    check_seeds(seeds, "--seeds")
    grid = GridPaths(output_dir)
    earlier = claim_comparison_directory(grid, methods, seeds, overwrite)

    def start() -> None:
        if main_process:
            delete_outputs(earlier, grid.root)
            atomic_write_text(grid.comparison, json.dumps({"methods": methods, "seeds": seeds}))

    started = once(start)
    histories: dict[str, dict[int, list[dict]]] = {m: {} for m in methods}
    for seed in seeds:
        for method in methods:
            run = grid.run(method, seed)
            if main_process:
                print(f"== {method}, seed {seed} -> {run.root}", flush=True)

            def ready() -> None:  # called by train_one, during this iteration
                started()
                check_inside(run.root, grid.root, "--output-dir")  # what the run writes stays in the comparison

            histories[method][seed] = train_one(method, seed, run, ready)
    return histories


def once(action: Callable[[], None]) -> Callable[[], None]:
    """``action`` as a function that runs it on its first call only."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            action()
    return call


def check_methods(methods: list[str], table: Mapping[str, object], key: str = "--methods") -> None:
    """`UserError` naming ``key`` unless ``methods`` are distinct, known methods of ``table``."""
    for method in methods:
        if method not in table:
            raise UserError(f"{key}: unknown method {method!r} (expected some of: {', '.join(table)})")
    repeated = next((method for i, method in enumerate(methods) if method in methods[:i]), None)
    if repeated is not None:
        raise UserError(f"{key}: {repeated} is given twice; each method runs once per seed")


def check_seeds(seeds: list[int], key: str) -> None:
    """`UserError` naming ``key`` unless ``seeds`` are distinct seeds a run accepts (`is_seed`)."""
    for seed in seeds:
        if not is_seed(seed):
            raise UserError(f"{key}: seed {seed} is out of range; expected {SEED_EXPECTED}")
    repeated = next((seed for i, seed in enumerate(seeds) if seed in seeds[:i]), None)
    if repeated is not None:
        raise UserError(f"{key}: seed {repeated} is given twice; each seed runs once per method")


def check_recipes(recipe_path: str | Path, overrides: list[str], methods: Mapping[str, list[str]], kind: type,
                  where: str) -> None:
    """Load the recipe with each method's overrides (``methods``: name -> overrides): a typo or a bad value
    fails now, in a second, with one line starting with ``where`` and the method, not after an earlier
    comparison is deleted or hours into a suite."""
    for method, method_overrides in methods.items():
        try:
            load_recipe(recipe_path, [*overrides, *method_overrides], kind=kind)
        except UserError as err:
            raise UserError(f"{where} ({method}): {err}") from None


def claim_comparison_directory(grid: GridPaths, methods: list[str], seeds: list[int], overwrite: bool) -> list[Path]:
    """Check that a new comparison of ``methods`` × ``seeds`` may write into ``grid.root`` (see
    `claim_run_directory`); returns what ``overwrite`` allows to be deleted: the earlier comparison's outputs,
    and whatever its run folders hold (the run outputs, or a symbolic link where a run folder goes). A file where
    a run folder goes is refused either way. Writes nothing but the directory itself."""
    check_writable_directory(grid.root, "--output-dir")
    planned = [grid.run(method, seed) for seed in seeds for method in methods]
    for run in planned:
        for folder in (run.root.parent, run.root):
            if folder.exists() and not folder.is_dir() and not folder.is_symlink():
                raise UserError(f"--output-dir: {folder} is a file, where the comparison puts the run folder "
                                f"{run.root.relative_to(grid.root)}; move it, or choose another directory")
    earlier = list(dict.fromkeys([*grid.outputs(), *(path for method in methods for seed in seeds
                                                     for path in grid.run_outputs(method, seed))]))
    if earlier and not overwrite:
        raise UserError(f"--output-dir: {grid.root} already holds a comparison ({listed(earlier, grid.root)}); "
                        "choose another directory, or start over with --overwrite, which deletes exactly those")
    return earlier


def write_comparison(output_dir: Path, histories: dict[str, dict[int, list[dict]]], ylabel: str = "mean reward",
                     report: bool = True) -> dict:
    """Write a comparison's summary.json, reward_curves.png (``ylabel`` on its reward axis), influence.png
    (when the first IIF run kept records) and, with ``report``, report.html; returns the summary."""
    grid = GridPaths(output_dir)
    grid.root.mkdir(parents=True, exist_ok=True)
    summary = summarize(histories)
    atomic_write_text(grid.summary, json.dumps(summary, indent=2))
    plot_reward_curves(summary, grid.reward_curves, ylabel=ylabel)
    if histories.get("iif"):
        seed = next(iter(histories["iif"]))
        run = grid.run("iif", seed)
        rounds = run.record_rounds()
        if rounds:  # LM runs keep records; classic runs do not
            kept = {f"seed {s}": ([m["round"] for m in history], [m["kept_fraction"] for m in history])
                    for s, history in histories["iif"].items()}
            plot_influence(influence_by_round(run, picked_rounds(rounds)), kept, grid.influence,
                           note=f"iif, seed {seed}")
    if report:
        write_report(grid.root)
    return summary


def lm_trainer(recipe_path: str, overrides: list[str], accelerator, build: BuildPPOTrainer,
               methods: Mapping[str, list[str]] = LM_METHODS) -> TrainOne:
    """A `TrainOne` for a PPO recipe: each of ``methods`` (name -> overrides) with the PPO trainer ``build``
    makes, each run with its reward_curve.png."""
    def train_one(method: str, seed: int, run: RunPaths, ready: Callable[[], None]) -> list[dict]:
        recipe = load_recipe(recipe_path, [*overrides, *methods[method], f"run.seed={seed}",
                                           f"run.output_dir={run.root}"])
        trainer = build(recipe, accelerator)
        ready()
        accelerator.wait_for_everyone()  # the main process has deleted what ready() deletes before any claims
        history = trainer.train()
        if trainer.stopped_by:
            raise RunStopped(trainer.stopped_by, run)
        if accelerator.is_main_process:
            write_run_figures(run.root, history, run_title(recipe))
        accelerator.free_memory()
        return history
    return train_one


def grpo_trainer(recipe_path: str, overrides: list[str],
                 methods: Mapping[str, list[str]] = GRPO_METHODS) -> TrainOne:
    """A `TrainOne` for a GRPO recipe: each of ``methods`` (name -> overrides) trains with trl's GRPOTrainer
    through `IIFGRPOTrainer`; the curves are held-out accuracy (the first reward function) at the evaluated
    steps, every ``run.eval_every``."""
    from llm_iif.grpo.run import grpo_run_title, train_grpo

    def train_one(method: str, seed: int, run: RunPaths, ready: Callable[[], None]) -> list[dict]:
        recipe = load_recipe(recipe_path, [*overrides, *methods[method], f"run.seed={seed}",
                                           f"run.output_dir={run.root}"], kind=GRPORecipe)
        if recipe.run.eval_every == 0:
            raise UserError("run.eval_every: 0; compare needs a held-out curve (expected 1 or more: the summary "
                            "compares curves at the evaluated steps)")
        # trl's Trainer sets up Accelerate for itself: the runs after this one must not inherit its precision
        with accelerate_state_kept():
            result = train_grpo(recipe, on_loaded=ready)
        if result.stopped_by:
            raise RunStopped(result.stopped_by, run)
        write_run_figures(run.root, result.history, grpo_run_title(recipe))
        return result.history
    return train_one


def classic_trainer(recipe_path: str, overrides: list[str]) -> TrainOne:
    """A `TrainOne` for a classic recipe: each method of `CLASSIC_METHODS` with `IIFPPO`. Needs the classic
    extra."""
    from llm_iif.classic.train import train_classic  # Stable-Baselines3: imported only when used

    def train_one(method: str, seed: int, run: RunPaths, ready: Callable[[], None]) -> list[dict]:
        recipe = load_recipe(recipe_path, [*overrides, f"run.seed={seed}"], kind=ClassicRecipe)
        mode, p = CLASSIC_METHODS[method](recipe.iif)
        return train_classic(recipe, mode, p, run.root, on_loaded=ready)
    return train_one


class RunStopped(Exception):
    """A run of a comparison or suite stopped early, by a signal (SIGINT or SIGTERM, even in its last round or
    final save): the comparison or suite stops too, and the run does not count as finished."""

    def __init__(self, signal: str, run: RunPaths):
        super().__init__(f"stopped by {signal} during {run.root}")
        self.run = run


def run_compare(recipe_path: str, overrides: list[str], methods: list[str], seeds: list[int], output_dir: Path,
                accelerator, build: BuildPPOTrainer, overwrite: bool = False) -> dict:
    """`llm-iif compare` on a PPO recipe: the recipe with each of ``methods`` (see `LM_METHODS`) and ``seeds``
    in turn, trained by the trainers ``build`` makes, then the comparison's outputs; returns the summary."""
    check_methods(methods, LM_METHODS)
    check_recipes(recipe_path, overrides, {method: LM_METHODS[method] for method in methods}, Recipe, "--methods")
    histories = run_grid(LM_METHODS, methods, seeds, output_dir,
                         lm_trainer(recipe_path, overrides, accelerator, build), overwrite,
                         main_process=accelerator.is_main_process)
    if not accelerator.is_main_process:
        return summarize(histories)
    return write_comparison(output_dir, histories)


def run_grpo_compare(recipe_path: str, overrides: list[str], methods: list[str], seeds: list[int],
                     output_dir: Path, overwrite: bool = False) -> dict:
    """`llm-iif compare` on a GRPO recipe (see `grpo_trainer`); returns the summary."""
    check_methods(methods, GRPO_METHODS)
    check_recipes(recipe_path, overrides, {method: GRPO_METHODS[method] for method in methods}, GRPORecipe,
                  "--methods")
    histories = run_grid(GRPO_METHODS, methods, seeds, output_dir, grpo_trainer(recipe_path, overrides), overwrite)
    return write_comparison(output_dir, histories, ylabel=GRPO_CURVE)


def run_classic_compare(recipe_path: str, overrides: list[str], methods: list[str], seeds: list[int],
                        output_dir: Path, overwrite: bool = False) -> dict:
    """`llm-iif classic compare` (see `classic_trainer`): summary.json and reward_curves.png, no report;
    returns the summary."""
    check_methods(methods, CLASSIC_METHODS)
    check_recipes(recipe_path, overrides, {method: [] for method in methods}, ClassicRecipe, "--methods")
    histories = run_grid(CLASSIC_METHODS, methods, seeds, output_dir, classic_trainer(recipe_path, overrides),
                         overwrite)
    return write_comparison(output_dir, histories, ylabel=CLASSIC_CURVE, report=False)
