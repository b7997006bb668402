"""Run outputs of an LM run: metrics, timings, samples, per-round records, trackers and the environment.

Paths come from `llm_iif.runs.paths.RunPaths`; every file is written through `llm_iif.core.fileio`. Only the
main process writes; methods that gather from every process must be called by all of them.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker
from accelerate.utils import gather_object, is_trackio_available, is_wandb_available

from llm_iif.core import ppo
from llm_iif.recipes import Recipe
from llm_iif.core.errors import UserError, first_line
from llm_iif.core.fileio import append_jsonl, atomic_write_text, read_jsonl, write_parquet
from llm_iif.core.machine import cpu_model, package_versions
from llm_iif.runs.paths import RunPaths, check_inside
from llm_iif.core.records import Advantages, Rollout

PACKAGES = ("llm_iif", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


# run.report_to's backends that need a package of their own: (is it installed, how to install it).
TRACKER_PACKAGES = {
    "wandb": (is_wandb_available, "`pip install wandb` (WANDB_MODE=offline logs without a network)"),
    "trackio": (is_trackio_available, "`pip install trackio` (it logs locally unless told to sync)"),
}


def check_trackers_installed(names: list[str]) -> None:
    """`UserError` for a ``run.report_to`` backend whose package is missing."""
    for name in names:
        if name in TRACKER_PACKAGES and not TRACKER_PACKAGES[name][0]():
            raise UserError(f"run.report_to: {name} needs {TRACKER_PACKAGES[name][1]}")


def open_trackers(names: list[str], output_dir: Path, run_name: str, recipe: dict) -> list:
    """Started Accelerate trackers (``tensorboard`` under OUTPUT/tensorboard/RUN_NAME, ``wandb`` under
    OUTPUT/wandb, ``trackio`` in the project RUN_NAME), each given the recipe, flattened to ``section.key``
    values, as the run's configuration. Call on the main process only."""
    check_trackers_installed(names)
    config = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
              for section, values in recipe.items() if values is not None for key, value in values.items()}
    trackers = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker(run_name, Path(output_dir) / "tensorboard")
        elif name == "wandb":
            tracker = WandBTracker(run_name, dir=str(output_dir))
        else:
            tracker = TrackioTracker(run_name)
        tracker.start()
        tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


def environment(accelerator) -> dict:
    """What a run trained with: Python, platform, CPU model, package versions, device and process count."""
    versions = package_versions(PACKAGES)
    device = str(accelerator.device)
    if accelerator.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(accelerator.device)})"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_model": cpu_model(), **versions,
            "device": device,
            "processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision)}



def check_writable_directory(root: Path, key: str = "run.output_dir") -> None:
    """Create ``root`` if needed; `UserError` naming ``key`` when it is a file or cannot be written."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{key}: {root} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise UserError(f"{key}: cannot write to {root} ({err.strerror or first_line(err)})") from err


def claim_run_directory(paths: RunPaths, overwrite: bool = False) -> list[Path]:
    """Check that a new run may write into ``paths.root``: a writable directory that holds no other run's
    outputs, or holds them and ``overwrite`` is set. Returns those outputs (to delete before starting);
    `UserError` otherwise, as HF's Trainer refuses a used ``output_dir`` without ``overwrite_output_dir``."""
    check_writable_directory(paths.root)
    earlier = paths.outputs()
    if earlier and not overwrite:
        resumable = paths.numbered_checkpoints() or paths.final.is_dir()
        resume = f"continue it with --resume {shlex.quote(str(paths.root))}, or " if resumable else ""
        raise UserError(f"run.output_dir: {paths.root} already holds a run ({listed(earlier, paths.root)}); "
                        f"{resume}start over with --overwrite, which deletes exactly those")
    return earlier


def listed(outputs: list[Path], root: Path) -> str:
    """Every one of ``outputs``, relative to ``root``, for an error that says what --overwrite would delete."""
    return ", ".join(str(path.relative_to(root)) for path in outputs)


def delete_outputs(outputs: list[Path], root: Path) -> None:
    """Delete the files and directories of an earlier run or comparison (from `claim_run_directory`,
    `GridPaths.outputs`, ...), each of which must lie inside ``root`` with no symbolic link on the way to it
    (`check_inside`, checked for every one before any is deleted). A symlink among them is removed, never what it
    points to, and a directory's contents are deleted without following the links among them. Directories under
    ``root`` that are left empty are removed too."""
    root = Path(root)
    for path in outputs:  # the path itself may be a link, removed as one; the folders above it may not
        check_inside(path.parent, root, "--output-dir")
        if path.name in ("", ".", ".."):
            raise UserError(f"--output-dir: {path} is not a file or folder inside {root}")
    for path in outputs:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)  # removes the links inside, not their targets
    for directory in sorted({p.parent for p in outputs}, key=lambda d: len(d.parts), reverse=True):
        while directory != root and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent


class RunOutputs:
    """The files of one LM run directory, written as training goes."""

    def __init__(self, paths: RunPaths, recipe: Recipe, accelerator: Accelerator):
        self.paths, self.recipe, self.accelerator = paths, recipe, accelerator
        self.trackers: list = []

    @property
    def is_writer(self) -> bool:
        return self.accelerator.is_main_process

    def start(self, overwrite: bool = False) -> None:
        """A new run: the recipe, the environment and empty JSONL files, in a directory that holds no other
        run (with ``overwrite``, the other run's outputs are deleted first; see `claim_run_directory`)."""
        earlier = claim_run_directory(self.paths, overwrite)  # on every process, so that all of them refuse
        self.accelerator.wait_for_everyone()  # every process has looked before the main one writes
        if not self.is_writer:
            return
        delete_outputs(earlier, self.paths.root)
        self.write_recipe()
        atomic_write_text(self.paths.environment, json.dumps(environment(self.accelerator), indent=2))
        for path in (self.paths.metrics, self.paths.timings, self.paths.samples):
            atomic_write_text(path, "")

    def write_recipe(self) -> None:
        atomic_write_text(self.paths.recipe, yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

    def open_trackers(self) -> None:
        if self.is_writer:
            self.trackers = open_trackers(self.recipe.run.report_to, self.paths.root, self.paths.root.name,
                                          self.recipe.to_dict())

    def close_trackers(self) -> None:
        for tracker in self.trackers:
            tracker.finish()

    def log_round(self, k: int, metrics: dict) -> None:
        """metrics.jsonl gets what training computed, so a seeded run reproduces it byte for byte;
        timings.jsonl gets the wall-clock ``time_*`` fields, which never repeat; trackers get every number."""
        if not self.is_writer:
            return
        self._append_metrics(metrics)
        numbers = {n: v for n, v in metrics.items() if n != "round" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(numbers, step=k)

    def _append_metrics(self, metrics: dict) -> None:
        timings = {name: value for name, value in metrics.items() if name.startswith("time_")}
        append_jsonl(self.paths.metrics, {n: v for n, v in metrics.items() if n not in timings})
        append_jsonl(self.paths.timings, {"round": metrics["round"], **timings})

    def log_samples(self, k: int, rollout: Rollout) -> None:
        """The first ``run.log_samples`` responses of this round on the main process, to samples.jsonl."""
        self.log_sample_rows(k, [{"prompt": rollout.prompts[i], "response": rollout.responses[i],
                                  "reward": rollout.rewards[i].item()} for i in range(len(rollout))])

    def log_sample_rows(self, k: int, rows: list[dict]) -> None:
        """The first ``run.log_samples`` of ``rows`` (this process's), each tagged with round ``k``, to
        samples.jsonl (main process only)."""
        if self.is_writer:
            for row in rows[:self.recipe.run.log_samples]:
                append_jsonl(self.paths.samples, {"round": k, **row})

    def write_records(self, k: int, rollout: Rollout, advantages: Advantages, influence: torch.Tensor | None,
                      keep: torch.Tensor) -> None:
        """records/round_XXXX.parquet: every sample of the round (all processes) with its reward, last-token
        advantage, influence score (NaN when not scored) and whether the update kept it."""
        rows = torch.arange(len(rollout), device=rollout.rewards.device)
        last_advantage = advantages.advantages[rows, ppo.last_token_index(rollout.response_mask)]
        self.write_record_rows(k, [{"prompt": rollout.prompts[i], "response": rollout.responses[i],
                                    "reward": rollout.rewards[i].item(), "advantage": last_advantage[i].item(),
                                    "influence": influence[i].item() if influence is not None else math.nan,
                                    "kept": bool(keep[i])} for i in range(len(rollout))])

    def write_record_rows(self, k: int, local_rows: list[dict]) -> None:
        """records/round_XXXX.parquet from every process's ``local_rows`` (prompt, response, reward, advantage,
        influence, kept), in process order. Every process must call it."""
        records = gather_object(local_rows)
        if self.is_writer:
            write_parquet(self.paths.record(k), records)

    def write_lds(self, k: int, details: dict) -> None:
        """lds/round_XXXX.json: round ``k``'s LDS check (`llm_iif.training.lds_check`)."""
        if self.is_writer:
            self.paths.lds_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.paths.lds(k), json.dumps(details, indent=1))

    def rewind(self, history: list[dict]) -> None:
        """Make the files read as a run that has done exactly ``history``'s rounds (on resume): later rounds'
        metrics, samples and records, left by a run killed after its checkpoint, are removed."""
        if not self.is_writer:
            return
        done = len(history)
        for path in (self.paths.metrics, self.paths.timings):
            atomic_write_text(path, "")
        for metrics in history:
            self._append_metrics(metrics)
        if self.paths.samples.exists():
            kept = [row for row in read_jsonl(self.paths.samples)[0] if row["round"] < done]
            atomic_write_text(self.paths.samples, "".join(json.dumps(row) + "\n" for row in kept))
        for k in self.paths.record_rounds():
            if k >= done:
                self.paths.record(k).unlink()
        for k in self.paths.lds_rounds():
            if k >= done:
                self.paths.lds(k).unlink()
        self.write_recipe()
