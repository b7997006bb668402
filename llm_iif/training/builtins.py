"""``builtin:NAME`` model names, resolved here, at the entry point, to cached local directories.

Components below this layer (the policy loader, `reward_models`) only ever see a hub id or a local path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from llm_iif.core.config import RewardConfig, RewardTrainRecipe, recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.lm.addition import ADDER_MODEL_NAME, ensure_tiny_adder
from llm_iif.lm.builtin import (BUILTIN_PREFIX, TINY_MODEL_NAME, TINY_REWARD_MODEL_NAME, TINY_REWARD_MODEL_VERSION,
                                cache_dir, ensure_tiny_model)
from llm_iif.lm.reasoning import REASONER_MODEL_NAME, ensure_tiny_reasoner
from llm_iif.training.reward_model import train_reward_model

logger = logging.getLogger(__name__)


def resolve_builtin(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Map ``builtin:NAME`` to its cached directory, building it on first use; pass others through.

    Built-ins: ``tiny-sentiment`` (the tiny GPT-2), ``tiny-reward-model`` (a classifier trained on
    ``builtin:tiny-preferences``), ``tiny-adder`` (a character-level GPT-2 warmed up on sums) and
    ``tiny-reasoner`` (one warmed up on chains of running sums). ``key`` names the recipe key in errors."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    builders = {TINY_MODEL_NAME: ensure_tiny_model, TINY_REWARD_MODEL_NAME: ensure_tiny_reward_model,
                ADDER_MODEL_NAME: ensure_tiny_adder, REASONER_MODEL_NAME: ensure_tiny_reasoner}
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name not in builders:
        raise UserError(f"{key}: unknown built-in model '{name_or_path}' "
                        f"(expected one of: {', '.join(BUILTIN_PREFIX + n for n in builders)})")
    return str(builders[name]())


def ensure_tiny_reward_model() -> Path:
    """The cached tiny reward model directory, trained with `llm-iif reward train`'s code on first use: the
    tiny GPT-2 with a one-label head, 1 epoch over the 2,700 training pairs of ``builtin:tiny-preferences``."""
    target = cache_dir() / f"{TINY_REWARD_MODEL_NAME}-{TINY_REWARD_MODEL_VERSION}"
    if not (target / "model" / "config.json").is_file():
        recipe = recipe_from_dict({"model": {"name_or_path": BUILTIN_PREFIX + TINY_MODEL_NAME},
                                   "data": {"source": "builtin:tiny-preferences"},
                                   "train": {"epochs": 1, "max_length": 64},
                                   "run": {"output_dir": str(target)}}, source="builtin:tiny-reward-model",
                                  kind=RewardTrainRecipe)
        logger.warning("building builtin:tiny-reward-model (once; cached in %s)", target)
        with torch.random.fork_rng(devices=[]):
            train_reward_model(recipe, base_model=str(ensure_tiny_model()))
    return target / "model"



def resolve_reward_config(cfg: RewardConfig, key: str = "reward") -> RewardConfig:
    """``cfg`` with a ``builtin:`` ``name_or_path`` replaced by its cached directory."""
    if cfg.name_or_path is None:
        return cfg
    return dataclasses.replace(cfg, name_or_path=resolve_builtin(cfg.name_or_path, key=f"{key}.name_or_path"))

