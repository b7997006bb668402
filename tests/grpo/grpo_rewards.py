"""Reward functions that misbehave, for the GRPO error tests (imported by name from a recipe's rewards)."""

import math


def none_reward(prompts, completions, **columns):
    return [None] * len(completions)


def nan_reward(prompts, completions, **columns):
    return [math.nan] * len(completions)


def text_reward(prompts, completions, **columns):
    return ["good"] * len(completions)


def short_reward(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


NOT_A_FUNCTION = 3


def nan_when_evaluated(prompts, completions, **columns):
    """0 in training (trl passes trainer_state), NaN on the held-out completions."""
    return [0.0 if "trainer_state" in columns else math.nan for _ in completions]
