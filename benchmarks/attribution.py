"""Time influence scoring against a plain PPO backward and against a per-sample autograd loop.

    .venv/bin/python benchmarks/attribution.py [--samples 256] [--repeats 3] [--skip-large]

On one rollout buffer of ``--samples`` left-padded prompts (8 tokens) with responses of 4-16 tokens, and in
the same process, it times:
  (a) one forward + backward of the summed PPO loss over the buffer (what an update step costs);
  (b) hook-based scoring: the same forward + backward inside a streaming `LoraGradientCapture`;
  (c) the per-sample autograd loop: one forward + backward per sample, then a dot product with the target.
All three run in chunks of 64 samples. It prints the median of ``--repeats`` timings and the ratios b/a
and c/b, for the built-in tiny model and for a randomly initialised GPT-2 with about 50M parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_iif.attribution import influence
from llm_iif.attribution.gradients import LoraGradientCapture, grad_dot, lora_parameters
from llm_iif.cli import quiet_libraries
from llm_iif.recipes import PPOConfig
from llm_iif.lm.policy import PolicyWithValueHead
from llm_iif.core.records import Rollout
from llm_iif.lm.generation import score_tokens

CHUNK = 64  # the score_batch_size of the tiny recipes (recipes/tiny-sentiment.yaml)


def lora_policy(base) -> PolicyWithValueHead:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      init_lora_weights=False)
    return PolicyWithValueHead(get_peft_model(base, lora)).eval()


def tiny_model():
    from transformers import AutoModelForCausalLM

    from llm_iif.lm.builtin import ensure_tiny_model

    return AutoModelForCausalLM.from_pretrained(ensure_tiny_model())


def large_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=8192, n_positions=64, n_embd=512, n_layer=14, n_head=8)
    return GPT2LMHeadModel(config)


def rollout_buffer(policy, samples: int, vocab: int, generator: torch.Generator) -> Rollout:
    """A rollout of random tokens: 8 prompt tokens, 4-16 response tokens, real log-probs and values."""
    prompt_len, response_len = 8, 16
    query_ids = torch.randint(1, vocab, (samples, prompt_len), generator=generator)
    query_mask = torch.ones_like(query_ids)
    response_ids = torch.randint(1, vocab, (samples, response_len), generator=generator)
    lengths = torch.randint(4, response_len + 1, (samples,), generator=generator)
    response_mask = (torch.arange(response_len)[None] < lengths[:, None]).long()
    tokens = score_tokens(policy, query_ids, query_mask, response_ids, response_mask, 1.0, CHUNK)
    scores = torch.randn(samples, generator=generator)
    return Rollout([""] * samples, [""] * samples, query_ids, query_mask, response_ids, response_mask, scores,
                   **tokens)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, base, samples: int, repeats: int) -> None:
    torch.manual_seed(0)
    policy = lora_policy(base)
    generator = torch.Generator().manual_seed(0)
    rollout = rollout_buffer(policy, samples, base.config.vocab_size, generator)
    advantages = torch.randn(rollout.response_ids.shape, generator=generator) * rollout.response_mask
    returns = torch.randn(rollout.response_ids.shape, generator=generator) * rollout.response_mask
    params = lora_parameters(policy)
    target = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    cfg = PPOConfig()
    tokens = rollout.response_mask.sum().item() / samples
    chunks = torch.split(torch.arange(samples), CHUNK)

    def losses(index):
        return influence.per_sample_ppo_losses(policy, rollout.select(index), advantages[index], returns[index],
                                               cfg, "full", tokens)

    def plain_backward():
        for index in chunks:
            torch.autograd.grad(losses(index).sum(), list(params.values()))

    def hook_scoring():
        for index in chunks:
            with LoraGradientCapture(policy, target=target) as capture:
                torch.autograd.grad(losses(index).sum(), list(params.values()))
            capture.scores()

    def per_sample_loop():
        for i in range(samples):
            grads = torch.autograd.grad(losses(torch.tensor([i]))[0], list(params.values()))
            grad_dot(dict(zip(params, grads)), target)

    a = median_seconds(plain_backward, repeats)
    b = median_seconds(hook_scoring, repeats)
    c = median_seconds(per_sample_loop, 1)
    n_params = sum(p.numel() for p in policy.parameters())
    n_lora = sum(p.numel() for p in params.values())
    print(f"{name:<10} {n_params / 1e6:>7.1f}M {n_lora / 1e6:>6.2f}M {samples:>7} {a:>8.3f} {b:>8.3f} {c:>9.2f} "
          f"{b / a:>6.2f} {c / b:>6.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="only the tiny model")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    print(f"{'model':<10} {'params':>8} {'LoRA':>7} {'samples':>7} {'(a) s':>8} {'(b) s':>8} {'(c) s':>9} "
          f"{'b/a':>6} {'c/b':>6}")
    measure("tiny", tiny_model(), args.samples, args.repeats)
    if not args.skip_large:
        measure("gpt2-50M", large_model(), args.samples, args.repeats)


if __name__ == "__main__":
    main()
