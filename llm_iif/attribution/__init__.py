"""Layer 1: attribution over any model. Exact per-sample gradients of Linear, Conv2d and LoRA layers from one
batched backward, influence scores against a target gradient, filters, and the IIF stage that any trainer
can call (`IIFStage`)."""

from llm_iif.attribution.filters import filter_mask
from llm_iif.attribution.gradients import (LayerGradientCapture, LoraGradientCapture, grad_cosine, grad_dot,
                                           lora_layers, lora_parameters, scored_layers, scored_parameters)
from llm_iif.attribution.influence import TargetBatch
from llm_iif.attribution.stage import IIFStage, Selection

__all__ = ["filter_mask", "LayerGradientCapture", "LoraGradientCapture", "grad_cosine", "grad_dot", "lora_layers",
           "lora_parameters", "scored_layers", "scored_parameters", "IIFStage", "Selection", "TargetBatch"]
