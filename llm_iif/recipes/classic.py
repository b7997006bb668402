"""The classic-control recipe (recipes/classic/, `llm-iif classic ...`): SB3 PPO with IIF."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from llm_iif.recipes.common import FilterMode, SEED_EXPECTED, _value, is_seed, requirement
ClassicTargetName = Literal["return"]
ClassicGuard = Literal["none", "positive-advantage", "rewarded"]
CLASSIC_TARGETS: tuple[str, ...] = typing.get_args(ClassicTargetName)
CLASSIC_GUARDS: tuple[str, ...] = typing.get_args(ClassicGuard)


# ---------------------------------------------------------------------------------------------- classic RL
# recipes/classic/*.yaml: Stable-Baselines3 PPO (+ IIF) on a gymnasium environment. Defaults are the paper's.

@dataclass
class ClassicEnvConfig:
    id: str
    """A gymnasium environment id, e.g. FrozenLake-v1."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for gymnasium.make, e.g. {is_slippery: false}."""
    wrapper: Optional[str] = None
    """A gymnasium wrapper class applied to every environment, as module:Class, e.g.
    minigrid.wrappers:ImgObsWrapper."""
    n_envs: int = 1


@dataclass
class ClassicPPOConfig:
    policy: Literal["MlpPolicy", "CnnPolicy"] = "MlpPolicy"
    features_extractor: Literal["default", "small-cnn"] = "default"
    """default: SB3's for the policy; small-cnn: the paper's MiniGrid CNN (conv 16 3x3, conv 32 3x3, linear 64)."""
    n_steps: int = 2048
    """Transitions per environment per round; the buffer holds n_steps × n_envs."""
    batch_size: int = 64
    n_epochs: int = 10
    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = 5.0e-3
    ent_coef: float = 0.0
    clip_range: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass
class ClassicIIFConfig:
    mode: FilterMode = "neg-bottom"
    p: float = 0.5
    target: ClassicTargetName = "return"
    precondition: Literal["none", "adam"] = "none"
    """``adam`` (with ``ppo.optimizer: adam``) preconditions the target with the optimiser's second moments, as
    the LM recipes' ``iif.precondition``."""
    average_identical: bool = False
    """Score each transition by the mean score of its identical records (same observation, action, log-prob and
    raw advantage), as the paper's code does."""
    guard: ClassicGuard = "none"
    """Transitions never dropped, whatever their score: ``positive-advantage`` (raw GAE advantage > 0) or
    ``rewarded`` (reward > 0); ``none`` filters on the scores alone."""


@dataclass
class ClassicRunConfig:
    rounds: int
    seed: int = 0
    eval_episodes: int = 100
    """Episodes of the stochastic policy played after every round for the test return."""
    output_dir: str = "runs/classic"


@dataclass
class ClassicRecipe:
    env: ClassicEnvConfig
    run: ClassicRunConfig
    ppo: ClassicPPOConfig = field(default_factory=ClassicPPOConfig)
    iif: ClassicIIFConfig = field(default_factory=ClassicIIFConfig)

    def check(self, source: str) -> None:
        require = requirement(self, source)
        for key in ("env.n_envs", "ppo.n_steps", "ppo.batch_size", "ppo.n_epochs", "run.rounds", "run.eval_episodes"):
            require(_value(self, key) > 0, key, "a positive integer")
        for key in ("ppo.learning_rate", "ppo.clip_range", "ppo.max_grad_norm"):
            require(_value(self, key) > 0, key, "a positive number")
        require(0.0 <= self.ppo.gamma <= 1.0, "ppo.gamma", "a value in [0, 1]")
        require(0.0 <= self.ppo.gae_lambda <= 1.0, "ppo.gae_lambda", "a value in [0, 1]")
        require(is_seed(self.run.seed), "run.seed", SEED_EXPECTED)
        require(0.0 <= self.iif.p <= 1.0, "iif.p", "a value in [0, 1]")
        if self.env.wrapper is not None:
            require(self.env.wrapper.count(":") == 1, "env.wrapper", "an import path module:Class")
        require(self.ppo.features_extractor == "default" or self.ppo.policy == "CnnPolicy", "ppo.features_extractor",
                "default with MlpPolicy (small-cnn needs ppo.policy: CnnPolicy)")
        require(self.iif.precondition == "none" or self.ppo.optimizer == "adam", "iif.precondition",
                "none with ppo.optimizer: sgd (adam preconditioning needs Adam's second moments)")
