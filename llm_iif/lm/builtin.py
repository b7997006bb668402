"""The offline embedded default: a tiny GPT-2 and its tokenizer, built on first use from generated text.

Nothing is downloaded. `review_corpus` writes short review-like sentences that mix positive, negative and
neutral words in equal shares, so the warmed-up model's sentiment starts near zero. `ensure_tiny_model`
trains a byte-level BPE tokenizer on that corpus, pre-trains a ~0.5M-parameter GPT-2 on it for a few hundred
steps (seeded, deterministic), and caches the result under ``$LLM_IIF_CACHE`` (default ``~/.cache/llm_iif``).
The trainer then loads it with the ordinary ``from_pretrained`` path, like any other local model.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from llm_iif.lm import preferences
from llm_iif.lm.reviews import review_corpus


logger = logging.getLogger(__name__)


BUILTIN_PREFIX = "builtin:"


TINY_MODEL_NAME = "tiny-sentiment"


# Bump when the corpus, tokenizer or warm-up changes so stale caches are not reused.
TINY_MODEL_VERSION = "v2"


# Built-in reward models: name -> (the preference pairs they learn from, training seed). The biased ones share
# their pairs' flaw; three seeds make the conservative ensemble of the over-optimisation recipe.
TINY_REWARD_MODELS = {"tiny-reward-model": ("builtin:tiny-preferences", 0),
                      "tiny-biased-reward-model": ("builtin:biased-preferences", 0),
                      "tiny-biased-reward-model-seed1": ("builtin:biased-preferences", 1),
                      "tiny-biased-reward-model-seed2": ("builtin:biased-preferences", 2),
                      "tiny-biased-reward-model-plus-trusted": ("builtin:biased-plus-trusted-preferences", 0),
                      "tiny-length-biased-reward-model": ("builtin:length-biased-preferences", 0),
                      "tiny-length-biased-reward-model-seed1": ("builtin:length-biased-preferences", 1),
                      "tiny-length-biased-reward-model-seed2": ("builtin:length-biased-preferences", 2),
                      "tiny-length-biased-reward-model-plus-trusted":
                          ("builtin:length-biased-plus-trusted-preferences", 0)}
TINY_REWARD_MODEL_VERSION = "v4"  # v4: 40% critique pairs, 30% verbose ones; v3: a seeded score head; v2: full precision on a CPU (v1: bf16)


EOS_TOKEN = "<|endoftext|>"


PAD_TOKEN = "<pad>"


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_IIF_CACHE", Path.home() / ".cache" / "llm_iif"))


def ensure_tiny_model(seed: int = 0) -> Path:
    """Return the cached tiny model directory, building it atomically if it is missing."""
    return ensure_built(f"{TINY_MODEL_NAME}-{TINY_MODEL_VERSION}", lambda out: build_tiny_model(out, seed=seed))


# A built model's weights depend on torch's intra-op thread count (float sums split differently): the builds
# use a fixed count, the default of 2 cores, so that a machine with more cores or OMP_NUM_THREADS=1 builds
# the same model as a 2-core one with the same CPU model and torch.
BUILD_THREADS = 2


@contextmanager
def reproducible_build():
    """While a built-in model is built: ``BUILD_THREADS`` torch threads, and the caller's RNG left as it was
    (so that a first run, which builds, and a cached run train alike); both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def ensure_built(name: str, build) -> Path:
    """``cache_dir() / name``, made by ``build(directory)`` into a temporary directory and renamed into place
    when it is missing, so a crash or a concurrent build never leaves a half-built model behind."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with reproducible_build():
            build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(out_dir: Path, seed: int = 0, num_sentences: int = 20000, vocab_size: int = 1024,
                     steps: int = 1200, batch_size: int = 64) -> None:
    """Train the tokenizer and warm up the tiny GPT-2 on the generated corpus; save both to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    corpus = review_corpus(num_sentences, seed)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=128, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    encoded = tokenizer([s + EOS_TOKEN for s in corpus], padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="warming up tiny-sentiment", leave=False)
    for _ in bar:
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=generator)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    logger.info("tiny-sentiment warm-up finished at loss %.3f", loss.item())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _moved_to_preferences(rule):
    """``rule`` of `llm_iif.lm.preferences` under its old path here, for recipes that name it
    ``llm_iif.lm.builtin:NAME``, with a warning. Kept for one release: gone in 0.2."""
    @functools.wraps(rule)
    def moved(*args, **kwargs):
        warnings.warn(f"llm_iif.lm.builtin:{rule.__name__} moved to llm_iif.lm.preferences:{rule.__name__}; the old "
                      "path goes in 0.2", FutureWarning, stacklevel=2)
        return rule(*args, **kwargs)

    return moved


hidden_preference_score = _moved_to_preferences(preferences.hidden_preference_score)
hidden_length_gold_score = _moved_to_preferences(preferences.hidden_length_gold_score)
