"""Checking math answers: extract the final answer of a completion, normalise it, and compare it with a reference.

Nothing is downloaded and no model is run. `answer_reward` and `format_reward` are trl GRPO reward functions:
they take ``(prompts, completions, **columns)`` as keywords, with completions as strings or trl's conversational
message lists, and return one float per completion. A recipe names them like any other reward, e.g.
``reward_models.math_verifier:answer_reward: 1.0`` under ``rewards:``, with an ``answer`` column in the dataset.

Extraction (`extract_answer`) takes, in order of precedence:

1. the content of the last ``\\boxed{...}`` (braces may nest). A text that uses boxes is judged by its last box
   alone: if that box is empty or never closed (a truncated completion) there is no answer, rather than a
   fallback to a loose number the model did not commit to. ``\\boxed 5`` without braces is not a box;
2. else the rest of the line after the last GSM8K ``####`` marker (exactly four hashes). A line whose text
   starts with a letter, like ``#### Step 1``, is a Markdown heading, not a marker;
3. else the last number in the text (``1,234``, ``-2.5``, ``3/4`` count as one number; a ``-`` right after a
   digit or letter is subtraction, not a sign, so ``10-4`` ends in ``4``);
4. else None.

Normalisation (`normalise_answer`) makes equal answers equal strings:

* ``−`` (Unicode minus) becomes ``-``; ``$``, ``\\$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\left``, ``\\right``,
  ``\\displaystyle`` and the LaTeX spaces ``\\,`` ``\\!`` ``\\;`` ``\\:`` go; ``{,}`` becomes ``,``;
  ``\\dfrac`` and ``\\tfrac`` become ``\\frac``, and ``\\frac12`` becomes ``\\frac{1}{2}``.
* ``\\text{..}``, ``\\textrm{..}``, ``\\mathrm{..}`` and ``\\mbox{..}`` are unwrapped to their content with a space
  before it, so ``5\\text{ cm}`` and ``5\\text{cm}`` both read ``5 cm``. Degrees (``^\\circ``, ``^{\\circ}``,
  ``°``) read as a unit too.
* Percent signs (``%``, ``\\%``) are dropped: ``50\\%`` equals ``50``, and does not equal ``0.5``. Answers to
  "what percent" questions are almost always written as the number of percent, with or without the sign.
* A leading single-letter assignment goes when it is the only ``=``: ``x = 5`` equals ``5``.
* Then surrounding whitespace and trailing periods go, and leading ``+``.
* A number followed only by words (``18 dollars``, ``5 cm``, ``60 km/h``) is that number: the words must be
  separated from it by a space and hold no digits, backslashes or braces, so ``5x`` and ``2\\pi`` stay
  algebra. ``pi`` and ``i`` are constants, not units, so ``2 pi`` is not ``2``.
* Commas are thousands separators only in the exact pattern of one to three digits followed by groups of three
  (``1,234``, ``1,000,000``); anything else with a comma (``1,2``, ``1, 2``, ``(1,234,5)``) is a list and is
  compared as text. So ``1,234`` is one thousand two hundred and thirty-four, never the pair (1, 234).
* An answer that is then wholly a number (an integer, a decimal, ``a/b``, or ``\\frac{a}{b}`` of those, with an
  optional sign) is replaced by its exact value as a `fractions.Fraction` in lowest terms: ``3.0``, ``3`` and
  ``6/2`` all become ``3``; ``0.5``, ``1/2`` and ``\\frac{1}{2}`` become ``1/2``; ``-0`` becomes ``0``. Values
  compare exactly, so ``0.333`` does not equal ``1/3``.
* Any other answer is compared as text, with runs of whitespace dropped except one space between two letters or
  digits (``(1, 2)`` equals ``(1,2)``, but ``1 2`` is not ``12``). Case is kept.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["extract_answer", "normalise_answer", "answers_match", "answer_reward", "format_reward"]


_BOX = re.compile(r"\\boxed\s*\{")

# Exactly four hashes, so "#####" Markdown headings are not markers; the answer is the rest of the line.
_MARKER = re.compile(r"(?<!#)####(?!#)[ \t]*([^\n]*)")

# A number in running text. A sign counts only where it cannot be subtraction (not after a word character or a
# closing bracket), and digits only where they do not continue a word or a decimal ("x2", "3.14").
_TEXT_NUMBER = re.compile(r"""
    (?: (?<![\w)\]}])[-+\u2212] | (?<![\w.]) )
    (?: \d{1,3}(?:,\d{3})+(?!\d) | \d+ ) (?:\.\d+)?
    (?: /\d+(?:\.\d+)? )?
    | (?<![\w.])[-+\u2212]?\.\d+
""", re.VERBOSE)

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = rf"[-+]?\s*(?:{_UNSIGNED})"
_NUMBER = re.compile(rf"""
    (?P<sign>[-+]?)\s*
    (?: (?P<plain>{_UNSIGNED})
      | \\frac\s*\{{\s*(?P<num>{_SIGNED})\s*\}}\s*\{{\s*(?P<den>{_SIGNED})\s*\}}
      | (?P<top>{_UNSIGNED})\s*/\s*(?P<bottom>{_UNSIGNED})
    )
    (?P<unit>\s+(?!(?:pi|i)\b)[^\W\d_][^\d\\{{}}]*)?
""", re.VERBOSE)

_TEXT_COMMANDS = re.compile(r"\\(?:text|textrm|mathrm|mbox)\s*\{")
_DROPPED = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[,!;:]|\\[()\[\]]|\\?\$|\\?%")
_DEGREES = re.compile(r"\^\s*(?:\\circ|\{\s*\\circ\s*\})|°")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*")


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """The content of the brace group whose ``{`` is at ``open_at`` and the index after its ``}``, or None
    if it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i], i + 1
    return None


def _boxes(text: str) -> list[str | None]:
    """The content of every ``\\boxed{...}`` in order; None for one that never closes."""
    found = []
    for match in _BOX.finditer(text):
        group = _braced(text, match.end() - 1)
        found.append(None if group is None else group[0])
    return found


def _markers(text: str) -> list[str]:
    """The answer after every GSM8K ``####`` marker in order, leaving out Markdown headings."""
    found = []
    for match in _MARKER.finditer(text):
        rest = match.group(1).strip()
        if rest and not rest[0].isalpha():
            found.append(rest)
    return found


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text`` (a completion or a reference solution), unnormalised: the content
    of the last ``\\boxed{}``, else the text after the last ``####`` marker, else the last number, else None.
    See the module docstring for the details."""
    if not text:
        return None
    boxes = _boxes(text)
    if boxes:
        last = boxes[-1]
        if last is None or not last.strip():
            return None
        return last.strip()
    markers = _markers(text)
    if markers:
        return markers[-1]
    numbers = _TEXT_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _unwrap_text(answer: str) -> str:
    """``answer`` with each ``\\text{X}`` (and its kin) replaced by `` X``; the space keeps a unit apart from the
    number it follows, as the typeset form shows it."""
    while match := _TEXT_COMMANDS.search(answer):
        group = _braced(answer, match.end() - 1)
        if group is None:  # an unclosed group: leave it, the text comparison will see it as written
            break
        content, end = group
        answer = f"{answer[:match.start()]} {content}{answer[end:]}"
    return answer


def _value(text: str) -> Fraction | None:
    """The exact value of a signed decimal with optional thousands separators, or None."""
    text = re.sub(r"\s+", "", text).replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _number(answer: str) -> Fraction | None:
    """The value of ``answer`` when it is wholly a number (possibly followed by unit words), else None."""
    match = _NUMBER.fullmatch(answer)
    if match is None:
        return None
    if match["plain"] is not None:
        value = _value(match["plain"])
    else:
        top, bottom = (match["num"], match["den"]) if match["num"] is not None else (match["top"], match["bottom"])
        numerator, denominator = _value(top), _value(bottom)
        if numerator is None or not denominator:  # a zero denominator is not a number to compare
            return None
        value = numerator / denominator
    if value is None:
        return None
    return -value if match["sign"] == "-" else value


def normalise_answer(answer: str) -> str:
    """The canonical form of an extracted answer: equal answers give equal strings. A number becomes its exact
    value in lowest terms (``"3"``, ``"-1/2"``); anything else its cleaned-up text. The rules are in the module
    docstring."""
    text = str(answer).replace("\u2212", "-")
    text = _unwrap_text(text)
    text = _DROPPED.sub("", text)
    text = _DEGREES.sub(" ", text)
    text = text.replace("{,}", ",")
    text = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", text)
    text = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", text)
    text = text.strip()
    if text.count("=") == 1:
        text = _ASSIGNMENT.sub("", text)
    text = text.strip().rstrip(".").strip()
    text = text.removeprefix("+").strip()
    value = _number(text)
    if value is not None:
        return str(value)
    # Whitespace matters only between two word characters ("no solution", "1 2"), where it is kept as one space.
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" ?([^\w ]) ?", r"\1", text).strip()


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True when both answers are present and normalise to the same non-empty form."""
    if predicted is None or reference is None:
        return False
    normalised = normalise_answer(predicted)
    return bool(normalised) and normalised == normalise_answer(reference)


def _completion_text(completion) -> str:
    """The text of a completion: a string as is, or the content of the last message of trl's conversational
    form (a list of ``{"role", "content"}`` dicts, whose content may itself be a list of typed parts)."""
    if isinstance(completion, list):
        completion = completion[-1] if completion else ""
    if isinstance(completion, dict):
        completion = completion.get("content") or ""
    if isinstance(completion, list):
        completion = "".join(part.get("text", "") for part in completion if isinstance(part, dict))
    if not isinstance(completion, str):
        raise TypeError(f"expected a completion string or a list of messages, got {type(completion).__name__}")
    return completion


def _reference_answer(reference) -> str | None:
    """The answer of a reference: extracted from a solution that boxes or marks it, else the whole reference,
    since a bare answer such as ``\\frac{1}{2}`` or ``(1,2)`` is not a solution to search for a last number."""
    if reference is None:
        return None
    text = str(reference)
    if _boxes(text) or _markers(text):
        return extract_answer(text)
    return text.strip() or None


def answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion's extracted answer matches the reference in the ``answer``
    column (a GSM8K solution ending in ``#### 72``, a boxed solution, or a bare answer), else 0.0."""
    return [float(answers_match(extract_answer(_completion_text(c)), _reference_answer(a)))
            for c, a in zip(completions, answer, strict=True)]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion states exactly one final answer in a checkable form, else
    0.0. That is either exactly one ``\\boxed{...}``, closed and non-empty, and no ``####`` marker, or exactly one
    ``#### n`` marker and no box; the answer itself may be right or wrong."""
    scores = []
    for completion in completions:
        text = _completion_text(completion)
        boxes, markers = _boxes(text), _markers(text)
        single_box = len(boxes) == 1 and not markers and bool(boxes[0] and boxes[0].strip())
        single_marker = len(markers) == 1 and not boxes
        scores.append(float(single_box or single_marker))
    return scores
