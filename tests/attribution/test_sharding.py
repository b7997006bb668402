"""Attribution on weights it cannot read: a stand-in for DeepSpeed ZeRO-3's partitioning in one process.

FSDP2 itself is tested on 2 processes (tests/training/test_trainer.py, tests/grpo/test_grpo_trainer.py).
"""

from pathlib import Path

import torch

from llm_iif.attribution.gradients import lora_layers, lora_parameters
from llm_iif.attribution.influence import TargetBatch, influence_scores, target_gradient_parts
from llm_iif.core.tokens import response_logprobs
from test_gradients import left_padded_batch, per_sample_losses, tiny_lora_model


class PartitionedLikeZero3:
    """Each LoRA weight becomes an empty tensor outside its layer's forward and backward passes, with its whole
    shape in ``ds_shape``, as DeepSpeed ZeRO-3 leaves a parameter on every process; module hooks put the
    weights back for the passes and take them away after, as ZeRO-3's gather and release do."""

    def __init__(self, model):
        self.whole = {}
        for layer in lora_layers(model).values():
            weight = layer.weight
            self.whole[weight] = weight.data
            weight.ds_shape = weight.shape
            weight.data = torch.empty(0)
            layer.register_forward_pre_hook(lambda module, args: self.gather(module))
            layer.register_forward_hook(lambda module, args, output: self.release(module))
            layer.register_full_backward_pre_hook(lambda module, grad_output: self.gather(module))
            layer.register_full_backward_hook(lambda module, grad_input, grad_output: self.release(module))

    def gather(self, module):
        module.weight.data = self.whole[module.weight]

    def release(self, module):
        module.weight.data = torch.empty(0)


def sequence_logprobs(model, query_ids, query_mask, response_ids, response_mask):
    ids, mask = torch.cat([query_ids, response_ids], dim=1), torch.cat([query_mask, response_mask], dim=1)
    return response_logprobs(model(input_ids=ids, attention_mask=mask).logits, response_ids, temperature=1.0)


def attribution(model, ids, mask, weights):
    """(the two halves' target gradients, [B] influence scores against their sum) for one batch."""
    rows = TargetBatch(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:], weights[:, 1:])
    halves = target_gradient_parts(model, rows, sequence_logprobs, torch.arange(len(ids)) % 2, 2, chunk_size=2)[0].parts
    target = {name: halves[0][name] + halves[1][name] for name in halves[0]}
    scores = influence_scores(model, lambda m, chunk: per_sample_losses(m, ids[chunk], mask[chunk], weights[chunk]),
                              len(ids), target, chunk_size=3, device="cpu")
    return halves, scores


def test_targets_and_scores_need_only_the_weights_inside_their_passes():
    """Target halves and influence scores on LoRA weights that are empty between passes (shapes from
    ``ds_shape``) equal those on whole weights: attribution reads the hooks' activations and output gradients,
    never the weights, so nothing has to be gathered for it."""
    ids, mask, weights = left_padded_batch([6, 3, 5, 6])
    expected_halves, expected_scores = attribution(tiny_lora_model("llama"), ids, mask, weights)

    model = tiny_lora_model("llama")
    PartitionedLikeZero3(model)
    assert all(p.numel() == 0 for p in lora_parameters(model).values())
    halves, scores = attribution(model, ids, mask, weights)
    for half, expected in zip(halves, expected_halves):
        assert half.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(half[name], expected[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-7)
    assert expected_scores.abs().min() > 0


def test_fsdp2_processes_with_unequal_rows_keep_in_step_and_score_as_one(tmp_path):
    """Rank 0 scores no row and rank 1 seven, in chunks of 2; the target's rows split 2 and 5. Without agreeing
    on the number of passes rank 1 would wait in a forward that rank 0 never joins (the timeout). The scores
    and the summed target equal one process's to 1e-5 of the largest."""
    import os
    import subprocess

    from conftest import accelerate_launch
    from unequal_rows_run import LENGTHS

    proc = subprocess.run([*accelerate_launch(2), str(Path(__file__).parent / "unequal_rows_run.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ids, mask, weights = left_padded_batch(LENGTHS)
    model = tiny_lora_model("llama")
    model.eval()
    rows = TargetBatch(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:], weights[:, 1:])
    parts = target_gradient_parts(model, rows, sequence_logprobs, torch.arange(len(LENGTHS)) % 2, 2,
                                  chunk_size=2)[0].parts
    target = {name: parts[0][name] + parts[1][name] for name in parts[0]}
    expected = influence_scores(model, lambda m, chunk: per_sample_losses(m, ids[chunk], mask[chunk], weights[chunk]),
                                len(LENGTHS), target, chunk_size=2, device="cpu")
    assert len(ranks[0]["scores"]) == 0
    assert (ranks[1]["scores"] - expected).abs().max() <= 1e-5 * expected.abs().max()
    for sharded, single in zip(ranks[1]["parts"], parts):
        for name in single:
            assert (sharded[name] - single[name]).abs().max() <= 1e-5 * single[name].abs().max(), name
