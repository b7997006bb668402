"""An offline verifiable-reward task for GRPO: a tiny GPT-2 that adds 2-3 digit numbers, and exact-match rewards.

Nothing is downloaded. `addition_problems` writes prompts like ``"047+385="`` (operands zero-padded to three
digits) with their answers, and `ensure_tiny_adder` builds a character-level tokenizer and a small GPT-2, warms
the model up on worked sums only until sampling at temperature 1 gets about 35-40% of the answers right, and
caches both under ``$LLM_IIF_CACHE`` (default ``~/.cache/llm_iif``). The reward is checkable, so GRPO has a clear
signal to climb: `exact_match_reward` pays 1 for the right number and `format_reward` for any plausible one.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import torch

from llm_iif.lm.builtin import EOS_TOKEN, PAD_TOKEN, ensure_built


logger = logging.getLogger(__name__)


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


def _completion_text(completion) -> str:
    # Conversational datasets hand rewards a message list rather than a string.
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    # Anything after an end of text was never meant as part of the answer (decoding without skipping specials).
    return completion.split(EOS_TOKEN, 1)[0].strip()


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion, without EOS text and whitespace, is exactly the answer."""
    return [float(_completion_text(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def format_reward(completions, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion (stripped) is a number of 1-4 digits, the shape of any sum here."""
    return [float(_NUMBER.fullmatch(_completion_text(c)) is not None) for c in completions]


def adder_tokenizer():
    """The character-level tokenizer: one token per digit, ``+`` and ``=``, plus EOS and PAD."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, **{c: i + 2 for i, c in enumerate(ADDER_CHARACTERS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins the pieces as they are; without a decoder, tokenizers would put a space between the digits.
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        unk_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left")
    return tokenizer


@torch.no_grad()
def addition_accuracy(model, tokenizer, problems: list[dict], temperature: float = 1.0, seed: int | None = 0,
                      batch_size: int = 256) -> float:
    """Share of ``problems`` whose sampled completion (``temperature`` 0 means greedy) is exactly the answer."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column, which must be the prompt's end
    correct = 0
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(problems), batch_size):
                rows = problems[start:start + batch_size]
                encoded = tokenizer([r["prompt"] for r in rows], padding=True, return_tensors="pt")
                sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
                    if temperature > 0 else {"do_sample": False}
                out = model.generate(**encoded, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
                texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
                correct += sum(exact_match_reward(texts, [r["answer"] for r in rows]))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / max(len(problems), 1)


def ensure_tiny_adder(seed: int = 0) -> Path:
    """Return the cached tiny adder directory, building it atomically if it is missing."""
    return ensure_built(f"{ADDER_MODEL_NAME}-{ADDER_MODEL_VERSION}", lambda out: build_tiny_adder(out, seed=seed))


def _warmup_batch(tokenizer, rows: list[dict]):
    """Right-padded ``prompt + answer + EOS`` ids and labels on the answer and EOS only (the prompt is given)."""
    prompts = [tokenizer.encode(r["prompt"]) for r in rows]
    answers = [tokenizer.encode(r["answer"]) + [tokenizer.eos_token_id] for r in rows]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


def build_tiny_adder(out_dir: Path, seed: int = 0, target_accuracy: float = 0.35, max_steps: int = 3000,
                     check_every: int = 50, batch_size: int = 128, lr: float = 1e-3, n_embd: int = 128,
                     n_layer: int = 2) -> None:
    """Warm up the tiny GPT-2 adder on worked sums until it samples right answers ``target_accuracy`` of the time,
    and save it with its tokenizer (and a ``warmup.json`` record) to ``out_dir``.

    Stopping there leaves GRPO a model competent enough for its groups to hold both right and wrong answers, and
    far from solved. The stop is measured rather than a fixed step count because a model this small learns
    addition in a sudden jump whose timing moves by hundreds of steps with the seed.
    """
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = adder_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    problems = addition_problems(max_steps * batch_size, seed + WARMUP_SEED_OFFSET)
    probe = addition_problems(512, seed + WARMUP_SEED_OFFSET + 1)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Constant after a short ramp: the stopping step is not known in advance, so there is nothing to anneal to.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    accuracy = 0.0
    bar = tqdm(range(max_steps), desc=f"warming up {ADDER_MODEL_NAME}", leave=False)
    for step in bar:
        model.train()
        ids, mask, labels = _warmup_batch(tokenizer, problems[step * batch_size:(step + 1) * batch_size])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % check_every == 0:
            accuracy = addition_accuracy(model, tokenizer, probe, temperature=1.0, seed=seed)
            if accuracy >= target_accuracy:
                break
        bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.2f}")
    else:
        logger.warning("%s warm-up hit max_steps=%d at sampled accuracy %.2f, short of the %.2f target",
                       ADDER_MODEL_NAME, max_steps, accuracy, target_accuracy)
    bar.close()
    logger.info("%s warm-up stopped after %d steps at loss %.3f, sampled accuracy %.2f",
                ADDER_MODEL_NAME, step + 1, loss.item(), accuracy)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "warmup.json").write_text(json.dumps(
        {"version": ADDER_MODEL_VERSION, "seed": seed, "steps": step + 1, "loss": round(loss.item(), 4),
         "sampled_accuracy": accuracy, "target_accuracy": target_accuracy}, indent=1) + "\n")
