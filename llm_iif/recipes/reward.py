"""The reward-model recipe (`llm-iif reward train`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llm_iif.recipes.common import LoraConfig, SEED_EXPECTED, _value, is_seed, requirement


# ---------------------------------------------------------------------------------------------- reward models
# recipes/*-reward-model.yaml: `llm-iif reward train`, a sequence classifier trained on preference pairs.

@dataclass
class ClassifierBaseConfig:
    name_or_path: str
    """The model the reward model starts from (a one-label classification head is added): a hub id, a local
    directory, or builtin:tiny-sentiment."""


@dataclass
class PreferenceDataConfig:
    source: str
    """builtin:tiny-preferences, a local .json/.jsonl/.parquet file, or a `datasets` hub id."""
    split: str = "train"
    prompt_column: Optional[str] = "prompt"
    """null for pairs without a prompt; otherwise the prompt is put before both responses."""
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    validation_fraction: float = 0.1
    """Held-out pairs for the pairwise accuracy."""


@dataclass
class RewardTrainingConfig:
    epochs: float = 1.0
    learning_rate: float = 1.0e-3
    batch_size: int = 32
    max_length: int = 128
    """Pairs with a longer chosen or rejected text (in tokens) are left out, as trl's RewardTrainer does."""
    use_lora: bool = False
    """Train LoRA adapters (shaped by the lora section) plus the head, then merge them into the saved model."""


@dataclass
class RewardRunConfig:
    output_dir: str = "runs/reward-model"
    seed: int = 0


@dataclass
class RewardTrainRecipe:
    model: ClassifierBaseConfig
    data: PreferenceDataConfig
    train: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RewardRunConfig = field(default_factory=RewardRunConfig)

    def check(self, source: str) -> None:
        require = requirement(self, source)
        require(0.0 < self.data.validation_fraction < 1.0, "data.validation_fraction", "a value in (0, 1)")
        require(is_seed(self.run.seed), "run.seed", SEED_EXPECTED)
        for key in ("train.epochs", "train.learning_rate", "train.batch_size", "train.max_length", "lora.r"):
            require(_value(self, key) > 0, key, "a positive number")
