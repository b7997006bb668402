"""Checking math answers: extract the final answer of a completion, normalise it, and compare it with a reference.

Nothing is downloaded and no model is run. `answer_reward` and `format_reward` are trl GRPO reward functions:
they take ``(prompts, completions, **columns)`` as keywords, with completions as strings or trl's conversational
message lists, and return one float per completion. A recipe names them like any other reward, e.g.
``reward_models.math_verifier:answer_reward: 1.0`` under ``rewards:``, with an ``answer`` column in the dataset.

The rules are written for a policy that looks for the cheapest way to be paid, and are documented with examples in
docs/reward-models.md ("Math answers"). In short:

* Extraction (`extract_answer`): the content of the last ``\\boxed{`` to open, else the rest of the line after the
  last GSM8K ``####`` marker, else the last number of the text with everything after it. Nothing falls back past
  a box or marker that is empty, unclosed or too long.
* An answer earns 1 when it normalises (`normalise_answer`) to the reference's form: both numbers of the same
  exact value, or, for a reference that is not a number, the same text. A number is a sign, digits (with
  thousands separators, a decimal part, or as ``a/b`` or ``\\frac{a}{b}``) and at most one unit from `UNITS`;
  anything else after it (``72 x``, ``72 or 73``, ``72 apples``) makes the answer text, which equals no number.
* `format_reward` pays for exactly one box or marker whose answer is such a number.

Bounds: a text longer than `MAX_TEXT_CHARS` has no answer, and neither does an answer longer than
`MAX_ANSWER_CHARS` (which also keeps every number far below Python's 4,300-digit limit on int conversion). Every
pass over a text is linear in its length: no pattern backtracks over more than one run of characters, and brace
matching is one left-to-right scan that stops `MAX_ANSWER_CHARS` after the brace opens.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["MAX_TEXT_CHARS", "MAX_ANSWER_CHARS", "UNITS", "extract_answer", "normalise_answer", "answers_match",
           "answer_reward", "format_reward"]

MAX_TEXT_CHARS = 1 << 20
"""A completion or reference longer than this many characters (1 MiB) has no answer, so it earns 0."""

MAX_ANSWER_CHARS = 1_000
"""An extracted answer longer than this many characters is no answer."""

UNITS = frozenset("""
    dollar cent euro usd
    second sec s minute min hour hr h day week month year yr
    millimeter millimetre mm centimeter centimetre cm meter metre m kilometer kilometre km
    inch foot feet ft yard mile
    milligram mg gram g kilogram kg pound lb ounce oz ton tonne
    milliliter millilitre ml liter litre l gallon quart pint cup
    mph kph degree percent
""".split())
"""The unit words a number may carry, in any case and with a plural ``s`` or ``es``. A unit is read, not
converted: ``5 km`` equals ``5``."""

# The last box in one pass: the greedy ``.*`` runs to the end of the text and backs up to the last "\boxed{".
# Used with `match`, never `search`, which would retry that from every start.
_LAST_BOX = re.compile(r".*(\\boxed\s*\{)", re.DOTALL)
_BOX = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")

# Exactly four hashes, so "#####" Markdown headings are not markers; the answer is the rest of the line.
# (The literal "####" comes first, so that the regex engine can skip to it.)
_MARKER = re.compile(r"####(?<!#####)(?!#)[ \t]*([^\n]*)")

# A number in running text. A sign counts only where it cannot be subtraction (not after a word character or a
# closing bracket), and digits only where they do not continue a word or a decimal ("x2", "3.14").
_TEXT_NUMBER = re.compile(r"""
    (?: (?<![\w)\]}])[-+\u2212] | (?<![\w.]) )
    (?: \d{1,3}(?:,\d{3})+(?!\d) | \d+ ) (?:\.\d+)?
    (?: /\d+(?:\.\d+)? )?
    | (?<![\w.])[-+\u2212]?\.\d+
""", re.VERBOSE)

# A unit: one of UNITS, maybe square or cubic, maybe divided by another ("km/h", "dollars per hour").
_UNIT_WORD = rf"(?:{'|'.join(sorted(UNITS, key=lambda unit: (-len(unit), unit)))})(?:e?s)?"
_UNIT_POWER = rf"(?:square\s+|cubic\s+)?{_UNIT_WORD}(?:\^\{{?[23]\}}?|[²³])?"
_UNIT = rf"(?i:{_UNIT_POWER}(?:\s*/\s*{_UNIT_WORD}|\s+per\s+{_UNIT_WORD})?)"
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = rf"[-+]?\s*(?:{_UNSIGNED})"
_NUMBER = re.compile(rf"""
    (?P<sign>[-+]?)\s*
    (?: (?P<plain>{_UNSIGNED})
      | \\frac\s*\{{\s*(?P<num>{_SIGNED})\s*\}}\s*\{{\s*(?P<den>{_SIGNED})\s*\}}
      | (?P<top>{_UNSIGNED})\s*/\s*(?P<bottom>{_UNSIGNED})
    )
    (?:\s+{_UNIT})?
""", re.VERBOSE)

_WRAPPER_OR_BRACE = re.compile(r"\\(?:text|textrm|mathrm|mbox)\s*\{|[{}]")
_DROPPED = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[,!;:]|\\[()\[\]]|\\?\$|\\?%")
_DEGREES = re.compile(r"\^\s*(?:\\circ|\{\s*\\circ\s*\})|°")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*")


def _group(text: str, open_at: int) -> str | None:
    """The content of the brace group whose ``{`` is at ``open_at``, or None when it does not close within
    `MAX_ANSWER_CHARS` characters: unclosed, or too long to be an answer. Looking no further keeps a text of many
    unclosed groups linear."""
    depth = 0
    for brace in _BRACE.finditer(text, open_at, open_at + MAX_ANSWER_CHARS + 2):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1:brace.start()]
    return None


def _markers(text: str) -> list[str]:
    """The answer after every GSM8K ``####`` marker in order, leaving out Markdown headings (``#### Step 1``)."""
    return [rest for rest in map(str.strip, _MARKER.findall(text)) if rest and not rest[0].isalpha()]


def _statement(text: str) -> tuple[str | None, int] | None:
    """The answer that ``text`` states in its last box, else in its last ``####`` marker, and how many boxes
    (one, or two for more) and markers it has; None when it has neither. The answer is None when the last box is
    empty, unclosed or longer than `MAX_ANSWER_CHARS`."""
    markers = _markers(text)
    last_box = _LAST_BOX.match(text)
    if last_box is not None:
        content = _group(text, last_box.end() - 1)
        answer = content.strip() if content is not None else ""
        boxes = 2 if _BOX.search(text, 0, last_box.start(1)) else 1
        return answer or None, boxes + len(markers)
    if markers:
        return markers[-1], len(markers)
    return None


def _final_number(text: str) -> str | None:
    """The last number of ``text`` and everything after it, less trailing spaces, periods and Markdown stars, when
    that is at most `MAX_ANSWER_CHARS` long; else None."""
    text = text.rstrip().rstrip(".*").rstrip()
    # One character more than an answer may hold, so that a sign just before an over-long answer is not cut off.
    last = None
    for last in _TEXT_NUMBER.finditer(text, max(0, len(text) - MAX_ANSWER_CHARS - 1)):
        pass
    answer = text[last.start():] if last is not None else ""
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text`` (a completion or a reference solution), unnormalised: the content of
    the last ``\\boxed{}``, else the text after the last ``####`` marker, else the last number and what follows
    it, else None. None too for a text longer than `MAX_TEXT_CHARS`. See docs/reward-models.md for the details."""
    if not text or len(text) > MAX_TEXT_CHARS:
        return None
    statement = _statement(text)
    if statement is not None:
        return statement[0]
    return _final_number(text)


def _unwrap_text(answer: str) -> str:
    """``answer`` with each ``\\text{X}`` (and its kin) replaced by `` X``; the space keeps a unit apart from the
    number it follows, as the typeset form shows it. One pass, with a stack of the open groups; a wrapper that
    never closes stays as written."""
    pieces: list[str] = []
    open_groups: list[int | None] = []  # per open group, the index of its wrapper's piece (None for a plain "{")
    end = 0
    for token in _WRAPPER_OR_BRACE.finditer(answer):
        pieces.append(answer[end:token.start()])
        end = token.end()
        if token.group() != "}":
            open_groups.append(None if token.group() == "{" else len(pieces))
            pieces.append(token.group())
        elif open_groups and (wrapper := open_groups.pop()) is not None:
            pieces[wrapper] = " "  # the wrapper and its closing brace go; the content stays
        else:
            pieces.append("}")
    pieces.append(answer[end:])
    return "".join(pieces)


def _clean(answer: str) -> str | None:
    """``answer`` without layout: the LaTeX and currency marks that do not change its value, text wrappers,
    degree and percent signs, a leading single-letter assignment, trailing periods and a leading ``+``. None for
    an answer longer than `MAX_ANSWER_CHARS`."""
    text = str(answer).strip()
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = text.replace("\u2212", "-")
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
    return text.removeprefix("+").strip()


def _value(text: str) -> Fraction | None:
    """The exact value of a signed decimal with optional thousands separators, or None."""
    text = re.sub(r"\s+", "", text).replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _number(text: str) -> Fraction | None:
    """The value of a cleaned answer that is wholly a number, with at most one unit after it, else None."""
    match = _NUMBER.fullmatch(text)
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
    value in lowest terms (``"3"``, ``"-1/2"``); anything else its cleaned-up text; an answer longer than
    `MAX_ANSWER_CHARS` becomes ``""``, which matches nothing. The rules are in docs/reward-models.md."""
    text = _clean(answer)
    if text is None:
        return ""
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
    if len(text) > MAX_TEXT_CHARS:
        return None
    statement = _statement(text)
    if statement is not None:
        return statement[0]
    return text.strip() or None


def answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion's extracted answer matches the reference in the ``answer``
    column (a GSM8K solution ending in ``#### 72``, a boxed solution, or a bare answer), else 0.0."""
    return [float(answers_match(extract_answer(_completion_text(c)), _reference_answer(a)))
            for c, a in zip(completions, answer, strict=True)]


def _states_one_number(text: str) -> bool:
    """Whether ``text`` has exactly one box or marker, and its answer is a number."""
    statement = _statement(text) if len(text) <= MAX_TEXT_CHARS else None
    if statement is None or statement[1] != 1 or statement[0] is None:
        return False
    cleaned = _clean(statement[0])
    return cleaned is not None and _number(cleaned) is not None


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """trl reward function: 1.0 where the completion states exactly one final answer, as a number in a form
    `answer_reward` accepts, else 0.0. That is either exactly one ``\\boxed{...}`` and no ``####`` marker, or
    exactly one ``#### n`` marker and no box; the number itself may be right or wrong."""
    return [float(_states_one_number(_completion_text(completion))) for completion in completions]
