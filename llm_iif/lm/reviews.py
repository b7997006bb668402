"""The review language of the offline default: word lists, sentence templates and how they are filled.

`llm_iif.lm.builtin` pre-trains the tiny GPT-2 on `review_corpus`; `llm_iif.lm.preferences` ranks pairs of
filled templates for the built-in reward models and trusted sets; the PPO and GRPO sentiment tasks prompt with
`review_prompts` and `equal_length_review_prompts`. Everything is deterministic in its seed.
"""

from __future__ import annotations

import random


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


# The word lists of the pretraining corpus, as `_fill` takes them.
CORPUS_WORDS = {"nouns": NOUNS, "verbs": VERBS, "adverbs": ADVERBS, "positive": POSITIVE, "negative": NEGATIVE,
                "neutral": NEUTRAL}


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
        sentences.append(fill_template(prefix + rest, rng.choice(["positive", "negative", "neutral"]), rng))
    return sentences


def fill_template(template: str, polarity: str, rng: random.Random, words: dict[str, list[str]] | None = None) -> str:
    """Fill a template's slots one at a time, so repeated slots get independent words. ``words`` maps
    ``nouns``, ``verbs``, ``adverbs``, ``positive``, ``negative`` and ``neutral`` to word lists (default: the
    corpus's)."""
    words = words or CORPUS_WORDS
    adjectives = {"positive": words["positive"], "negative": words["negative"], "neutral": words["neutral"]}
    contrast = ({"positive": adjectives["negative"], "negative": adjectives["positive"], "neutral": None}[polarity]
                or rng.choice([adjectives["positive"], adjectives["negative"]]))
    text = template
    while "{" in text:
        text = (text.replace("{n}", rng.choice(words["nouns"]), 1).replace("{v}", rng.choice(words["verbs"]), 1)
                .replace("{a}", rng.choice(words["adverbs"]) + rng.choice(adjectives[polarity]), 1)
                .replace("{b}", rng.choice(words["adverbs"]) + rng.choice(contrast), 1))
    return text
