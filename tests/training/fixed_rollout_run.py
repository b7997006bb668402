"""Train a recipe with fixed responses in place of sampled ones, then save this process's LoRA weights.

``python tests/training/fixed_rollout_run.py RECIPE OUT_DIR [--fsdp2 LAYER_CLASS] [--resume CHECKPOINT]``, as one
process or under ``accelerate launch``; ``--fsdp2`` shards the policy with FSDP2 around that decoder layer class,
``--resume`` continues the run from one of its checkpoints. Each prompt always
gets the same response, so runs with different process counts see the same rollouts and their filtering
decisions can be compared sample by sample.
"""

import argparse
from pathlib import Path

import torch

from llm_iif.core.distributed import is_sharded, whole_state, whole_tensor
from llm_iif.training import build_trainer
from llm_iif.recipes import load_recipe
from llm_iif.lm.generation import tokenize_pairs

RESPONSES = [" great and fun .", " dull but fine , really .", " awful and slow .", " good .", " bad"]


def fixed_responses(lm, tokenizer, prompts, cfg, device):
    responses = [RESPONSES[sum(map(ord, prompt)) % len(RESPONSES)] for prompt in prompts]
    return tokenize_pairs(tokenizer, prompts, responses, device)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe"), parser.add_argument("out_dir", type=Path)
    parser.add_argument("--fsdp2", action="append"), parser.add_argument("--resume", type=Path)
    args = parser.parse_args()
    trainer = build_trainer(load_recipe(args.recipe), sampler=fixed_responses, fsdp2_layers=args.fsdp2)
    history = trainer.train(resume_from=args.resume)
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    assert is_sharded(policy) == bool(args.fsdp2)
    assert [m.get("preconditioned", 0) for m in history] == [0, int(trainer.recipe.iif.precondition == "adam")]
    weights = {name: whole_tensor(p).detach().cpu() for name, p in policy.named_parameters() if p.requires_grad}
    if args.fsdp2:  # a checkpoint gathers the trainable tensors only: no frozen weight, nor the tied lm_head
        gathered, _ = whole_state(policy, trainer.optimizer)
        assert gathered.keys() == weights.keys(), sorted(gathered.keys() ^ weights.keys())[:3]
        assert all(torch.equal(gathered[name], weights[name]) for name in weights)
    accelerator = trainer.accelerator
    torch.save(weights, args.out_dir / f"weights_rank{accelerator.process_index}.pt")
    del trainer, policy  # released before the process group is destroyed, as llm-iif train does
    accelerator.free_memory()
    accelerator.end_training()
