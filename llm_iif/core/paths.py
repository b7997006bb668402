"""The layout of run directories, defined here and nowhere else.

An LM run (`llm-iif train`)::

    RUN/recipe.yaml  environment.json  metrics.jsonl  timings.jsonl  samples.jsonl
    RUN/records/round_0000.parquet ...        one row per rollout sample
    RUN/lds/round_0000.json ...               the LDS check of the rounds in iif.lds_rounds
    RUN/checkpoint-N/  RUN/final/             see `llm_iif.training.run_state`
    RUN/tensorboard/  RUN/wandb/  RUN/reward_curve.png  RUN/report.html
    RUN/README.md                             a GRPO run's model card, written by trl
    RUN/final.zip                             a classic run's SB3 model (beside its metrics.jsonl)

A comparison (`llm-iif compare`, `llm-iif classic compare`) holds one run per method and seed::

    GRID/comparison.json  GRID/METHOD/seed-S/   GRID/summary.json  GRID/reward_curves.png  GRID/influence.png
    GRID/report.html

A suite (`llm-iif suite`) holds one comparison per task, beside its scorecard (see `SuitePaths`)::

    SUITE/suite.json  SUITE/finished.jsonl  SUITE/TASK/...  SUITE/scorecard.md  scorecard.json  scorecard.png
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llm_iif.core.fileio import read_jsonl

_RECORD = re.compile(r"round_(\d+)\.parquet")
_LDS = re.compile(r"round_(\d+)\.json")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_SEED = re.compile(r"seed-(-?\d+)")


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
        return RunPaths(self.root / method / f"seed-{seed}")

    def runs(self) -> dict[str, list[RunPaths]]:
        """Method -> its seed runs that have metrics, seeds in numeric order."""
        found: dict[str, list[tuple[int, RunPaths]]] = {}
        for metrics in self.root.glob("*/seed-*/metrics.jsonl"):
            match = _SEED.fullmatch(metrics.parent.name)
            if match:
                found.setdefault(metrics.parent.parent.name, []).append((int(match.group(1)),
                                                                         RunPaths(metrics.parent)))
        return {method: [run for _, run in sorted(runs, key=lambda r: r[0])] for method, runs in sorted(found.items())}

    def outputs(self) -> list[Path]:
        """Every file a comparison wrote under ``root``: its own files and, for each method and seed it recorded
        (comparison.json, or summary.json of a comparison from before it), the files that run wrote. Other
        folders and files, even ``*/seed-*`` ones, are not the comparison's."""
        named = [self.comparison, self.summary, self.reward_curves, self.influence, self.report]
        runs = [path for method, seeds in self.recorded_runs().items() for seed in seeds
                for path in self.run(method, seed).outputs()]
        return [path for path in named if path.exists()] + runs

    def recorded_runs(self) -> dict[str, list[int]]:
        """{method: seeds} of the comparison recorded in ``root`` ({} when none is)."""
        for record in (self.comparison, self.summary):
            try:
                content = json.loads(record.read_text())
                methods = content["methods"]
                if isinstance(methods, dict):  # summary.json: {method: {"seeds": {seed: ...}}}
                    return {m: [int(s) for s in entry["seeds"]] for m, entry in methods.items()}
                return {m: [int(s) for s in content["seeds"]] for m in methods}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return {}

    @property
    def comparison(self) -> Path:
        """comparison.json: the methods and seeds of the comparison, written before its first run."""
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

        SUITE/suite.json        the suite as loaded, written before its first run; a restart must match it
        SUITE/finished.jsonl    one line per finished run: task, method, seed, seconds, CPU model
        SUITE/TASK/             a comparison directory (`GridPaths`) per task
        SUITE/scorecard.md  scorecard.json  scorecard.png
    """
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def task(self, name: str) -> GridPaths:
        return GridPaths(self.root / name)

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
        return [path for path in named if path.exists()] + [p for task in tasks for p in self.task(task).outputs()]
