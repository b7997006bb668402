"""An offline verifiable-reward task for GRPO: a tiny GPT-2 that adds 2-3 digit numbers, and exact-match rewards.

Nothing is downloaded. `addition_problems` writes prompts like ``"047+385="`` (operands zero-padded to three
digits) with their answers, and `ensure_tiny_adder` builds a character-level tokenizer and a small GPT-2, warms
the model up on worked sums only until sampling at temperature 1 gets about 35-40% of the answers right, and
caches both under ``$LLM_IIF_CACHE`` (default ``~/.cache/llm_iif``). The reward is checkable, so GRPO has a clear
signal to climb: `exact_match_reward` pays 1 for the right number and `format_reward` for any plausible one.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from llm_iif.lm.builtin import ensure_built
from llm_iif.lm.char_tasks import character_gpt2, character_tokenizer, completion_text, sampled_accuracy, warm_up


ADDER_MODEL_NAME = "tiny-adder"


# Bump when the problems, tokenizer or warm-up change so stale caches are not reused (v1 was a draft with
# unpadded operands).
ADDER_MODEL_VERSION = "v2"


ADDER_CHARACTERS = "0123456789+="


# The warm-up draws from its own seed, well away from the small seeds callers use for GRPO and evaluation sets.
WARMUP_SEED_OFFSET = 10_000


_NUMBER = re.compile(r"\d{1,4}")


def addition_problems(num: int, seed: int) -> list[dict]:
    """``num`` rows ``{"prompt": "047+385=", "answer": "432"}``: 2- or 3-digit operands, written zero-padded to
    three digits, and their sum without padding (deterministic in ``seed``).

    The padding keeps every prompt eight tokens long, which matters for a model with learned absolute positions
    such as GPT-2. trl left-pads a batch of prompts and scores completions with a forward pass that gets no
    position ids, so a shorter prompt would be scored several positions later than `generate` (which counts
    positions from the first real token) sampled it; the tiny model answers a shifted sum far worse, and GRPO then
    updates a policy it never sampled from. With equal-length prompts there is no left padding to shift anything.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        # Pick the digit count first: drawn uniformly from 10..999, nine operands in ten would have three digits.
        a, b = (rng.randint(10, 99) if rng.random() < 0.5 else rng.randint(100, 999) for _ in range(2))
        rows.append({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)})
    return rows


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion, without EOS text and whitespace, is exactly the answer."""
    return [float(completion_text(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def format_reward(completions, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion (stripped) is a number of 1-4 digits, the shape of any sum here."""
    return [float(_NUMBER.fullmatch(completion_text(c)) is not None) for c in completions]


def adder_tokenizer():
    """The character-level tokenizer: one token per digit, ``+`` and ``=``, plus EOS and PAD."""
    return character_tokenizer(ADDER_CHARACTERS)


def addition_accuracy(model, tokenizer, problems: list[dict], temperature: float = 1.0, seed: int | None = 0) -> float:
    """Share of ``problems`` whose sampled completion (``temperature`` 0 means greedy) is exactly the answer."""
    return sampled_accuracy(model, tokenizer, problems, exact_match_reward, max_new_tokens=5,
                            temperature=temperature, seed=seed)


def ensure_tiny_adder(seed: int = 0) -> Path:
    """Return the cached tiny adder directory, building it atomically if it is missing."""
    return ensure_built(f"{ADDER_MODEL_NAME}-{ADDER_MODEL_VERSION}", lambda out: build_tiny_adder(out, seed=seed))


def build_tiny_adder(out_dir: Path, seed: int = 0, target_accuracy: float = 0.35, max_steps: int = 3000,
                     check_every: int = 50, batch_size: int = 128, lr: float = 1e-3, n_embd: int = 128,
                     n_layer: int = 2) -> None:
    """Warm up the tiny GPT-2 adder on worked sums until it samples right answers ``target_accuracy`` of the time
    (`llm_iif.lm.char_tasks.warm_up`), and save it with its tokenizer (and a ``warmup.json`` record) to
    ``out_dir``."""
    torch.manual_seed(seed)
    tokenizer = adder_tokenizer()
    model = character_gpt2(tokenizer, n_positions=32, n_embd=n_embd, n_layer=n_layer)
    problems = addition_problems(max_steps * batch_size, seed + WARMUP_SEED_OFFSET)
    probe = addition_problems(512, seed + WARMUP_SEED_OFFSET + 1)
    record = warm_up(model, tokenizer, [r["prompt"] for r in problems], [r["answer"] for r in problems],
                     lambda: addition_accuracy(model, tokenizer, probe, temperature=1.0, seed=seed),
                     name=ADDER_MODEL_NAME, target_accuracy=target_accuracy, max_steps=max_steps,
                     check_every=check_every, batch_size=batch_size, lr=lr)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "warmup.json").write_text(json.dumps(
        {"version": ADDER_MODEL_VERSION, "seed": seed, **record, "target_accuracy": target_accuracy},
        indent=1) + "\n")
