"""Checkpoints that a run can resume from exactly, and that survive being killed mid-write.

A checkpoint directory (``checkpoint-N/`` or ``final/``) holds:
- the LoRA adapter (peft ``save_pretrained``), ``value_head.safetensors`` and the tokenizer, for inference;
- ``training_state.pt``: the trainable weights, the optimiser state, the KL coefficient, the metrics so far,
  the prompt queue and every random number generator of every process, for an exact resume;
- ``trainer_state.json``, written last: the round count and a SHA-256 of every other file.

The directory is built under a temporary name and renamed into place, so a SIGKILL leaves either the
complete new checkpoint or none; the checksums catch later damage (a truncated copy, a bad disk).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from llm_iif.core.config import Recipe, load_recipe
from llm_iif.core.errors import UserError
from llm_iif.core.paths import RunPaths
from llm_iif.core.fileio import write_directory_atomically

STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"


def save_checkpoint(policy, tokenizer, directory: Path, state: dict, weights: dict, training_state: dict) -> None:
    """Write a checkpoint to ``directory``, replacing any previous one atomically.

    ``weights`` is the policy's full state dict, gathered from every process (`Accelerator.get_state_dict`),
    so that sharded launches save whole tensors. ``PeftModel.from_pretrained(base_model, directory)`` loads
    the adapter; the value head is a plain safetensors file with the keys ``weight`` [1, H] and ``bias`` [1].
    ``state`` goes into the manifest and ``training_state`` into ``training_state.pt``.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        policy.lm.save_pretrained(tmp, state_dict={k[len("lm."):]: v for k, v in weights.items()
                                                   if k.startswith("lm.")})
        save_file({k: weights[f"value_head.{k}"].detach().cpu().contiguous() for k in ("weight", "bias")},
                  tmp / "value_head.safetensors")
        tokenizer.save_pretrained(tmp)
        torch.save(training_state, tmp / TRAINING_STATE_FILE)
        write_manifest(tmp, state)  # last: its checksums cover everything above

    write_directory_atomically(directory, write)


def load_training_state(checkpoint: Path) -> dict:
    """``training_state.pt`` of a verified checkpoint (our own file: it holds numpy RNG arrays, so it is
    unpickled in full)."""
    return torch.load(Path(checkpoint) / TRAINING_STATE_FILE, weights_only=False)


def file_checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` except the manifest itself, by relative path."""
    sums = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != STATE_FILE:
            sums[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def write_manifest(directory: Path, state: dict) -> None:
    """Write ``trainer_state.json``: ``state`` plus the checksums of the files already in ``directory``."""
    (Path(directory) / STATE_FILE).write_text(json.dumps({**state, "files": file_checksums(directory)}, indent=2))


def verify(checkpoint: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint; `UserError` naming what is wrong otherwise."""
    manifest_path = Path(checkpoint) / STATE_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{checkpoint}: not a complete checkpoint ({STATE_FILE} missing or unreadable)") from err
    actual = file_checksums(checkpoint)
    for name, digest in expected.items():
        if name not in actual:
            raise UserError(f"{checkpoint}: damaged checkpoint ({name} is missing)")
        if actual[name] != digest:
            raise UserError(f"{checkpoint}: damaged checkpoint ({name} does not match its checksum)")
    return manifest


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run, oldest first (``final/`` after every ``checkpoint-N/``)."""
    paths = RunPaths(run_dir)
    found = [directory for _, directory in paths.numbered_checkpoints()]
    return found + [paths.final] if paths.final.is_dir() else found


def resolve_resume(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for ``--resume PATH``: a run directory (its newest checkpoint) or one of
    its checkpoint directories. A damaged newest checkpoint is an error that names the previous good one."""
    path = Path(path)
    if (path / STATE_FILE).exists() or RunPaths.is_checkpoint(path):
        verify(path)
        return path.parent, path
    if not path.is_dir():
        raise UserError(f"--resume: {path}: no such run directory")
    candidates = checkpoints_in(path)
    if not candidates:
        raise UserError(f"--resume: {path} has no checkpoint to resume from (set run.save_every to write some)")
    newest = candidates[-1]
    try:
        verify(newest)
    except UserError as err:
        good = next((c for c in reversed(candidates[:-1]) if _is_complete(c)), None)
        offer = f"; the previous good one is {good}: --resume {good}" if good else "; no earlier checkpoint is usable"
        raise UserError(f"--resume: {err}{offer}") from err
    return path, newest


def _is_complete(checkpoint: Path) -> bool:
    try:
        verify(checkpoint)
        return True
    except UserError:
        return False


def prune(run_dir: Path, keep_last_n: int) -> None:
    """Delete all but the newest ``keep_last_n`` ``checkpoint-N/`` directories (``final/`` always stays)."""
    if keep_last_n <= 0:
        return
    periodic = [directory for _, directory in RunPaths(run_dir).numbered_checkpoints()]
    for old in periodic[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)


def rng_states(generators: dict[str, torch.Generator]) -> dict:
    """This process's random number generator states: python, numpy, torch (and CUDA), and ``generators``."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, generators: dict[str, torch.Generator]) -> None:
    """Put back what `rng_states` captured."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, generator in generators.items():
        generator.set_state(states["generators"][name])


def load_checked(checkpoint: Path, paths: RunPaths, recipe: Recipe, num_processes: int) -> dict:
    """The training state of ``checkpoint``, after checking that it belongs to the run at ``paths``, that
    ``recipe`` differs from the run's saved recipe in ``run.rounds`` at most, and that it was written by as
    many processes as resume it."""
    if Path(checkpoint).resolve().parent != paths.root.resolve():
        raise UserError(f"--resume: {checkpoint} is not in run.output_dir {paths.root}")
    manifest = verify(checkpoint)
    changed = recipe_changes(load_recipe(paths.recipe), recipe) - {"run.rounds", "run.output_dir"}
    if changed:
        raise UserError(f"--resume: the recipe differs from {paths.recipe} in "
                        f"{', '.join(sorted(changed))}; only run.rounds may change on resume")
    if recipe.run.rounds < manifest["rounds_completed"]:
        raise UserError(f"run.rounds: {checkpoint} has already completed {manifest['rounds_completed']} "
                        f"rounds; set run.rounds to more to continue")
    if manifest.get("num_processes", 1) != num_processes:
        raise UserError(f"--resume: {checkpoint} was written by {manifest['num_processes']} process(es); "
                        f"resume it with the same number, not {num_processes}")
    return load_training_state(checkpoint)


def recipe_changes(a: Recipe, b: Recipe) -> set[str]:
    """The ``section.key`` names whose values differ between two recipes."""
    da, db = a.to_dict(), b.to_dict()
    return {f"{section}.{key}" for section in da for key in da[section]
            if da[section][key] != db[section][key]}
