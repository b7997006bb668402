"""llm_iif: PPO for causal language models that scores every self-generated sample by its influence on a
validation target and trains on the helpful ones (Iterative Influence-based Filtering)."""

__version__ = "0.1.0"
