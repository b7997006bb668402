"""Reward models behind one interface, chosen by ``reward.name`` in a recipe.

A reward model is a callable ``(prompts: list[str], responses: list[str]) -> list[float]``: decoded text in,
one score per sample out. The trainer checks every score for NaN/inf, so implementations need not.
To add one, write a class with that ``__call__`` and register a constructor in `REWARD_MODELS`.
"""

from __future__ import annotations

from typing import Callable, Protocol

from llm_iif.core.errors import UserError
from reward_models.hf_classifier import HFClassifierReward
from reward_models.python_callable import CallableReward
from reward_models.vader import VaderReward


class RewardModel(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def _vader(cfg, device) -> RewardModel:
    return VaderReward()


def _hf_classifier(cfg, device) -> RewardModel:
    import torch

    return HFClassifierReward(cfg.name_or_path, label=cfg.label, output=cfg.output, input=cfg.input,
                              append_eos=cfg.append_eos, batch_size=cfg.batch_size, max_length=cfg.max_length, device=cfg.device or device,
                              dtype=getattr(torch, cfg.dtype))


def _callable(cfg, device) -> RewardModel:
    return CallableReward(cfg.function)


REWARD_MODELS: dict[str, Callable] = {"vader": _vader, "hf-classifier": _hf_classifier, "callable": _callable}


def load_reward_model(cfg, device="cpu") -> RewardModel:
    """Build the reward model named by ``cfg.name`` (a `llm_iif.config.RewardConfig`)."""
    if cfg.name not in REWARD_MODELS:
        raise UserError(f"reward.name: unknown reward model '{cfg.name}' "
                        f"(expected one of: {', '.join(REWARD_MODELS)})")
    return REWARD_MODELS[cfg.name](cfg, device)
