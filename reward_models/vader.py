"""VADER compound sentiment in [-1, 1] of each response; the lexicon ships with `vaderSentiment`."""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class VaderReward:
    """Scores the response text alone, so the prompt's words do not shift the reward."""

    def __init__(self):
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in responses]
