"""User-facing errors.

A `UserError` is bad input (a recipe, a path, a model id). The CLI prints its message as one line and
exits with code 2; anything else is a bug and keeps its traceback.
"""

from pathlib import Path

from safetensors import SafetensorError, safe_open

# What `from_pretrained` raises for a missing, unreadable or truncated model directory.
MODEL_LOAD_ERRORS = (OSError, ValueError, SafetensorError)


class UserError(Exception):
    """Bad input from the user; the message names the file, key or value and what was expected."""


class MissingExtra(UserError, ImportError):
    """An optional dependency group (a pip extra, e.g. ``classic``) that is not installed. A `UserError`, so
    the CLI prints it as one line with exit code 2, and an `ImportError`, as importing the library's module
    that needs the extra raises it."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type name when the message is empty (``StopIteration()``)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def model_load_problem(err: BaseException, name_or_path: str) -> str:
    """One line on why ``from_pretrained(name_or_path)`` raised ``err``, naming the damaged ``.safetensors``
    files of a local directory (safetensors' own message names none)."""
    if isinstance(err, SafetensorError):
        damaged = damaged_weight_files(name_or_path)
        if damaged:
            return f"{', '.join(damaged)}: damaged or truncated ({first_line(err)})"
    return first_line(err)


def damaged_weight_files(name_or_path: str) -> list[str]:
    """The ``.safetensors`` files of a local model directory that cannot be read ([] for a hub id)."""
    if not Path(name_or_path).is_dir():
        return []
    return [path.name for path in sorted(Path(name_or_path).glob("*.safetensors")) if not _readable(path)]


def _readable(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as tensors:
            tensors.keys()
        return True
    except (SafetensorError, OSError):
        return False
