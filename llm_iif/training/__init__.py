"""Layer 3: the LM PPO trainer and what surrounds it (the factory, in-run scoring, the LDS check).

    from llm_iif.recipes import load_recipe
    from llm_iif.training import build_trainer

    history = build_trainer(load_recipe("recipes/tiny-sentiment.yaml")).train()
"""

from llm_iif.training.factory import build_trainer
from llm_iif.training.trainer import PPOTrainer, TrainerParts

__all__ = ["build_trainer", "PPOTrainer", "TrainerParts"]
