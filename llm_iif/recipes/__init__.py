"""Layer 0.25: recipes, one module per kind (`ppo`, `grpo`, `classic`, `reward`), what they share (`common`) and
the loader (YAML, ``--set``, type coercion and value checks: `loader`). Import any recipe name from here:

    from llm_iif.recipes import GRPOIIFConfig, load_recipe
"""

from llm_iif.recipes.common import (TrackerName, FilterMode, TargetName, PREFERENCE_COLUMNS, TargetSourceName,
                                    FILTER_MODES, TARGETS, TARGET_SOURCES, SEED_EXPECTED, is_seed, ModelConfig,
                                    LoraConfig, DataConfig, RewardConfig, IIFFilterConfig, TrustedConfig, EvalConfig,
                                    FILTER_OPERATORS, parse_filter)
from llm_iif.recipes.ppo import (PPOConfig, IIFConfig, RunConfig, Recipe)
from llm_iif.recipes.reward import (ClassifierBaseConfig, PreferenceDataConfig, RewardTrainingConfig, RewardRunConfig,
                                    RewardTrainRecipe)
from llm_iif.recipes.classic import (ClassicTargetName, ClassicGuard, CLASSIC_TARGETS, CLASSIC_GUARDS,
                                     ClassicEnvConfig, ClassicPPOConfig, ClassicIIFConfig, ClassicRunConfig,
                                     ClassicRecipe)
from llm_iif.recipes.grpo import (GroupFilterName, GRPOModelConfig, GRPODataConfig, GroupFilterConfig, GRPOIIFConfig,
                                  GRPORunConfig, RUN_OWNED_GRPO_FIELDS, GRPORewardModel, GRPORecipe)
from llm_iif.recipes.loader import (recipe_kind, load_recipe, recipe_from_dict, read_yaml_mapping, read_text)
from llm_iif.recipes import classic, common, grpo, ppo, reward

RECIPE_MODULES = (common, ppo, reward, classic, grpo)
"""The modules that define recipe dataclasses, whose field docstrings docs/recipes.md is made from."""

__all__ = ["TrackerName", "FilterMode", "TargetName", "PREFERENCE_COLUMNS", "TargetSourceName", "FILTER_MODES",
           "TARGETS", "TARGET_SOURCES", "SEED_EXPECTED", "is_seed", "ModelConfig", "LoraConfig", "DataConfig",
           "RewardConfig", "IIFFilterConfig", "TrustedConfig", "EvalConfig", "FILTER_OPERATORS", "parse_filter",
           "PPOConfig", "IIFConfig", "RunConfig", "Recipe", "ClassifierBaseConfig", "PreferenceDataConfig",
           "RewardTrainingConfig", "RewardRunConfig", "RewardTrainRecipe", "ClassicTargetName", "ClassicGuard",
           "CLASSIC_TARGETS", "CLASSIC_GUARDS", "ClassicEnvConfig", "ClassicPPOConfig", "ClassicIIFConfig",
           "ClassicRunConfig", "ClassicRecipe", "GroupFilterName", "GRPOModelConfig", "GRPODataConfig",
           "GroupFilterConfig", "GRPOIIFConfig", "GRPORunConfig", "RUN_OWNED_GRPO_FIELDS", "GRPORewardModel",
           "GRPORecipe", "recipe_kind", "load_recipe", "recipe_from_dict", "read_yaml_mapping", "read_text", "classic",
           "common", "grpo", "ppo", "reward", "RECIPE_MODULES"]
