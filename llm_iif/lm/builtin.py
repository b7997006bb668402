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
import random
import shutil
import tempfile
from pathlib import Path

import torch


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
                      "tiny-biased-reward-model-seed2": ("builtin:biased-preferences", 2)}
TINY_REWARD_MODEL_VERSION = "v2"  # v2: trained in full precision on a CPU (v1 took trl's bf16 default)


EOS_TOKEN = "<|endoftext|>"


PAD_TOKEN = "<pad>"


NOUNS = ["movie", "film", "plot", "food", "service", "staff", "room", "hotel", "book", "story", "phone",
         "battery", "screen", "price", "music", "ending", "menu", "coffee", "trip", "show", "game", "camera",
         "bed", "view", "driver"]


POSITIVE = ["great", "good", "wonderful", "excellent", "amazing", "lovely", "nice", "perfect", "fantastic",
            "pleasant", "brilliant", "delightful", "fun", "beautiful", "friendly", "helpful"]


NEGATIVE = ["bad", "terrible", "awful", "horrible", "boring", "poor", "disappointing", "ugly", "rude",
            "dirty", "sad", "annoying", "weak", "broken", "useless", "painful"]


NEUTRAL = ["long", "short", "small", "large", "quiet", "new", "old", "simple", "plain", "typical", "usual",
           "early", "late", "busy", "cold", "expensive"]


ADVERBS = ["", "", "very ", "really ", "quite ", "rather ", "a bit "]


VERBS = ["watched", "ordered", "read", "bought", "visited", "tried", "used", "saw", "booked", "got"]


# Each template is a prompt prefix and a continuation. {n} is a noun, {v} a verb, {a} an adjective phrase
# of the sentence's polarity and {b} one of the opposite polarity (the clause after "but").
TEMPLATES = [
    ("the {n} was", " {a} ."),
    ("the {n} was", " {a} and the {n} was {a} ."),
    ("the {n} was", " {a} but the {n} was {b} ."),
    ("i {v} the {n} and it was", " {a} ."),
    ("i {v} the {n} and it was", " {a} , the {n} was {a} ."),
    ("we {v} this {n} , it felt", " {a} and {a} ."),
    ("overall the {n} is", " {a} ."),
    ("overall the {n} is", " {a} , but the {n} is {b} ."),
    ("my {n} seemed", " {a} and the {n} seemed {a} ."),
    ("this {n} is", " {a} and the {n} is {a} ."),
]


def review_prompts() -> list[str]:
    """Every distinct prompt prefix the corpus templates can start with (deterministic order)."""
    prompts = set()
    for prefix, _ in TEMPLATES:
        for noun in NOUNS:
            for verb in VERBS if "{v}" in prefix else [""]:
                prompts.add(prefix.format(n=noun, v=verb))
    return sorted(prompts)


def equal_length_review_prompts(num: int, seed: int) -> list[dict]:
    """``num`` rows ``{"prompt": ...}`` drawn with replacement (deterministic in ``seed``) from the 500 prompts
    of the two templates with a verb, "i {v} the {n} and it was" and "we {v} this {n} , it felt": GRPO's
    built-in sentiment prompts. Each is 7 tokens for builtin:tiny-sentiment's tokenizer, so trl's left
    padding shifts no positions of this GPT-2 (see `llm_iif.lm.addition.addition_problems`)."""
    prefixes = sorted({prefix for prefix, _ in TEMPLATES if "{v}" in prefix})
    pool = [prefix.format(n=noun, v=verb) for prefix in prefixes for noun in NOUNS for verb in VERBS]
    rng = random.Random(seed)
    return [{"prompt": prompt} for prompt in rng.choices(pool, k=num)]


def review_corpus(num_sentences: int, seed: int) -> list[str]:
    """``num_sentences`` review-like sentences, a third each positive, negative and neutral.

    Clauses joined by "and" keep the sentence's polarity and clauses after "but" flip it, as real reviews
    do. That coherence gives the warmed-up model an internal notion of sentiment for PPO to move along;
    with words drawn independently it could only learn sixteen separate word preferences.
    """
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        prefix, rest = rng.choice(TEMPLATES)
        sentences.append(_fill(prefix + rest, rng.choice(["positive", "negative", "neutral"]), rng))
    return sentences


def positive_review_pairs(num_pairs: int = 512, seed: int = 1) -> dict[str, list[str]]:
    """Reference (prompt, response) pairs whose responses are positive reviews: the offline data for the
    ``gold`` influence target. Responses contain no "but", so they stay positive throughout."""
    rng = random.Random(seed)
    templates = [(prefix, rest) for prefix, rest in TEMPLATES if "{b}" not in rest]
    pairs = {"prompt": [], "response": []}
    for _ in range(num_pairs):
        prefix, rest = rng.choice(templates)
        pairs["prompt"].append(_fill(prefix, "positive", rng))
        pairs["response"].append(_fill(rest, "positive", rng))
    return pairs


def hidden_preference_score(prompts: list[str], responses: list[str]) -> list[float]:
    """The hidden rule behind ``builtin:tiny-preferences``: the response's VADER compound sentiment plus a
    taste for detail, +0.1 per word up to 10 words. A reward model learned from the ranked pairs sees only
    the rankings, so it approximates this rule imperfectly, as learned reward models do."""
    analyzer = _vader()
    return [analyzer.polarity_scores(r)["compound"] + 0.1 * min(len(r.split()), 10) for r in responses]


def preference_pairs(num_pairs: int = 3000, seed: int = 2) -> dict[str, list[str]]:
    """(prompt, chosen, rejected) triples: two generated continuations of the same prompt, the one that
    `hidden_preference_score` rates higher chosen. Pairs the rule rates within 0.05 of each other are skipped."""
    rng = random.Random(seed)
    by_prefix: dict[str, list[str]] = {}
    for prefix, rest in TEMPLATES:
        by_prefix.setdefault(prefix, []).append(rest)
    pairs = {"prompt": [], "chosen": [], "rejected": []}
    while len(pairs["prompt"]) < num_pairs:
        prefix = rng.choice(sorted(by_prefix))
        prompt = _fill(prefix, "neutral", rng)
        a, b = (_fill(rng.choice(by_prefix[prefix]), rng.choice(["positive", "negative", "neutral"]), rng)
                for _ in range(2))
        score_a, score_b = hidden_preference_score([prompt] * 2, [a, b])
        if abs(score_a - score_b) < 0.05:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        pairs["prompt"].append(prompt)
        pairs["chosen"].append(chosen)
        pairs["rejected"].append(rejected)
    return pairs


def biased_preference_pairs(num_pairs: int = 1000, seed: int = 4, bias: float = 0.3) -> dict[str, list[str]]:
    """(prompt, chosen, rejected) triples from a biased labeller, for a reward model with a flaw to exploit.
    A ``bias`` share of them are "balanced critique" pairs: a positive clause followed by a negative one after
    "but" is chosen over a plainly positive response, which `hidden_preference_score` rates higher (VADER weighs
    the clause after "but" more). The rest are ranked by the hidden rule, as in `preference_pairs`."""
    rng = random.Random(seed)
    hedged = {prefix: rest for prefix, rest in TEMPLATES if "{b}" in rest}
    hidden = preference_pairs(num_pairs, seed=seed + 1)
    pairs = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(num_pairs):
        if rng.random() >= bias:
            for column in pairs:
                pairs[column].append(hidden[column][i])
            continue
        prefix = rng.choice(sorted(hedged))
        plain_rest = rng.choice([rest for p, rest in TEMPLATES if p == prefix and "{b}" not in rest])
        pairs["prompt"].append(_fill(prefix, "neutral", rng))
        pairs["chosen"].append(_fill(hedged[prefix], "positive", rng))
        pairs["rejected"].append(_fill(plain_rest, "positive", rng))
    return pairs


def trusted_preference_triples(num_triples: int = 256, seed: int = 3) -> dict[str, list[str]]:
    """``num_triples`` (prompt, chosen, rejected) triples ranked by `hidden_preference_score`, none of which is
    among the reward model's training pairs (`preference_pairs` with its defaults): the trusted set of the
    ``preference`` target, as a small set of human or stronger-judge preferences would be."""
    seen = set(zip(*preference_pairs().values()))
    triples = {"prompt": [], "chosen": [], "rejected": []}
    batch = 0
    while len(triples["prompt"]) < num_triples:
        candidates = preference_pairs(num_triples, seed=seed * 1000 + batch)
        batch += 1
        for triple in zip(*candidates.values()):
            if triple not in seen and len(triples["prompt"]) < num_triples:
                seen.add(triple)
                for column, text in zip(triples, triple):
                    triples[column].append(text)
    return triples


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _fill(template: str, polarity: str, rng: random.Random) -> str:
    """Fill a template's slots one at a time, so repeated slots get independent words."""
    words = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[polarity]
    contrast = {"positive": NEGATIVE, "negative": POSITIVE, "neutral": None}[polarity] or rng.choice([POSITIVE, NEGATIVE])
    text = template
    while "{" in text:
        text = (text.replace("{n}", rng.choice(NOUNS), 1).replace("{v}", rng.choice(VERBS), 1)
                .replace("{a}", rng.choice(ADVERBS) + rng.choice(words), 1)
                .replace("{b}", rng.choice(ADVERBS) + rng.choice(contrast), 1))
    return text


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_IIF_CACHE", Path.home() / ".cache" / "llm_iif"))


def ensure_tiny_model(seed: int = 0) -> Path:
    """Return the cached tiny model directory, building it atomically if it is missing."""
    return ensure_built(f"{TINY_MODEL_NAME}-{TINY_MODEL_VERSION}", lambda out: build_tiny_model(out, seed=seed))


def ensure_built(name: str, build) -> Path:
    """``cache_dir() / name``, made by ``build(directory)`` into a temporary directory and renamed into place
    when it is missing, so a crash or a concurrent build never leaves a half-built model behind."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # Leave the caller's RNG as it was, so a first run (which builds) and a cached run train alike.
        with torch.random.fork_rng(devices=[]):
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

