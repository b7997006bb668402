"""VADER compound sentiment in [-1, 1] of each response; the lexicon ships with `vaderSentiment`."""

from __future__ import annotations

import functools

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class VaderReward:
    """Scores the response text alone, so the prompt's words do not shift the reward."""

    def __init__(self):
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in responses]


def sentiment_reward(completions, **kwargs) -> list[float]:
    """A trl reward function (GRPO): the VADER compound sentiment in [-1, 1] of each completion, plain text or
    the content of a conversational completion's last message."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return _shared_reward()([], texts)


@functools.cache
def _shared_reward() -> VaderReward:
    return VaderReward()  # the lexicon loads once per process, not once per batch
