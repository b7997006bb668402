"""Layer 3 (beside `llm_iif.training`): IIF for GRPO as a drop-in subclass of trl's `GRPOTrainer`, with the group
filters it is compared with (DAPO's dynamic sampling, PODS)."""

from llm_iif.grpo.trainer import TRL_RANGE, GroupFilter, IIFGRPOTrainer

__all__ = ["IIFGRPOTrainer", "GroupFilter", "TRL_RANGE"]
