import os

# Tests never reach a model hub; a hub id must fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def tiny_recipe_dict(output_dir) -> dict:
    """A recipe for the built-in tiny model that runs a round in about a second."""
    return {
        "model": {"name_or_path": "builtin:tiny-sentiment"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
        "data": {"source": "builtin:review-prompts"},
        "reward": {"name": "vader"},
        "ppo": {"mini_batch_size": 4, "epochs": 2, "max_new_tokens": 8, "learning_rate": 1e-3},
        "run": {"rounds": 2, "batch_size": 8, "output_dir": str(output_dir), "log_samples": 2},
    }


@pytest.fixture(scope="session")
def tiny_model_dir():
    from llm_iif.lm.builtin import ensure_tiny_model

    return ensure_tiny_model()
