"""What the offline character-level tasks (`lm.addition`, `lm.reasoning`) share: a tokenizer with one token per
character, a small GPT-2 over it, their completions' text, and a supervised warm-up that stops as soon as
sampled completions are right often enough.

The warm-up stops at a measured sampled accuracy rather than after a fixed step count: it leaves GRPO a model
competent enough for its groups to hold both right and wrong completions, and far from solved, and a model
this small learns arithmetic in sudden jumps whose timing moves by hundreds of steps with the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from llm_iif.lm.builtin import EOS_TOKEN, PAD_TOKEN


logger = logging.getLogger(__name__)


def character_tokenizer(characters: str):
    """A tokenizer with one token per character of ``characters`` (ids from 2), EOS (id 0) and PAD (id 1)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, **{c: i + 2 for i, c in enumerate(characters)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins the pieces as they are; without a decoder, tokenizers would put a space between the characters.
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left")


def character_gpt2(tokenizer, n_positions: int, n_embd: int, n_layer: int, n_head: int = 4):
    """A randomly initialised GPT-2 over ``tokenizer``'s vocabulary, without dropout, that generates until EOS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def completion_text(completion) -> str:
    """A trl completion as the text a reward checks: the last message's content for conversational data, cut at
    the first EOS text and stripped."""
    # Conversational datasets hand rewards a message list rather than a string.
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    # Anything after an end of text was never meant as part of the answer (decoding without skipping specials).
    return completion.split(EOS_TOKEN, 1)[0].strip()


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems: list[dict], reward: Callable, max_new_tokens: int,
                     temperature: float = 1.0, seed: int | None = 0, batch_size: int = 256) -> float:
    """Mean of trl reward function ``reward`` (called with the rows' ``answer`` column) over one completion of
    each of ``problems``, sampled at ``temperature`` (0 means greedy)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column, which must be the prompt's end
    total = 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(problems), batch_size):
                rows = problems[start:start + batch_size]
                encoded = tokenizer([r["prompt"] for r in rows], padding=True, return_tensors="pt")
                sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
                    if temperature > 0 else {"do_sample": False}
                out = model.generate(**encoded, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
                texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
                total += sum(reward(texts, [r["answer"] for r in rows]))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return total / max(len(problems), 1)


def supervised_batch(tokenizer, prompts: list[str], targets: list[str]):
    """[b, w] right-padded ``prompt + target + EOS`` ids, attention mask, and labels on the target and EOS only
    (the prompt is given, not learned)."""
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    target_ids = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in targets]
    width = max(len(p) + len(t) for p, t in zip(prompt_ids, target_ids))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), -100)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        mask[i, :len(p) + len(t)] = 1
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    return ids, mask, labels


def _next_token_loss(logits, labels, label_smoothing: float):
    """Mean cross-entropy of logits [b, w, V] at each position against the label [b, w] one position later
    (-100: not learned)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, label_smoothing=label_smoothing)


def warm_up(model, tokenizer, prompts: list[str], targets: list[str], accuracy: Callable[[], float], name: str,
            target_accuracy: float, max_steps: int, check_every: int, batch_size: int, lr: float,
            label_smoothing: float = 0.0) -> dict:
    """Train ``model`` on consecutive batches of (prompt, target) pairs, ``batch_size`` at a time, until
    ``accuracy()`` (measured every ``check_every`` steps) reaches ``target_accuracy`` or ``max_steps`` run out.
    ``label_smoothing`` moves that share of each target token's probability onto the whole vocabulary.
    Returns ``{"steps", "loss", "sampled_accuracy"}`` for the build's record."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Constant after a short ramp: the stopping step is not known in advance, so there is nothing to anneal to.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    reached = 0.0
    bar = tqdm(range(max_steps), desc=f"warming up {name}", leave=False)
    for step in bar:
        model.train()
        rows = slice(step * batch_size, (step + 1) * batch_size)
        ids, mask, labels = supervised_batch(tokenizer, prompts[rows], targets[rows])
        loss = _next_token_loss(model(input_ids=ids, attention_mask=mask).logits, labels, label_smoothing)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % check_every == 0:
            reached = accuracy()
            if reached >= target_accuracy:
                break
        bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{reached:.2f}")
    else:
        logger.warning("%s warm-up hit max_steps=%d at sampled accuracy %.2f, short of the %.2f target",
                       name, max_steps, reached, target_accuracy)
    bar.close()
    logger.info("%s warm-up stopped after %d steps at loss %.3f, sampled accuracy %.2f",
                name, step + 1, loss.item(), reached)
    return {"steps": step + 1, "loss": round(loss.item(), 4), "sampled_accuracy": reached}
