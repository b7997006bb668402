"""The math verifier against a policy, or a dataset row, that looks for a way to be paid without a committed answer
or to stall training: hedged final answers earn nothing, and any text up to 1 MiB is scored in 0.5 s."""

import signal
import time
from contextlib import contextmanager

import pytest

import reward_models.math_verifier as math_verifier
from reward_models.math_verifier import answer_reward, extract_answer, format_reward, normalise_answer

REFERENCE = "Natalia sold 48 clips in April and half as many in May, 48 + 24 = 72 in all.\n#### 72"


def scores(completion, reference=REFERENCE) -> tuple[float, float]:
    """(answer_reward, format_reward) of one completion."""
    return answer_reward(["q"], [completion], [reference])[0], format_reward(["q"], [completion])[0]


# ------------------------------------------------------------------------------------------------ hedges
@pytest.mark.parametrize("completion", [
    # several candidates
    "\\boxed{72 or seventy-three or seventy-four}",
    "#### 72 or any other value",
    "\\boxed{72 or 73}",
    "\\boxed{72, 73}",
    "\\boxed{72 \\text{ or } 73}",
    "\\boxed{\\text{72 or 73}}",
    "\\boxed{x = 72 \\text{ or } x = 73}",
    "\\boxed{72 \\pm 1}",
    "\\boxed{72 km or 73 km}",
    "#### 72 (or 73)",
    # words after the number
    "\\boxed{72 x}",
    "\\boxed{72 \\text{ dollars, or more}}",
    "#### 72 x",
    "#### 72 if the question means April and May",
    # units it does not know
    "\\boxed{72 apples}",
    "\\boxed{72 \\text{clips}}",
    "\\boxed{72 dollars apples}",
    "#### 72 widgets",
])
def test_a_hedged_statement_earns_nothing(completion):
    assert scores(completion) == (0.0, 0.0)


@pytest.mark.parametrize("completion", [
    "The answer is 72 or seventy-three.",
    "So it is 72, or any other value you like",
    "Natalia sold 72 clips.",  # words after the number: a loose number must end the text
    "The answer is 72 x",
])
def test_a_loose_number_followed_by_words_earns_nothing(completion):
    assert scores(completion) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------ bounds
def test_an_answer_over_the_bound_is_no_answer():
    # A long run of digits is not a committed answer: past MAX_ANSWER_CHARS even the right one earns 0.
    digits = "9" * (math_verifier.MAX_ANSWER_CHARS + 1)
    assert scores(f"\\boxed{{{digits}}}", f"#### {digits}") == (0.0, 0.0)
    assert normalise_answer(digits) == ""


def test_a_number_too_long_for_python_is_refused_not_raised():
    # Python refuses to print an int of more than 4,300 digits. A reward function that raised would stop the run.
    huge = "\\frac{" + "1" * 4200 + "}{0." + "0" * 4200 + "1}"
    assert scores(f"\\boxed{{{huge}}}") == (0.0, 0.0)
    assert scores(f"#### {huge}") == (0.0, 0.0)


def test_a_text_over_the_bound_is_scored_zero():
    padding = "x" * math_verifier.MAX_TEXT_CHARS
    assert extract_answer(padding + "\\boxed{72}") is None
    assert scores(padding + "\\boxed{72}") == (0.0, 0.0)
    assert answer_reward(["q"], ["\\boxed{72}"], [padding + "#### 72"]) == [0.0]


# ------------------------------------------------------------------------------------------------ time
MIB = 1 << 20
BUDGET_S = 0.5


def fill(unit: str, head: str = "", tail: str = "") -> str:
    """``head``, then ``unit`` repeated (the last copy cut), then ``tail``: exactly 1 MiB of characters."""
    body = MIB - len(head) - len(tail)
    return head + (unit * (body // len(unit) + 1))[:body] + tail


def nested(opener: str, head: str = "", tail: str = "") -> str:
    """``opener`` nested as deep as 1 MiB allows around ``72`` and spaces, every group closed."""
    depth, spaces = divmod(MIB - len(head) - len(tail) - 2, len(opener) + 1)
    return head + opener * depth + "72" + " " * spaces + "}" * depth + tail


SHAPES = {  # name: (text, its answer_reward against REFERENCE, its format_reward)
    "unclosed boxes": (fill("\\boxed{"), 0.0, 0.0),
    "nested boxes": (nested("\\boxed{"), 1.0, 0.0),  # the last box to open is the innermost
    "nested text in a box": (nested("\\text{", head="\\boxed{", tail="}"), 0.0, 0.0),  # its content is over the bound
    "nested text": (nested("\\text{"), 0.0, 0.0),
    "unclosed text": (fill("\\text{"), 0.0, 0.0),
    "text wrappers": (fill("\\text{72}"), 0.0, 0.0),
    "nested fractions": (nested("\\frac{"), 0.0, 0.0),
    "open braces": (fill("{"), 0.0, 0.0),
    "close braces": (fill("}"), 0.0, 0.0),
    "boxes without braces": (fill("\\boxed "), 0.0, 0.0),
    "a box and spaces": (fill(" ", head="\\boxed"), 0.0, 0.0),
    "closed boxes": (fill("\\boxed{72}", tail="\\boxed{72}"), 1.0, 0.0),
    "digits": (fill("9"), 0.0, 0.0),
    "digits in a box": (fill("9", head="\\boxed{", tail="}"), 0.0, 0.0),
    "digits after a marker": (fill("9", head="#### "), 0.0, 0.0),
    "thousands separators": (fill(",000", head="1"), 0.0, 0.0),
    "a long decimal": (fill("0", head="0.", tail="1"), 0.0, 0.0),
    "hashes": (fill("#"), 0.0, 0.0),
    "markers": (fill("####"), 0.0, 0.0),
    "a marker per line": (fill("#### 1\n", tail="\n#### 72"), 1.0, 0.0),
    "empty markers": (fill("####\n"), 0.0, 0.0),
    "hedge words": (fill("72 or "), 0.0, 0.0),
    "spaces": (fill(" "), 0.0, 0.0),
    "minus signs": (fill("-"), 0.0, 0.0),
    "subtractions": (fill("1-"), 0.0, 0.0),
    "decimals": (fill(".5"), 0.0, 0.0),
    "slashes": (fill("1/"), 0.0, 0.0),
    "commas": (fill("1,"), 0.0, 0.0),
}


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the code under test after ``seconds``, so that a slow verifier fails the test soon
    instead of stalling the suite for minutes."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", SHAPES)
def test_a_mebibyte_is_scored_within_budget(name):
    # As a completion and as a reference, through both reward functions. The best of three runs is timed, so that
    # another job's burst on the shared cores does not fail the test; a slow verifier fails all three.
    text, expected_answer, expected_format = SHAPES[name]
    assert len(text) == MIB
    elapsed = []
    for _ in range(3):
        start = time.perf_counter()
        with deadline(10 * BUDGET_S):
            rewards = answer_reward(["q", "q"], [text, "\\boxed{72}"], [REFERENCE, text])
            formats = format_reward(["q"], [text])
        elapsed.append(time.perf_counter() - start)
        if elapsed[-1] <= BUDGET_S:
            break
    assert min(elapsed) <= BUDGET_S, f"{name}: {min(elapsed):.2f} s"
    assert (rewards[0], formats[0]) == (expected_answer, expected_format)
