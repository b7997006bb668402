"""Run outputs of an LM run: metrics, timings, samples, per-round records, trackers and the environment.

Paths come from `llm_iif.core.paths.RunPaths`; every file is written through `llm_iif.core.fileio`.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from llm_iif.core.errors import UserError

PACKAGES = ("llm_iif", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


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


def environment(accelerator) -> dict:
    """What a run trained with: Python, platform, package versions, device and process count."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    device = str(accelerator.device)
    if accelerator.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(accelerator.device)})"
    return {"python": sys.version.split()[0], "platform": platform.platform(), **versions, "device": device,
            "processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision)}

