"""Layer 3 (beside `llm_iif.training`): IIF for GRPO as a drop-in subclass of trl's `GRPOTrainer`, with the group
filters it is compared with (DAPO's dynamic sampling, PODS) and trusted triples (`TrustedSet`)."""

from llm_iif.grpo.groups import GroupFilter
from llm_iif.grpo.trainer import TRL_RANGE, IIFGRPOTrainer
from llm_iif.grpo.trusted import TrustedSet

__all__ = ["IIFGRPOTrainer", "GroupFilter", "TrustedSet", "TRL_RANGE"]
