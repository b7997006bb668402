"""Score unequal numbers of rows on two processes of an FSDP2-sharded model, under ``accelerate launch``.

``python tests/attribution/unequal_rows_run.py OUT_DIR``: rank 0 scores none of the 7 rows of
`test_gradients.left_padded_batch` and rank 1 all of them, in chunks of 2 (4 forward and backward passes); for
the target, rank 0 takes rows 0-1 (1 chunk) and rank 1 rows 2-6 (3 chunks). Every forward of a sharded model
gathers weights from both processes, so a process that ran fewer passes would leave the other waiting. Writes
OUT_DIR/rank{r}.pt: this process's scores and the target parts summed over both processes.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # tests/
from test_gradients import left_padded_batch, per_sample_losses, tiny_lora_model  # noqa: E402
from test_sharding import sequence_logprobs  # noqa: E402

from llm_iif.attribution.influence import TargetBatch, influence_scores, target_gradient_parts  # noqa: E402
from llm_iif.core.distributed import shard_with_fsdp2  # noqa: E402

LENGTHS = [6, 3, 5, 6, 4, 6, 2]


def idle(model):
    token = torch.zeros(1, 1, dtype=torch.long)
    return 0.0 * sequence_logprobs(model, token, torch.ones_like(token), token, torch.ones_like(token)).sum(dim=1)


if __name__ == "__main__":
    accelerator = Accelerator()
    rank = accelerator.process_index
    model = tiny_lora_model("llama")
    shard_with_fsdp2(model, ["LlamaDecoderLayer"], generating=model.base_model.model)
    model.eval()
    ids, mask, weights = left_padded_batch(LENGTHS)
    rows = TargetBatch(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:], weights[:, 1:])
    mine = torch.arange(2) if rank == 0 else torch.arange(2, len(LENGTHS))
    my_rows = TargetBatch(*(getattr(rows, name)[mine] for name in TargetBatch.__dataclass_fields__))
    parts = target_gradient_parts(model, my_rows, sequence_logprobs, mine % 2, 2, chunk_size=2, idle=idle)[0].parts
    for part in parts:
        for tensor in part.values():
            torch.distributed.all_reduce(tensor)
    target = {name: parts[0][name] + parts[1][name] for name in parts[0]}
    scored = [] if rank == 0 else list(range(len(LENGTHS)))
    scores = influence_scores(model, lambda m, chunk: per_sample_losses(m, ids[scored][chunk], mask[scored][chunk],
                                                                        weights[scored][chunk]),
                              len(scored), target, chunk_size=2, device="cpu", idle=idle)
    torch.save({"scores": scores, "parts": parts}, Path(sys.argv[1]) / f"rank{rank}.pt")
    accelerator.end_training()
