"""Checkpoints that a run can resume from exactly, and that survive being killed mid-write.

A checkpoint directory (``checkpoint-N/`` or ``final/``) holds:
- the LoRA adapter (peft ``save_pretrained``), ``value_head.safetensors`` and the tokenizer, for inference;
- ``training_state.pt``: the trainable weights, the optimiser state, the KL coefficient, the metrics so far,
  the prompt queue and every random number generator of every process, for an exact resume;
- ``trainer_state.json``, written last: the round count and a SHA-256 of every other file.

The directory is built under a temporary name and renamed into place, so a SIGKILL leaves either the
complete new checkpoint or none; the checksums catch later damage (a truncated copy, a bad disk).

A GRPO run's checkpoint is trl's (``checkpoint-N/`` as `transformers.Trainer` writes it: adapter, optimiser,
scheduler, ``rng_state*.pth``, trl's own ``trainer_state.json``) plus ``iif_state.pt`` (the filter's state, see
`llm_iif.grpo.trainer`) and, written last, ``manifest.json``: the steps completed and a SHA-256 of every other
file. `verify` reads whichever manifest a checkpoint has, so both kinds are checked alike.

What a checkpoint trusts: nothing in it runs code when it is loaded. ``training_state.pt`` holds only tensors
and plain Python values (RNG states included) and is read with ``torch.load(weights_only=True)``, which
refuses anything else; a GRPO resume first loads every pickle trl will load the same way (`check_grpo_pickles`),
so that a refused one is one line naming it. Every file must be listed in the manifest and match its checksum,
so a file added, removed or changed after the save is refused. The manifest's own values are checked too: their
types, and a count of rounds or steps that agrees with the checkpoint's name and the state it holds. The
checksums sit beside the files, so they catch damage, not tampering: whoever can write the directory can change
the weights a resume continues from, but not make it run their code.

`check_resumable` is the one resume check of both trainers: the run, the recipe, the count, and the number of
processes, which must be the one that saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from llm_iif.recipes import GRPORecipe, Recipe, load_recipe
from llm_iif.core.errors import UserError, first_line
from llm_iif.runs.paths import RunPaths
from llm_iif.core.fileio import write_directory_atomically

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
# A trl checkpoint's manifest: trl writes its own trainer_state.json, which the manifest then covers.
TRL_MANIFEST_FILE = "manifest.json"
IIF_STATE_FILE = "iif_state.pt"
TRAINING_STATE_KEYS = ("trainable", "optimizer", "kl_coef", "history", "prompt_queue", "prompt_rng",
                       "nonfinite_rounds_in_a_row", "rng")
# What each manifest counts the run's progress in: PPO rounds, or trl's optimiser steps.
COUNT_KEYS = {STATE_FILE: "rounds_completed", TRL_MANIFEST_FILE: "steps_completed"}
# Per kind of recipe: (its name, the manifest it resumes from, the run key that may change on resume, the unit).
RESUMABLE = {Recipe: ("PPO", STATE_FILE, "run.rounds", "rounds"),
             GRPORecipe: ("GRPO", TRL_MANIFEST_FILE, "run.steps", "steps")}
# The pickles a GRPO resume loads, all with ``weights_only``: trl's (whose RNG states hold numpy arrays) and ours.
GRPO_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", IIF_STATE_FILE)


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
    """``training_state.pt`` of a verified checkpoint, unpickled with ``weights_only=True``: tensors and plain
    Python values only, so a planted object cannot run code."""
    path = Path(checkpoint) / TRAINING_STATE_FILE
    state = load_plain(path, "training state")
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path}: not a training state (no {', '.join(missing)})")
    return state


def load_plain(path: Path, what: str, numpy: bool = False):
    """The pickle ``path`` unpickled with ``weights_only=True`` (tensors and plain Python values, and numpy
    arrays with ``numpy``, as transformers allows in its RNG states), on the CPU. Anything else is refused
    unloaded, in a one-line `UserError` naming the file and the object, as is a file torch cannot read;
    ``what`` names what the file should hold."""
    if numpy:
        from transformers.trainer_pt_utils import safe_globals

        allowed = safe_globals()
    else:
        allowed = contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch names the refused object on the line after its advice
        refused = next((line for line in str(err).splitlines() if "GLOBAL" in line), first_line(err))
        raise UserError(f"{path}: refused: it holds more than tensors and plain values, and loading it could "
                        f"run code ({refused.strip()})") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path}: not a readable {what} ({first_line(err)})") from err


def check_grpo_pickles(checkpoint: Path) -> None:
    """Load every pickle a GRPO resume will load from ``checkpoint`` as it will (`GRPO_PICKLES`), so that one it
    would refuse (a planted object) is reported in one line naming the file before anything is written, not as
    trl's traceback once the run's later outputs are gone."""
    for pattern in GRPO_PICKLES:
        for path in sorted(Path(checkpoint).glob(pattern)):
            load_plain(path, "checkpoint file", numpy=pattern.startswith("rng_state"))


def file_checksums(directory: Path, manifest: str = STATE_FILE) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` except the ``manifest`` itself, by relative path."""
    sums = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.relative_to(directory) != Path(manifest):
            sums[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def write_manifest(directory: Path, state: dict, manifest: str = STATE_FILE) -> None:
    """Write the ``manifest`` file: ``state`` plus the checksums of the files already in ``directory``."""
    checksums = file_checksums(directory, manifest)
    (Path(directory) / manifest).write_text(json.dumps({**state, "files": checksums}, indent=2))


def manifest_kind(checkpoint: Path) -> tuple[str, str]:
    """(manifest file, the state file it must list) of ``checkpoint``: a trl checkpoint's when it has
    ``manifest.json`` or trl's ``optimizer.pt``, else the PPO trainer's."""
    checkpoint = Path(checkpoint)
    if (checkpoint / TRL_MANIFEST_FILE).exists() or (checkpoint / "optimizer.pt").exists():
        return TRL_MANIFEST_FILE, IIF_STATE_FILE
    return STATE_FILE, TRAINING_STATE_FILE


def verify(checkpoint: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint; `UserError` naming what is wrong otherwise.

    Besides the checksums, the manifest's own values are checked, for the manifest is the one file they do not
    cover: each must have its type, and the count of rounds or steps must agree with the checkpoint's name
    (``checkpoint-N``) and with the state it holds (trl's ``global_step``, the PPO trainer's history), so that
    an edited count cannot make a resume skip rounds or take an unfinished run for a finished one."""
    manifest_name, state_file = manifest_kind(checkpoint)
    try:
        manifest = json.loads((Path(checkpoint) / manifest_name).read_bytes())
    except (OSError, ValueError) as err:
        raise UserError(f"{checkpoint}: not a complete checkpoint ({manifest_name} missing or unreadable)") from err
    _check_manifest_values(checkpoint, manifest_name, manifest)
    expected = manifest["files"]
    actual = file_checksums(checkpoint, manifest_name)
    if state_file not in expected:
        raise UserError(f"{checkpoint}: damaged checkpoint ({manifest_name} does not list {state_file})")
    for name, digest in expected.items():
        if name not in actual:
            raise UserError(f"{checkpoint}: damaged checkpoint ({name} is missing)")
        if actual[name] != digest:
            raise UserError(f"{checkpoint}: damaged checkpoint ({name} does not match its checksum)")
    unlisted = sorted(set(actual) - set(expected))
    if unlisted:
        raise UserError(f"{checkpoint}: {unlisted[0]} is not listed in {manifest_name}; a checkpoint holds only "
                        "the files it was saved with")
    _check_count(checkpoint, manifest_name, manifest)
    return manifest


def _check_manifest_values(checkpoint: Path, manifest_name: str, manifest) -> None:
    """`UserError` unless ``manifest`` holds ``files`` (file name -> checksum), its count of rounds or steps (an
    integer ≥ 0) and, if any, ``num_processes`` (an integer ≥ 1)."""
    def damaged(problem: str) -> UserError:
        return UserError(f"{checkpoint}: damaged checkpoint ({manifest_name}: {problem})")

    if not isinstance(manifest, dict):
        raise damaged(f"expected a JSON object, got {type(manifest).__name__}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(digest, str) for digest in files.values()):
        raise damaged(f"files: expected a mapping of file names to SHA-256 checksums, got {_shown(files)}")
    count = COUNT_KEYS[manifest_name]
    if not _is_count(manifest.get(count), 0):
        raise damaged(f"{count}: expected an integer, 0 or more, got {_shown(manifest.get(count))}")
    if "num_processes" in manifest and not _is_count(manifest["num_processes"], 1):
        raise damaged(f"num_processes: expected an integer, 1 or more, got {_shown(manifest['num_processes'])}")


def _check_count(checkpoint: Path, manifest_name: str, manifest: dict) -> None:
    """`UserError` unless the manifest's count agrees with the checkpoint's name and with the state it holds,
    whose files the checksums cover."""
    key = COUNT_KEYS[manifest_name]
    checkpoint, count = Path(checkpoint), manifest[key]
    named = RunPaths(checkpoint.parent).checkpoint(count).name
    if RunPaths.is_checkpoint(checkpoint) and checkpoint.name not in ("final", named):
        raise UserError(f"{checkpoint}: damaged checkpoint ({manifest_name}: {key} is {count}, but the checkpoint "
                        f"of {count} is named {named})")
    if manifest_name == TRL_MANIFEST_FILE:
        recorded, source = _trl_global_step(checkpoint), f"trl's {STATE_FILE} (global_step)"
    else:
        recorded, source = len(load_training_state(checkpoint)["history"]), f"{TRAINING_STATE_FILE} (its history)"
    if recorded != count:
        raise UserError(f"{checkpoint}: damaged checkpoint ({manifest_name}: {key} is {count}, but {source} "
                        f"has {recorded})")


def _trl_global_step(checkpoint: Path):
    """The optimiser steps trl's own trainer_state.json of ``checkpoint`` records."""
    try:
        return json.loads((checkpoint / STATE_FILE).read_bytes())["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{checkpoint}: damaged checkpoint (trl's {STATE_FILE} missing or unreadable)") from err


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _shown(value) -> str:
    """A manifest value as an error message shows it: its repr, or its type's name when that is long."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run, fewest completed rounds first. ``checkpoint-N/`` has completed N
    rounds and ``final/`` what its manifest says: after a finished run is extended, an interrupted
    ``checkpoint-N/`` can be newer than ``final/``. A ``final/`` whose manifest is unreadable ranks last, so
    that resuming reports it."""
    paths = RunPaths(run_dir)
    ranked = paths.numbered_checkpoints()
    if paths.final.is_dir():
        ranked.append((_rounds_completed(paths.final), paths.final))
    return [directory for _, directory in sorted(ranked, key=lambda entry: entry[0])]


def _rounds_completed(checkpoint: Path) -> float:
    """Rounds (PPO) or optimiser steps (GRPO) that ``checkpoint``'s manifest says it completed; inf when the
    manifest is unreadable or its count is not a count."""
    manifest_name = manifest_kind(checkpoint)[0]
    try:
        count = json.loads((checkpoint / manifest_name).read_bytes())[COUNT_KEYS[manifest_name]]
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf
    return count if _is_count(count, 0) else math.inf


def discard_checkpoints_after(run_dir: Path, rounds: int) -> None:
    """Delete the checkpoints of a run that completed more than ``rounds`` rounds, and the unfinished ones a
    killed save left behind: resumed after ``rounds``, the run directory reads as one run again."""
    for checkpoint in checkpoints_in(run_dir):
        if _rounds_completed(checkpoint) > rounds:
            logger.warning("removing %s: resuming after round %d replaces it", checkpoint, rounds)
            shutil.rmtree(checkpoint)
    for unfinished in RunPaths(run_dir).unfinished_checkpoints():
        logger.warning("removing %s, a checkpoint whose save was interrupted", unfinished)
        shutil.rmtree(unfinished, ignore_errors=True)


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
    """This process's random number generator states as tensors and plain values (what ``weights_only``
    loading accepts): python, numpy, torch (and CUDA), and ``generators``."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # uint32 array -> ints
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
              "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, generators: dict[str, torch.Generator]) -> None:
    """Put back what `rng_states` captured."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"],
                                                  "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}})
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, generator in generators.items():
        generator.set_state(states["generators"][name])


def load_checked(checkpoint: Path, paths: RunPaths, recipe: Recipe, num_processes: int) -> dict:
    """The training state of ``checkpoint``, after `check_resumable`."""
    check_resumable(checkpoint, paths, recipe, num_processes)
    return load_training_state(checkpoint)


def check_resumable(checkpoint: Path, paths: RunPaths, recipe: Recipe | GRPORecipe, num_processes: int) -> int:
    """The rounds (PPO) or steps (GRPO) ``checkpoint`` completed, after checking that it is a whole checkpoint of
    the run at ``paths`` written by ``recipe``'s trainer, that ``recipe`` differs from the run's saved recipe in
    its length (``run.rounds`` or ``run.steps``) at most, and that as many processes resume it as wrote it: each
    process's random generators and share of the batch are in the checkpoint, so under another number a resume
    would neither continue the run nor say so."""
    trainer, manifest_name, length, unit = RESUMABLE[type(recipe)]
    if Path(checkpoint).resolve().parent != paths.root.resolve():
        raise UserError(f"--resume: {checkpoint} is not in run.output_dir {paths.root}")
    manifest = verify(checkpoint)
    if manifest_kind(checkpoint)[0] != manifest_name:
        raise UserError(f"--resume: {checkpoint} is not a {trainer} checkpoint")
    changed = recipe_changes(load_recipe(paths.recipe, kind=type(recipe)), recipe) - {length, "run.output_dir"}
    if changed:
        raise UserError(f"--resume: the recipe differs from {paths.recipe} in {', '.join(sorted(changed))}; only "
                        f"{length} may change on resume")
    completed = manifest[COUNT_KEYS[manifest_name]]
    if getattr(recipe.run, unit) < completed:
        raise UserError(f"{length}: {checkpoint} has already completed {completed} {unit}; set {length} to more "
                        "to continue")
    written = manifest.get("num_processes", 1)
    if written != num_processes:
        raise UserError(f"--resume: {checkpoint} was written by {written} process(es); resume it with the same "
                        f"number, not {num_processes}")
    return completed


def finished(checkpoint: Path, recipe: Recipe | GRPORecipe) -> bool:
    """Whether resuming from ``checkpoint`` has nothing left to do: it is a run's ``final/``, it verifies, and it
    completed all of ``recipe``'s rounds or steps. A ``checkpoint-N/`` never is, whatever its count: a run
    stopped by a signal in its last round saved one, and resuming it saves ``final/``."""
    _, manifest_name, _, unit = RESUMABLE[type(recipe)]
    if Path(checkpoint).name != "final" or manifest_kind(checkpoint)[0] != manifest_name:
        return False
    return verify(checkpoint)[COUNT_KEYS[manifest_name]] == getattr(recipe.run, unit)


def recipe_changes(a: Recipe, b: Recipe) -> set[str]:
    """The ``section.key`` names whose values differ between two recipes."""
    da, db = a.to_dict(), b.to_dict()
    changed = set()
    for section in da.keys() | db.keys():
        va, vb = da.get(section), db.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):  # a section: name the keys that differ
            changed |= {f"{section}.{key}" for key in va.keys() | vb.keys() if va.get(key) != vb.get(key)}
        elif va != vb:  # a top-level value (a GRPO recipe's algorithm)
            changed.add(section)
    return changed
