"""Writing files so that an interrupted run never leaves a half-written one behind.

Every writer here builds the file (or directory) under a temporary name beside its destination and renames
it into place; appended JSONL lines go out in one flushed write each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given; mkstemp's files are private (0600)
_DIR_MODE = 0o777 & ~_umask()


@contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """Yield a temporary path beside ``path`` to write the file at; on success it gets the usual permissions
    and is renamed over ``path``, on an error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_parquet(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) as a parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one line of JSON; NaN and inf values (a reward function's, say) become null, which
    JSON has, where Python's bare NaN is not JSON."""
    with open(path, "a") as f:
        f.write(json.dumps({key: _finite_or_none(value) for key, value in record.items()}, allow_nan=False) + "\n")
        f.flush()


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(the rows of a JSONL file that parse, the number of lines that do not): a line torn by a killed write is
    left out and counted. A missing file has no rows."""
    rows, torn = [], 0
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            torn += 1
    return rows, torn


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_directory_atomically(directory: Path, write) -> None:
    """Call ``write(tmp)`` to fill a fresh temporary directory, then swap it in for ``directory``: a reader
    never sees a half-written directory, and an interrupted write leaves the previous one in place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write(tmp)
        os.chmod(tmp, _DIR_MODE)
        if directory.exists():
            old = directory.with_name(f".{directory.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

