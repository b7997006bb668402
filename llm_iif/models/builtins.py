"""``builtin:NAME`` model names, resolved here, at the entry point, to cached local directories.

Components below this layer (the policy loader, `reward_models`) only ever see a hub id or a local path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path


from llm_iif.recipes import RewardConfig, RewardTrainRecipe, recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.lm.addition import ADDER_MODEL_NAME, HEDGING_ADDER_MODEL_NAME, ensure_tiny_adder, ensure_tiny_adder_hedging
from llm_iif.lm.builtin import (BUILTIN_PREFIX, TINY_MODEL_NAME, TINY_REWARD_MODEL_VERSION, TINY_REWARD_MODELS,
                                cache_dir, ensure_tiny_model, reproducible_build)
from llm_iif.lm.reasoning import REASONER_MODEL_NAME, ensure_tiny_reasoner
from llm_iif.models.reward_model import train_reward_model

logger = logging.getLogger(__name__)


def resolve_builtin(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Map ``builtin:NAME`` to its cached directory, building it on first use; pass others through.

    Built-ins: ``tiny-sentiment`` (the tiny GPT-2), ``tiny-reward-model`` (a classifier trained on
    ``builtin:tiny-preferences``), ``tiny-biased-reward-model`` (and ``-seed1``, ``-seed2``: trained on
    ``builtin:biased-preferences``), ``tiny-biased-reward-model-plus-trusted`` (trained on
    ``builtin:biased-plus-trusted-preferences``: those pairs plus ``builtin:trusted-preferences``, each trusted
    triple counted as 4 pairs), ``tiny-length-biased-reward-model`` (and ``-seed1``, ``-seed2``: trained on
    ``builtin:length-biased-preferences``), ``tiny-length-biased-reward-model-plus-trusted`` (on
    ``builtin:length-biased-plus-trusted-preferences``), ``tiny-adder`` (a character-level GPT-2 warmed up on
    sums), ``tiny-adder-hedging`` (the same, with about one warm-up answer in ten hedged among wrong candidates:
    `llm_iif.lm.addition.build_tiny_adder_hedging`) and ``tiny-reasoner`` (one warmed up on chains of running sums). ``key`` names the recipe key in
    errors."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    builders = _builders()
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name not in builders:
        raise UserError(f"{key}: unknown built-in model '{name_or_path}' "
                        f"(expected one of: {', '.join(BUILTIN_PREFIX + n for n in builders)})")
    return str(builders[name]())


def _builders() -> dict:
    """Built-in model name -> the function that returns its cached directory, building it on first use."""
    return {TINY_MODEL_NAME: ensure_tiny_model, ADDER_MODEL_NAME: ensure_tiny_adder,
            HEDGING_ADDER_MODEL_NAME: ensure_tiny_adder_hedging,
            REASONER_MODEL_NAME: ensure_tiny_reasoner,
            **{name: functools.partial(ensure_tiny_reward_model, name) for name in TINY_REWARD_MODELS}}


def ensure_tiny_reward_model(name: str) -> Path:
    """The cached directory of the built-in reward model ``name`` (`TINY_REWARD_MODELS`), trained with
    `llm-iif reward train`'s code on first use: the tiny GPT-2 with a one-label head, 1 epoch over 90% of its
    pairs (2,700 of ``builtin:tiny-preferences``, 900 of ``builtin:biased-preferences`` or
    ``builtin:length-biased-preferences``, 1,822 of the ``-plus-trusted`` sets), the other 10% held out for
    eval.json's accuracy."""
    pairs, seed = TINY_REWARD_MODELS[name]
    target = cache_dir() / f"{name}-{TINY_REWARD_MODEL_VERSION}"
    if not (target / "model" / "config.json").is_file():
        recipe = recipe_from_dict({"model": {"name_or_path": BUILTIN_PREFIX + TINY_MODEL_NAME},
                                   "data": {"source": pairs}, "train": {"epochs": 1, "max_length": 64},
                                   "run": {"output_dir": str(target), "seed": seed}}, source=BUILTIN_PREFIX + name,
                                  kind=RewardTrainRecipe)
        logger.warning("building %s%s (once; cached in %s)", BUILTIN_PREFIX, name, target)
        base_model = str(ensure_tiny_model())
        with reproducible_build():
            train_reward_model(recipe, base_model=base_model)
    return target / "model"


def resolve_reward_config(cfg: RewardConfig, key: str = "reward") -> RewardConfig:
    """``cfg`` with ``builtin:`` names (``name_or_path``, ``members``) replaced by their cached directories."""
    members = [resolve_builtin(member, key=f"{key}.members") for member in cfg.members]
    name_or_path = cfg.name_or_path and resolve_builtin(cfg.name_or_path, key=f"{key}.name_or_path")
    return dataclasses.replace(cfg, name_or_path=name_or_path, members=members)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm_iif.models.builtins [NAME ...]``: build the named built-in models (every one when none
    is named) into ``$LLM_IIF_CACHE`` now, rather than inside the first run or test that needs each one."""
    import sys

    for name in (sys.argv[1:] if argv is None else argv) or list(_builders()):
        start = time.perf_counter()
        name = BUILTIN_PREFIX + name.removeprefix(BUILTIN_PREFIX)
        try:
            path = resolve_builtin(name, key="NAME")
        except UserError as err:
            print(f"llm_iif.models.builtins: error: {err}", file=sys.stderr)
            return 2
        print(f"{name}: {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
