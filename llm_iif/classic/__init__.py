"""Layer 2: IIF for classic control through Stable-Baselines3 (`IIFPPO`, a drop-in subclass of SB3's PPO).

Needs the ``classic`` extra: ``pip install 'llm_iif[classic]'``."""

from llm_iif.core.imports import require_classic

require_classic()  # without the classic extra: an ImportError naming it, not SB3's ModuleNotFoundError

from llm_iif.classic.iif_ppo import IIFPPO  # noqa: E402

__all__ = ["IIFPPO"]
