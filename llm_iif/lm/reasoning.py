"""An offline verifiable-reward task whose completions are a short chain of thought, so that generating them token by
token dominates a GRPO step: running sums of four 2-digit numbers, written out step by step.

Nothing is downloaded. `chain_problems` writes prompts like ``"17+25+08+40="`` with their worked chains
``"17+25=42,42+08=50,50+40=90;90"`` (each step adds the next operand to the running total; the final answer
follows ``;``), and `ensure_tiny_reasoner` builds a character-level tokenizer and a small GPT-2, warms the model up
on worked chains (with smoothed labels) only until sampling at temperature 1 gets about a fifth of the answers
right, and caches both under ``$LLM_IIF_CACHE`` (default ``~/.cache/llm_iif``). Each step of a chain is an easy
sum, but a slip anywhere spoils the answer, so sampled accuracy starts far below what the model can do and GRPO
has room to climb.

`answer_reward` checks the final answer only: the chain before it is not verified, so a chain with a wrong step
that still ends in the right number is paid, and a completion without ``;`` is not. `format_reward` pays for the
shape of a chain, right or wrong.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from llm_iif.lm.builtin import ensure_built
from llm_iif.lm.char_tasks import character_gpt2, character_tokenizer, completion_text, sampled_accuracy, warm_up


REASONER_MODEL_NAME = "tiny-reasoner"


# Bump when the problems, tokenizer or warm-up change so stale caches are not reused.
REASONER_MODEL_VERSION = "v1"


REASONER_CHARACTERS = "0123456789+=,;"


NUM_OPERANDS = 4


# Completion tokens to allow: the longest chain is 35 characters ("99+99=198,198+99=297,297+99=396;396") and EOS.
MAX_CHAIN_TOKENS = 40


# The warm-up draws from its own seed, well away from the small seeds callers use for GRPO and evaluation sets.
WARMUP_SEED_OFFSET = 20_000


_CHAIN = re.compile(r"\d+\+\d+=\d+(,\d+\+\d+=\d+)*;\d+")


def chain_problems(num: int, seed: int) -> list[dict]:
    """``num`` rows ``{"prompt": "17+25+08+40=", "answer": "90", "chain": "17+25=42,42+08=50,50+40=90;90"}``:
    `NUM_OPERANDS` operands from 1 to 99, written zero-padded to two digits, their sum, and the worked chain
    (deterministic in ``seed``).

    The padding keeps every prompt the same length (12 tokens), which matters for a model with learned absolute
    positions such as GPT-2: trl left-pads a batch of prompts and scores completions with a forward pass that gets
    no position ids, so a shorter prompt would be scored at other positions than `generate` sampled it (see
    `llm_iif.lm.addition.addition_problems`).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        operands = [rng.randint(1, 99) for _ in range(NUM_OPERANDS)]
        rows.append({"prompt": "+".join(f"{x:02d}" for x in operands) + "=", "answer": str(sum(operands)),
                     "chain": worked_chain(operands)})
    return rows


def worked_chain(operands: list[int]) -> str:
    """The chain of running sums, each operand written as in the prompt: ``[17, 25, 8, 40]`` ->
    ``"17+25=42,42+08=50,50+40=90;90"``."""
    total, steps = operands[0], []
    for x in operands[1:]:
        # The first step copies the prompt's first operand, padding included; later ones start from a total.
        left = f"{total:02d}" if not steps else str(total)
        steps.append(f"{left}+{x:02d}={total + x}")
        total += x
    return ",".join(steps) + f";{total}"


def final_answer(completion) -> str | None:
    """The text after the last ``;`` of a completion (`completion_text`), or None if it has no ``;``."""
    text = completion_text(completion)
    return text.rsplit(";", 1)[1] if ";" in text else None


def answer_reward(completions, answer, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion's final answer (after its last ``;``) is exactly the answer;
    the chain before it is not checked."""
    return [float(final_answer(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def format_reward(completions, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion is shaped like a chain (``a+b=c`` steps joined by ``,``,
    then ``;`` and a number), whether or not its arithmetic is right."""
    return [float(_CHAIN.fullmatch(completion_text(c)) is not None) for c in completions]


def reasoner_tokenizer():
    """The character-level tokenizer: one token per digit, ``+``, ``=``, ``,`` and ``;``, plus EOS and PAD."""
    return character_tokenizer(REASONER_CHARACTERS)


def chain_accuracy(model, tokenizer, problems: list[dict], temperature: float = 1.0, seed: int | None = 0) -> float:
    """Share of ``problems`` whose sampled chain (``temperature`` 0 means greedy) ends in the right answer."""
    return sampled_accuracy(model, tokenizer, problems, answer_reward, max_new_tokens=MAX_CHAIN_TOKENS,
                            temperature=temperature, seed=seed)


def ensure_tiny_reasoner(seed: int = 0) -> Path:
    """Return the cached tiny reasoner directory, building it atomically if it is missing."""
    return ensure_built(f"{REASONER_MODEL_NAME}-{REASONER_MODEL_VERSION}",
                        lambda out: build_tiny_reasoner(out, seed=seed))


def build_tiny_reasoner(out_dir: Path, seed: int = 0, target_accuracy: float = 0.18, max_steps: int = 4000,
                        check_every: int = 50, batch_size: int = 64, lr: float = 3e-3, label_smoothing: float = 0.04,
                        n_embd: int = 128, n_layer: int = 3, probe_size: int = 512) -> None:
    """Warm up the tiny GPT-2 on worked chains until its sampled chains end in the right answer
    ``target_accuracy`` of the time on ``probe_size`` problems (`llm_iif.lm.char_tasks.warm_up`), and save it
    with its tokenizer (and a ``warmup.json`` record) to ``out_dir``.

    The labels are smoothed, as supervised fine-tuning on human text leaves probability on wrong tokens: with
    0.04 of every token's probability spread over the vocabulary, a chain of ~35 tokens sampled at temperature 1
    slips somewhere in about four chains of five even once the most likely chain is right. So the warm-up stops
    while greedy chains are already mostly right, and GRPO's first gain is the one it brings LLMs: sharpening
    what the model knows. Without smoothing, sampled and greedy accuracy rise together, and GRPO would have to
    teach arithmetic from a few prompts a step."""
    torch.manual_seed(seed)
    tokenizer = reasoner_tokenizer()
    model = character_gpt2(tokenizer, n_positions=64, n_embd=n_embd, n_layer=n_layer)
    problems = chain_problems(max_steps * batch_size, seed + WARMUP_SEED_OFFSET)
    probe = chain_problems(probe_size, seed + WARMUP_SEED_OFFSET + 1)
    record = warm_up(model, tokenizer, [r["prompt"] for r in problems], [r["chain"] for r in problems],
                     lambda: chain_accuracy(model, tokenizer, probe, temperature=1.0, seed=seed),
                     name=REASONER_MODEL_NAME, target_accuracy=target_accuracy, max_steps=max_steps,
                     check_every=check_every, batch_size=batch_size, lr=lr, label_smoothing=label_smoothing)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "warmup.json").write_text(json.dumps(
        {"version": REASONER_MODEL_VERSION, "seed": seed, **record, "target_accuracy": target_accuracy,
         "label_smoothing": label_smoothing}, indent=1) + "\n")
