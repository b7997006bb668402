"""Reward models behind one interface, chosen by ``reward.name`` in a recipe.

A reward model is a callable ``(prompts: list[str], responses: list[str], **columns) -> list[float]``: decoded
text in, one score per sample out. ``columns`` are the prompts' other dataset columns, one list each, as trl hands
its reward functions (e.g. ``answer`` for `reward_models.math_verifier.answer_reward`); a model that does not read
them ignores them. The trainer checks every score for NaN/inf, so implementations need not.
To add one, write a class with that ``__call__`` and register a constructor in `REWARD_MODELS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from llm_iif.core.errors import UserError
from reward_models.ensemble import ConservativeEnsembleReward
from reward_models.hf_classifier import HFClassifierReward
from reward_models.python_callable import CallableReward
from reward_models.vader import VaderReward


class RewardModel(Protocol):
    def __call__(self, prompts: list[str], responses: list[str], **columns: list) -> list[float]: ...


def _vader(cfg, device, section: str) -> RewardModel:
    return VaderReward()


def _hf_classifier(cfg, device, section: str, key: str | None = None) -> RewardModel:
    import torch

    return HFClassifierReward(cfg.name_or_path, label=cfg.label, output=cfg.output, input=cfg.input,
                              append_eos=cfg.append_eos, chat_template=cfg.chat_template,
                              batch_size=cfg.batch_size, max_length=cfg.max_length,
                              device=cfg.device or device, dtype=getattr(torch, cfg.dtype),
                              key=key or f"{section}.name_or_path", section=section)


def _callable(cfg, device, section: str) -> RewardModel:
    return CallableReward(cfg.function, key=f"{section}.function")


def _conservative_ensemble(cfg, device, section: str) -> RewardModel:
    """Each member an hf-classifier with ``cfg``'s settings, from one of ``cfg.members``."""
    if len(cfg.members) < 2:
        raise UserError(f"{section}.members: conservative-ensemble needs at least 2 reward models "
                        f"(got {len(cfg.members)})")
    return ConservativeEnsembleReward([_hf_classifier(dataclasses.replace(cfg, name_or_path=member), device,
                                                      section, key=f"{section}.members[{i}]")
                                       for i, member in enumerate(cfg.members)])


REWARD_MODELS: dict[str, Callable] = {"vader": _vader, "hf-classifier": _hf_classifier, "callable": _callable,
                                      "conservative-ensemble": _conservative_ensemble}


def load_reward_model(cfg, device="cpu", section: str = "reward") -> RewardModel:
    """Build the reward model named by ``cfg.name`` (a `llm_iif.config.RewardConfig`); ``section`` is the recipe
    section it comes from, for errors."""
    if cfg.name not in REWARD_MODELS:
        raise UserError(f"{section}.name: unknown reward model '{cfg.name}' "
                        f"(expected one of: {', '.join(REWARD_MODELS)})")
    return REWARD_MODELS[cfg.name](cfg, device, section)
