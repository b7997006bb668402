"""`llm-iif suite SUITE.yaml`: several comparisons (tasks × methods × seeds) into one directory, and one scorecard.

A suite file names its tasks, each a recipe with the methods and seeds to compare and any recipe overrides::

    output_dir: runs/suite-quick          # where the suite writes (--output-dir overrides it)
    seeds: [0, 1, 2]                      # every task's seeds, unless a task gives its own
    methods: [standard, iif, random]      # every task's methods, unless a task gives its own
    custom_methods:                       # methods of this suite beyond the built-in ones: overrides, as --set
      kl-0.5: {iif.enabled: false, ppo.adaptive_kl: false, ppo.init_kl_coef: 0.5}
    tasks:
      tiny-sentiment:
        recipe: ../../recipes/tiny-sentiment.yaml   # relative to the suite file
        set: {run.rounds: 40}                       # overrides, as with --set
        custom_methods:                             # this task's own, added to (or replacing) the suite's
          rm-plus-trusted: {reward.name_or_path: my-reward-model-plus-trusted}

A recipe's kind (PPO, GRPO, classic) picks its trainer and its methods (`llm_iif.analysis.grid`); PPO and GRPO
tasks may also use the suite's ``custom_methods``. The suite is
restartable: every finished run is logged in finished.jsonl, and running the same suite file again into the
same directory skips those and starts any unfinished run afresh. Each task's directory is an ordinary
comparison (summary.json, reward_curves.png, report.html); `llm_iif.analysis.scorecard` writes the scorecard.

Every key of the suite file is type-checked, task and method names are names (`llm_iif.runs.paths.check_name`),
and nothing is written or deleted until the first run has loaded its model and data.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llm_iif.analysis.grid import (CLASSIC_CURVE, CLASSIC_METHODS, GRPO_CURVE, GRPO_METHODS, LM_METHODS,
                                   BuildPPOTrainer, TrainOne, check_recipes, check_seeds, classic_trainer, grpo_trainer, lm_trainer, once,
                                   write_comparison)
from llm_iif.analysis.scorecard import task_histories, write_scorecard
from llm_iif.recipes import ClassicRecipe, GRPORecipe, Recipe, read_yaml_mapping, recipe_kind
from llm_iif.core.errors import UserError
from llm_iif.core.fileio import append_jsonl, atomic_write_text, read_jsonl
from llm_iif.core.machine import cpu_model
from llm_iif.runs.paths import SuitePaths, check_inside, check_name, is_name
from llm_iif.runs.outputs import check_writable_directory, delete_outputs, listed

SUITE_KEYS = ("output_dir", "seeds", "methods", "custom_methods", "tasks")
TASK_KEYS = ("recipe", "set", "seeds", "methods", "custom_methods")
DEFAULT_METHODS = ["standard", "iif", "random"]
# Recipe kind -> (its methods, the y-axis of its curves).
KINDS = {Recipe: (LM_METHODS, "mean reward"), GRPORecipe: (GRPO_METHODS, GRPO_CURVE),
         ClassicRecipe: (CLASSIC_METHODS, CLASSIC_CURVE)}
KIND_NAMES = {Recipe: "PPO", GRPORecipe: "GRPO", ClassicRecipe: "classic PPO (Stable-Baselines3)"}


@dataclass
class SuiteTask:
    """One comparison of a suite: ``recipe`` with each of ``methods`` and ``seeds``, plus ``overrides``;
    ``custom`` holds the overrides of the suite's custom methods among ``methods``."""
    name: str
    recipe: Path
    kind: type
    methods: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    custom: dict[str, list[str]] = field(default_factory=dict)

    def method_table(self) -> dict[str, list[str]]:
        """Method name -> its recipe overrides: the recipe kind's built-in methods and the task's custom ones."""
        return {**KINDS[self.kind][0], **self.custom}

    def runs(self) -> list[tuple[str, int]]:
        """(method, seed) pairs, seed-major as in a comparison: all methods of a seed run back to back, so a
        slowdown of the machine hits every method of that seed alike."""
        return [(method, seed) for seed in self.seeds for method in self.methods]

    def record(self) -> dict:
        """What a restart must find unchanged, the recipe's content included."""
        record = {"recipe": str(self.recipe), "recipe_sha256": hashlib.sha256(self.recipe.read_bytes()).hexdigest(),
                  "methods": self.methods, "seeds": self.seeds, "set": self.overrides}
        return {**record, "custom_methods": self.custom} if self.custom else record


@dataclass
class Suite:
    path: Path
    output_dir: Path
    tasks: list[SuiteTask]

    def record(self) -> dict:
        return {"suite": str(self.path), "tasks": {task.name: task.record() for task in self.tasks}}


def load_suite(path: str | Path, output_dir: str | None = None) -> Suite:
    """Read and check a suite file: every key has its type, task and method names are names, and every recipe
    loads with every method's overrides, before any run starts. Raises `UserError` naming the file and key on
    bad input."""
    path = Path(path)
    raw = read_yaml_mapping(path, "suite")
    _known_keys(raw, SUITE_KEYS, f"{path}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise UserError(f"{path}: tasks: expected a mapping of task names to recipes")
    output = output_dir or raw.get("output_dir")
    if not isinstance(output, str) or not output:
        raise UserError(f"{path}: output_dir: expected a directory, got {output!r} (or pass --output-dir)")
    default_seeds = _seeds(raw.get("seeds", [0, 1, 2]), f"{path}: seeds")
    default_methods = _methods(raw.get("methods", DEFAULT_METHODS), f"{path}: methods")
    custom = _custom_methods(raw.get("custom_methods") or {}, f"{path}: custom_methods")
    loaded = [_load_task(path, check_name(name, f"{path}: tasks"), entry, default_seeds, default_methods, custom)
              for name, entry in tasks.items()]
    return Suite(path, Path(output), loaded)


def _custom_methods(raw, where: str) -> dict[str, list[str]]:
    """A suite's ``custom_methods``: name -> overrides (``section.key=value``, values as JSON, which is YAML)."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) and v for v in raw.values()):
        raise UserError(f"{where}: expected a mapping of method names to overrides, e.g. "
                        "{kl-0.5: {ppo.init_kl_coef: 0.5}}")
    for name in raw:
        check_name(name, where)
    clash = sorted(set(raw) & (set(LM_METHODS) | set(GRPO_METHODS)))
    if clash:
        raise UserError(f"{where}.{clash[0]}: a built-in method's name; choose another")
    return {name: _as_overrides(settings, f"{where}.{name}") for name, settings in raw.items()}


def _as_overrides(settings: dict, where: str) -> list[str]:
    """``section.key: value`` settings as ``--set`` overrides, each value written as JSON (which is YAML)."""
    overrides = []
    for key, value in settings.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: {key!r}: expected a recipe key, e.g. run.rounds")
        try:
            overrides.append(f"{key}={json.dumps(value)}")
        except (TypeError, ValueError):  # e.g. a YAML date
            raise UserError(f"{where}.{key}: {value!r} is not a number, string, list or mapping") from None
    return overrides


def _load_task(suite_path: Path, name: str, entry, default_seeds: list[int], default_methods,
               custom: dict[str, list[str]]) -> SuiteTask:
    where = f"{suite_path}: tasks.{name}"
    if not isinstance(entry, dict) or "recipe" not in entry:
        raise UserError(f"{where}: expected a mapping with a recipe")
    _known_keys(entry, TASK_KEYS, where)
    if not isinstance(entry["recipe"], str):
        raise UserError(f"{where}.recipe: expected a recipe path, got {entry['recipe']!r}")
    recipe = suite_path.parent / entry["recipe"]
    if not recipe.is_file():
        raise UserError(f"{where}.recipe: {recipe} not found (a recipe path is relative to the suite file)")
    overrides = entry.get("set") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{where}.set: expected a mapping of section.key to values, e.g. {{run.rounds: 40}}")
    overrides = _as_overrides(overrides, f"{where}.set")
    custom = {**custom, **_custom_methods(entry.get("custom_methods") or {}, f"{where}.custom_methods")}
    kind = recipe_kind(recipe)
    table = KINDS[kind][0] if kind is ClassicRecipe else {**KINDS[kind][0], **custom}
    methods = _methods(entry["methods"], f"{where}.methods") if "methods" in entry else default_methods
    for method in methods:
        if method not in table:
            raise UserError(f"{where}.methods: unknown method '{method}' for a {KIND_NAMES[kind]} recipe "
                            f"(expected some of: {', '.join(table)})")
    if "standard" not in methods:
        raise UserError(f"{where}.methods: {methods} lacks standard, the baseline every method is compared with")
    seeds = _seeds(entry["seeds"], f"{where}.seeds") if "seeds" in entry else default_seeds
    # every run's recipe, checked now rather than hours into the suite (a classic method is no override)
    check_recipes(recipe, overrides, {method: [] if kind is ClassicRecipe else table[method] for method in methods},
                  kind, where)
    return SuiteTask(name, recipe, kind, list(methods), seeds, overrides,
                     {method: custom[method] for method in methods if method in custom})


def _known_keys(raw: dict, known: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (expected some of: {', '.join(known)})")


def _methods(value, where: str) -> list[str]:
    """A list of distinct method names (`check_name`)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: expected a list, e.g. [standard, iif, random]")
    for method in value:
        check_name(method, where)
        if value.count(method) > 1:
            raise UserError(f"{where}: {method} is given twice; each method runs once per seed")
    return list(value)


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: expected a list of integer seeds, e.g. [0, 1, 2]")
    check_seeds(value, where)
    if len(value) < 2:
        raise UserError(f"{where}: {len(value)} seed; the scorecard's intervals over seeds need at least 2")
    return list(value)


# ---------------------------------------------------------------------------------------------- running


def run_suite(suite: Suite, command: str, build_ppo: BuildPPOTrainer, overwrite: bool = False,
              only: list[str] | None = None, progress: bool = True) -> dict:
    """Train every run of ``suite`` not yet finished (of the tasks in ``only``, when given), writing each task's
    comparison as soon as its runs are done and the scorecard after every task; returns the scorecard. Nothing
    is written or deleted before the first run to train has loaded (`start_suite` then). A run stopped by a
    signal raises `RunStopped` and is not logged: the same command runs it again.

    command: the command line, for the scorecard's header; build_ppo: what builds a PPO recipe's trainer
    (`llm_iif.training.build_trainer`).
    """
    tasks = _selected(suite, only)
    paths = SuitePaths(suite.output_dir)
    earlier, finished = claim_suite_directory(suite, paths, overwrite)
    started = once(lambda: start_suite(suite, paths, earlier))
    eta = TimeLeft(finished)
    bar = _bar(sum(len(t.runs()) for t in tasks), sum((t.name, m, s) in finished for t in tasks
                                                       for m, s in t.runs()), progress)
    card = None
    for task in tasks:
        grid = paths.task(task.name)
        to_run = [(method, seed) for method, seed in task.runs() if (task.name, method, seed) not in finished]
        if not to_run and grid.summary.exists() and (task.kind is ClassicRecipe or grid.report.exists()):
            continue  # finished before this restart, comparison written
        train_one = _trainer(task, build_ppo) if to_run else None
        for method, seed in to_run:
            bar.set_postfix_str(f"{task.name}: {method}, seed {seed}; {eta.text(tasks)}")
            start = time.perf_counter()

            def ready() -> None:  # called by train_one, during this iteration
                started()
                start_run(paths, task, method, seed)

            train_one(method, seed, grid.run(method, seed), ready)
            seconds = time.perf_counter() - start
            row = {"task": task.name, "method": method, "seed": seed, "seconds": seconds, "cpu_model": cpu_model(),
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            append_jsonl(paths.finished, row)
            finished[(task.name, method, seed)] = row
            eta.add(task.name, seconds)
            bar.update(1)
        started()
        write_comparison(grid.root, task_histories(task, paths), ylabel=KINDS[task.kind][1],
                         report=task.kind is not ClassicRecipe)
        card = write_scorecard(paths, suite, finished, command)  # after every task: a long suite shows results early
    bar.close()
    if card is None:
        started()
        card = write_scorecard(paths, suite, finished, command)
    return card


def claim_suite_directory(suite: Suite, paths: SuitePaths, overwrite: bool
                          ) -> tuple[list[Path], dict[tuple[str, str, int], dict]]:
    """Check that ``suite`` may write into ``paths.root``; returns what `start_suite` deletes (another suite's
    outputs, which ``overwrite`` allows) and the suite's finished runs, {(task, method, seed): finished.jsonl
    row}: none for a new suite, the logged ones when the same suite restarts. Another suite's directory is
    refused without ``overwrite``, and so are runs made on another CPU model, which a scorecard could not pair
    with the CPU model this suite runs on. Writes nothing but the directory itself."""
    check_writable_directory(paths.root, "--output-dir")
    names = [task.name for task in suite.tasks]
    earlier_record = _read_record(paths)
    if earlier_record is None:
        earlier = paths.outputs(names)
        if earlier and not overwrite:
            raise UserError(f"--output-dir: {paths.root} already holds comparisons ({listed(earlier, paths.root)}); "
                            "choose another directory, or start over with --overwrite, which deletes exactly those")
    elif earlier_record != suite.record() or overwrite:
        earlier = paths.outputs(list(earlier_record["tasks"]) or names)
        if not overwrite:
            raise UserError(f"--output-dir: {paths.root} holds another suite ({_difference(earlier_record, suite)}); "
                            "choose another directory, or start over with --overwrite, which deletes its outputs")
    else:
        earlier = []
    finished = {} if earlier else _read_finished(paths)  # with earlier outputs to delete, finished.jsonl goes too
    others = sorted({row["cpu_model"] for row in finished.values()} - {cpu_model()})
    if others:
        raise UserError(f"--output-dir: {paths.root} holds runs made on the CPU '{others[0]}', and this one is "
                        f"'{cpu_model()}'; runs on different CPU models take different trajectories and are not "
                        "paired: finish the suite on the first model, or start over with --overwrite")
    return earlier, finished


def start_suite(suite: Suite, paths: SuitePaths, earlier: list[Path]) -> None:
    """Delete ``earlier`` (another suite's outputs, `claim_suite_directory`) and record ``suite`` in suite.json."""
    delete_outputs(earlier, paths.root)
    atomic_write_text(paths.record, json.dumps(suite.record(), indent=2))


def start_run(paths: SuitePaths, task: SuiteTask, method: str, seed: int) -> None:
    """Before run (``method``, ``seed``) of ``task`` writes: its task's comparison.json, and its folder emptied
    of what an unfinished run left (a symbolic link there is removed, not followed)."""
    grid = paths.task(task.name)
    check_inside(grid.root, paths.root, "--output-dir")
    grid.root.mkdir(exist_ok=True)
    atomic_write_text(grid.comparison, json.dumps({"methods": task.methods, "seeds": task.seeds}))
    delete_outputs(grid.run_outputs(method, seed), paths.root)
    check_inside(grid.run(method, seed).root, paths.root, "--output-dir")


def _read_record(paths: SuitePaths) -> dict | None:
    """suite.json's content; None when it is missing, unreadable, or not a record whose tasks are names (a
    record never supplies a path)."""
    try:
        record = json.loads(paths.record.read_text())
    except (OSError, ValueError):
        return None
    tasks = record.get("tasks") if isinstance(record, dict) else None
    if not isinstance(tasks, dict) or not all(is_name(name) and isinstance(entry, dict)
                                              for name, entry in tasks.items()):
        return None
    return record


def _read_finished(paths: SuitePaths) -> dict[tuple[str, str, int], dict]:
    """finished.jsonl's runs, {(task, method, seed): row}. A row without its fields, of their types, counts as
    not finished: its run is made again."""
    fields = {"task": str, "method": str, "seed": int, "seconds": (int, float), "cpu_model": str}
    rows = [row for row in read_jsonl(paths.finished)[0]
            if isinstance(row, dict) and all(isinstance(row.get(key), kind) for key, kind in fields.items())]
    return {(row["task"], row["method"], row["seed"]): row for row in rows}


def _difference(earlier: dict, suite: Suite) -> str:
    """The first way the recorded suite differs from ``suite``, for the error that refuses to mix them."""
    if earlier.get("suite") != str(suite.path):
        return f"from {earlier.get('suite')}"
    tasks = earlier.get("tasks", {})
    for task in suite.tasks:
        if task.name not in tasks:
            return f"without task {task.name}"
        for key, value in task.record().items():
            if tasks[task.name].get(key) != value:
                what = "its recipe file has changed since" if key == "recipe_sha256" else f"{key} differs from"
                return f"task {task.name}: {what} this suite's"
    return "with other tasks"


def _selected(suite: Suite, only: list[str] | None) -> list[SuiteTask]:
    if not only:
        return suite.tasks
    names = [task.name for task in suite.tasks]
    for name in only:
        if name not in names:
            raise UserError(f"--tasks: unknown task '{name}' (the suite has: {', '.join(names)})")
    return [task for task in suite.tasks if task.name in only]


def _trainer(task: SuiteTask, build_ppo: BuildPPOTrainer) -> TrainOne:
    if task.kind is ClassicRecipe:
        return classic_trainer(str(task.recipe), task.overrides)
    if task.kind is GRPORecipe:
        return grpo_trainer(str(task.recipe), task.overrides, task.method_table())
    from accelerate import Accelerator

    return lm_trainer(str(task.recipe), task.overrides, Accelerator(), build_ppo, task.method_table())


class TimeLeft:
    """The time a suite's remaining runs will take: each at the mean time of its task's finished runs, or of
    all finished runs while its task has none."""

    def __init__(self, finished: dict):
        self.seconds: dict[str, list[float]] = {}
        for (task, _, _), row in finished.items():
            self.add(task, row["seconds"])
        self.finished = finished

    def add(self, task: str, seconds: float) -> None:
        self.seconds.setdefault(task, []).append(seconds)

    def text(self, tasks: list[SuiteTask]) -> str:
        everything = [s for values in self.seconds.values() for s in values]
        if not everything:
            return "time left: known after the first run"
        overall = sum(everything) / len(everything)
        left = 0.0
        for task in tasks:
            own = self.seconds.get(task.name)
            per_run = sum(own) / len(own) if own else overall
            left += per_run * sum((task.name, m, s) not in self.finished for m, s in task.runs())
        return f"about {_duration(left)} left"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def _bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="suite runs", unit="run", disable=not enabled, position=0,
                dynamic_ncols=True)

