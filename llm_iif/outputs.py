"""Run outputs, each written so that an interrupted run never leaves a half-written file behind.

- ``metrics.jsonl``: one JSON object per round, appended with a single flushed write;
- ``samples.jsonl``: a few (prompt, response, reward) rows per round;
- ``checkpoint-N/`` and ``final/``: see `llm_iif.checkpoints`, built in a temporary directory and renamed
  into place (`write_directory_atomically`);
- ``records/round_XXXX.parquet``: one row per rollout sample (prompt, response, reward, advantage, score, kept);
- ``reward_curve.png``: reward and KL per round.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from llm_iif.errors import UserError



def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given; mkstemp's files are private (0600)
_DIR_MODE = 0o777 & ~_umask()


def _publish(tmp, path: Path) -> None:
    """Give a finished temporary file the usual permissions and rename it over ``path``."""
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    _publish(tmp, path)


def write_parquet(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) as a parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    _publish(tmp, path)


TRACKERS = ("tensorboard", "wandb")


def open_trackers(names: list[str], output_dir: Path, run_name: str, recipe: dict) -> list:
    """Started Accelerate trackers (``tensorboard`` under OUTPUT/tensorboard/RUN_NAME, ``wandb`` under
    OUTPUT/wandb), each given the recipe, flattened to ``section.key`` values, as the run's configuration.
    Call on the main process only."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker
    from accelerate.utils import is_wandb_available

    config = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
              for section, values in recipe.items() for key, value in values.items()}
    trackers = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker(run_name, Path(output_dir) / "tensorboard")
        else:
            if not is_wandb_available():
                raise UserError("run.report_to: wandb needs `pip install wandb` (WANDB_MODE=offline logs "
                                "without a network)")
            tracker = WandBTracker(run_name, dir=str(output_dir))
        tracker.start()
        tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


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


def plot_reward_curve(history: list[dict], path: Path, title: str) -> None:
    """Mean reward (± one std) and KL to the reference per round, as a PNG."""
    plt = pyplot()
    rounds = [m["round"] for m in history]
    mean = [m["reward_mean"] for m in history]
    std = [m["reward_std"] for m in history]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_reward.plot(rounds, mean, label="mean reward")
    ax_reward.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                           alpha=0.2, label="± 1 std")
    ax_reward.set_xlabel("round")
    ax_reward.set_ylabel("reward")
    ax_reward.legend(loc="lower right")
    ax_kl.plot(rounds, [m["kl"] for m in history], color="tab:red")
    ax_kl.set_xlabel("round")
    ax_kl.set_ylabel("KL(π ‖ π_ref) per response")
    fig.suptitle(title)
    save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    path = Path(path)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    _publish(tmp, path)
