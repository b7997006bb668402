"""The layout of run directories, defined here and nowhere else.

An LM run (`llm-iif train`)::

    RUN/recipe.yaml  environment.json  metrics.jsonl  timings.jsonl  samples.jsonl
    RUN/records/round_0000.parquet ...        one row per rollout sample
    RUN/lds/round_0000.json ...               the LDS check of the rounds in iif.lds_rounds
    RUN/checkpoint-N/  RUN/final/             see `llm_iif.runs.state`
    RUN/tensorboard/  RUN/wandb/  RUN/reward_curve.png  RUN/report.html
    RUN/README.md                             a GRPO run's model card, written by trl
    RUN/final.zip                             a classic run's SB3 model (beside its metrics.jsonl)

A comparison (`llm-iif compare`, `llm-iif classic compare`) holds one run per method and seed::

    GRID/comparison.json  GRID/METHOD/seed-S/   GRID/summary.json  GRID/reward_curves.png  GRID/influence.png
    GRID/report.html

A suite (`llm-iif suite`) holds one comparison per task, beside its scorecard (see `SuitePaths`)::

    SUITE/suite.json  SUITE/finished.jsonl  SUITE/TASK/...  SUITE/scorecard.md  scorecard.json  scorecard.png

Containment: whatever a command writes or deletes lies inside its output directory. METHOD and TASK are names
(`check_name`: one folder, never a separator, ``..`` or an absolute path), whether they come from the command
line, a suite file or a recorded comparison.json, summary.json or suite.json; a recorded name that is not one
makes the record unreadable, never a path. No symbolic link may stand between the output directory and what
is written or deleted in it (`check_inside`): where a run or task folder is one, the link itself is the output
(`GridPaths.run_outputs`, `SuitePaths.task_outputs`), and deleting removes it, never what it points to.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llm_iif.core.errors import UserError
from llm_iif.core.fileio import read_jsonl

_RECORD = re.compile(r"round_(\d+)\.parquet")
_LDS = re.compile(r"round_(\d+)\.json")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_SEED = re.compile(r"seed-(-?\d+)")
_NAME = re.compile(r"\w[\w.+-]*")
NAME_LENGTH = 100
NAME_EXPECTED = (f"a name of at most {NAME_LENGTH} letters, digits, '_', '.', '+' or '-', starting with a letter, "
                 "digit or '_' (it names a folder of the output directory)")


def is_name(name) -> bool:
    """Whether ``name`` can name a task or method: one folder inside an output directory and nothing else."""
    return isinstance(name, str) and len(name) <= NAME_LENGTH and _NAME.fullmatch(name) is not None


def check_name(name, key: str) -> str:
    """``name`` when `is_name`; else a `UserError` naming ``key`` and the value (``repr``, so that a newline in
    it cannot break the one-line error)."""
    if not is_name(name):
        raise UserError(f"{key}: {name!r} is not {NAME_EXPECTED}")
    return name


def first_link(path: Path, root: Path) -> Path | None:
    """The outermost symbolic link among ``path`` and its folders below ``root`` (``path`` is ``root / ...``),
    or None. ``root`` itself, and the folders above it, may be links: the user chose them."""
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def check_inside(path: Path, root: Path, key: str) -> Path:
    """``path`` when it lies inside ``root`` with no symbolic link between them, so that its resolved path is
    inside ``root``'s; else a `UserError` naming ``key``. What a command writes or deletes passes this check."""
    path, root = Path(path), Path(root)
    if not path.is_relative_to(root) or ".." in path.relative_to(root).parts:
        raise UserError(f"{key}: {path} lies outside {root}; nothing is written or deleted there")
    link = first_link(path, root)
    if link is not None:
        raise UserError(f"{key}: {link} is a symbolic link (to {os.path.realpath(link)}); nothing is written or "
                        f"deleted through one: remove it, or start over with --overwrite, which removes the link "
                        "and nothing it points to")
    return path


def _numbered_rounds(directory: Path, name: re.Pattern) -> list[int]:
    """The round numbers of the files in ``directory`` whose names match ``name`` (round_XXXX.*), in order."""
    found = (name.fullmatch(p.name) for p in directory.glob("round_*"))
    return sorted(int(m.group(1)) for m in found if m)


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory ``root``."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def timings(self) -> Path:
        return self.root / "timings.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    def record(self, k: int) -> Path:
        """records/round_XXXX.parquet of round ``k``."""
        return self.records_dir / f"round_{k:04d}.parquet"

    def record_rounds(self) -> list[int]:
        """The rounds that have a records file, in order."""
        return _numbered_rounds(self.records_dir, _RECORD)

    @property
    def lds_dir(self) -> Path:
        return self.root / "lds"

    def lds(self, k: int) -> Path:
        """lds/round_XXXX.json: the LDS check of round ``k`` (``iif.lds_rounds``)."""
        return self.lds_dir / f"round_{k:04d}.json"

    def lds_rounds(self) -> list[int]:
        """The rounds that have an LDS check file, in order."""
        return _numbered_rounds(self.lds_dir, _LDS)

    def checkpoint(self, rounds_completed: int) -> Path:
        return self.root / f"checkpoint-{rounds_completed}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def logged_history(self, rounds: int | None = None) -> list[dict]:
        """The metrics of the first ``rounds`` rounds (all when None) as logged, with their timings merged back
        in: what a trainer that keeps no history of its own (GRPO) resumes from, and what a suite reads of a
        finished run. A torn line (a killed write) is skipped."""
        timings = {row["round"]: row for row in read_jsonl(self.timings)[0]}
        return [{**metrics, **timings.get(metrics["round"], {})} for metrics in read_jsonl(self.metrics)[0]
                if rounds is None or metrics["round"] < rounds]

    def numbered_checkpoints(self) -> list[tuple[int, Path]]:
        """(rounds completed, directory) of every checkpoint-N/ directory, oldest first."""
        found = ((_CHECKPOINT.fullmatch(p.name), p) for p in self.root.glob("checkpoint-*") if p.is_dir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def unfinished_checkpoints(self) -> list[Path]:
        """The temporary directories of checkpoint saves that were killed (`write_directory_atomically` builds
        ``NAME/`` as ``.NAME-*/``)."""
        return sorted(p for pattern in (".checkpoint-*", ".final-*") for p in self.root.glob(pattern) if p.is_dir())

    def outputs(self) -> list[Path]:
        """Every file and directory of a run that exists under ``root``; other files are not the run's."""
        named = [self.recipe, self.environment, self.metrics, self.timings, self.samples, self.records_dir,
                 self.lds_dir, self.tensorboard, self.wandb, self.reward_curve, self.report, self.final,
                 self.model_card, self.classic_model]
        return ([path for path in named if path.exists()] + [p for _, p in self.numbered_checkpoints()]
                + self.unfinished_checkpoints())

    @staticmethod
    def is_checkpoint(directory: Path) -> bool:
        """Whether ``directory`` is named as a checkpoint of its run (``checkpoint-N`` or ``final``)."""
        return directory.name == "final" or _CHECKPOINT.fullmatch(directory.name) is not None

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def reward_curve(self) -> Path:
        return self.root / "reward_curve.png"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def classic_model(self) -> Path:
        """final.zip: a classic run's trained Stable-Baselines3 model."""
        return self.root / "final.zip"

    @property
    def model_card(self) -> Path:
        """README.md: the model card trl writes beside a GRPO run's checkpoints."""
        return self.root / "README.md"


@dataclass(frozen=True)
class GridPaths:
    """The files of a methods × seeds comparison directory ``root``."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def run(self, method: str, seed: int) -> RunPaths:
        """The run folder METHOD/seed-S/; ``method`` must be a name (`check_name`)."""
        return RunPaths(self.root / check_name(method, "method") / f"seed-{seed}")

    def run_outputs(self, method: str, seed: int) -> list[Path]:
        """What run (``method``, ``seed``) has written inside ``root``: its outputs (`RunPaths.outputs`), or the
        symbolic link alone where its folder, or its method's folder, is one. What a link points to is not this
        comparison's, so nothing behind it is listed."""
        run = self.run(method, seed)
        link = first_link(run.root, self.root)
        return [link] if link is not None else run.outputs()

    def runs(self) -> dict[str, list[RunPaths]]:
        """Method -> its seed runs that have metrics, seeds in numeric order: the runs the comparison recorded
        (`recorded_runs`), or, in a folder without a record, every METHOD/seed-S/ whose METHOD is a name.
        Folders a record leaves out (a user's own runs in a suite's task folder) are not the comparison's."""
        recorded = self.recorded_runs() or self._found_runs()
        runs = {method: [self.run(method, seed) for seed in sorted(set(seeds))]
                for method, seeds in sorted(recorded.items())}
        return {method: with_metrics for method, group in runs.items()
                if (with_metrics := [run for run in group if run.metrics.is_file()])}

    def _found_runs(self) -> dict[str, list[int]]:
        """{method: seeds} of every METHOD/seed-S/metrics.jsonl whose METHOD is a name."""
        found: dict[str, list[int]] = {}
        for metrics in self.root.glob("*/seed-*/metrics.jsonl"):
            match = _SEED.fullmatch(metrics.parent.name)
            if match and is_name(metrics.parent.parent.name):
                found.setdefault(metrics.parent.parent.name, []).append(int(match.group(1)))
        return found

    def outputs(self) -> list[Path]:
        """Every file a comparison wrote under ``root``: its own files and, for each method and seed it recorded
        (comparison.json, or summary.json of a comparison from before it), what that run wrote
        (`run_outputs`). Other folders and files, even ``*/seed-*`` ones, are not the comparison's."""
        named = [self.comparison, self.summary, self.reward_curves, self.influence, self.report]
        runs = [path for method, seeds in self.recorded_runs().items() for seed in seeds
                for path in self.run_outputs(method, seed)]
        return list(dict.fromkeys([path for path in named if path.exists()] + runs))  # a link may hold several runs

    def recorded_runs(self) -> dict[str, list[int]]:
        """{method: seeds} of the comparison recorded in ``root``: comparison.json's, or summary.json's when
        the first is missing or unreadable; {} when neither is readable. A record whose methods are not all
        names, or whose seeds are not all integers, is unreadable: a record never supplies a path."""
        for record in (self.comparison, self.summary):
            try:
                runs = _recorded_runs(json.loads(record.read_text()))
            except (OSError, ValueError):
                continue
            if runs is not None:
                return runs
        return {}

    @property
    def comparison(self) -> Path:
        """comparison.json: the methods and seeds of the comparison, written once its first run has loaded."""
        return self.root / "comparison.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def reward_curves(self) -> Path:
        return self.root / "reward_curves.png"

    @property
    def influence(self) -> Path:
        return self.root / "influence.png"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


@dataclass(frozen=True)
class SuitePaths:
    """The files of a benchmark suite's directory ``root`` (`llm-iif suite`)::

        SUITE/suite.json        the suite as loaded, written once its first run has loaded; a restart must match it
        SUITE/finished.jsonl    one line per finished run: task, method, seed, seconds, CPU model
        SUITE/TASK/             a comparison directory (`GridPaths`) per task
        SUITE/scorecard.md  scorecard.json  scorecard.png
    """
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def task(self, name: str) -> GridPaths:
        """The comparison folder of task ``name``, which must be a name (`check_name`)."""
        return GridPaths(self.root / check_name(name, "task"))

    def task_outputs(self, name: str) -> list[Path]:
        """What the comparison of task ``name`` wrote (`GridPaths.outputs`), or the symbolic link alone where
        its folder is one."""
        grid = self.task(name)
        return [grid.root] if grid.root.is_symlink() else grid.outputs()

    @property
    def record(self) -> Path:
        return self.root / "suite.json"

    @property
    def finished(self) -> Path:
        return self.root / "finished.jsonl"

    @property
    def scorecard_markdown(self) -> Path:
        return self.root / "scorecard.md"

    @property
    def scorecard_json(self) -> Path:
        return self.root / "scorecard.json"

    @property
    def scorecard_figure(self) -> Path:
        return self.root / "scorecard.png"

    def outputs(self, tasks: list[str]) -> list[Path]:
        """Every file the suite of ``tasks`` wrote under ``root``: its own files and each task's comparison."""
        named = [self.record, self.finished, self.scorecard_markdown, self.scorecard_json, self.scorecard_figure]
        return [path for path in named if path.exists()] + [p for task in tasks for p in self.task_outputs(task)]


def _recorded_runs(content) -> dict[str, list[int]] | None:
    """{method: seeds} of a comparison.json (``{"methods": [...], "seeds": [...]}``) or summary.json
    (``{"methods": {method: {"seeds": {seed: ...}}}}``), or None unless every method is a name and every seed an
    integer."""
    methods = content.get("methods") if isinstance(content, dict) else None
    if isinstance(methods, dict):
        seeds = {method: entry.get("seeds") if isinstance(entry, dict) else None for method, entry in methods.items()}
    elif isinstance(methods, list) and all(map(is_name, methods)):
        seeds = {method: content.get("seeds") for method in methods}
    else:
        return None
    if not all(map(is_name, seeds)) or not all(isinstance(values, (list, dict)) for values in seeds.values()):
        return None
    runs = {method: [_recorded_seed(seed) for seed in values] for method, values in seeds.items()}
    return None if any(None in values for values in runs.values()) else runs


def _recorded_seed(value) -> int | None:
    """A recorded seed: an integer, or its decimal digits (summary.json's keys); None for anything else."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value):
        return int(value)
    return value if type(value) is int and abs(value) < 10 ** 18 else None
