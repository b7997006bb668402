"""Layer 2: IIF for classic control through Stable-Baselines3 (`IIFPPO`, a drop-in subclass of SB3's PPO)."""

from llm_iif.classic.iif_ppo import IIFPPO

__all__ = ["IIFPPO"]
