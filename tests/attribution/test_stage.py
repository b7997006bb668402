"""`IIFStage`'s decision over every process's rows."""

import torch
from accelerate import Accelerator

from llm_iif.attribution.stage import IIFStage
from llm_iif.recipes import IIFConfig
from llm_iif.core.guards import NonfiniteGuard


def test_a_batch_without_rows_keeps_nothing():
    """GRPO's group filter can keep no completion of a generation batch, so IIF is asked to decide over none."""
    stage = IIFStage(IIFConfig(enabled=True, mode="random", p=0.5), Accelerator(cpu=True), None, None,
                     NonfiniteGuard(0), torch.Generator().manual_seed(0))
    selection = stage.select(None, None, 0)
    assert selection.keep.shape == (0,) and selection.influence is None
    assert selection.metrics["filtered"] == 1
