"""The math answer verifier: extraction, normalisation, matching, and its trl reward functions."""

import ast
import inspect
import re
from pathlib import Path

import pytest

import reward_models.math_verifier as math_verifier
from reward_models.math_verifier import answer_reward, answers_match, extract_answer, format_reward, normalise_answer


# ------------------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, expected", [
    ("so the total is \\boxed{42}.", "42"),
    ("first \\boxed{1}, then on reflection \\boxed{2}", "2"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\left(\\frac{1}{2}, \\sqrt{3}\\right)}", "\\left(\\frac{1}{2}, \\sqrt{3}\\right)"),
    ("$\\boxed {  7 }$", "7"),
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1,000"),
    ("#### 3\n\nthen again\n#### 4 dollars", "4 dollars"),  # the last marker wins
    ("#### Step 1\nten minus four is 10-4", "4"),  # a Markdown heading is not a marker; '-' after a digit subtracts
    ("##### 5\nso 7", "7"),  # five hashes is a heading
    ("#### \\boxed{3}", "3"),  # a box outranks a marker
    ("The answer is 1,234.", "1,234"),
    ("x = -5", "-5"),
    ("x = \u22125", "\u22125"),
    ("three quarters, 3/4, of them", "3/4, of them"),  # a loose number's answer runs to the end of the text
    ("it costs $2.50 each", "2.50 each"),
    ("about -.5", "-.5"),
    ("so the answer is **72**.\n", "72"),  # trailing spaces, periods and Markdown stars are not part of it
    ("\\boxed{\\boxed{72}}", "72"),  # the last box to open is the inner one
    ("\\boxed{72} \\boxed 73", "72"),  # no braces, no box
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    "",
    "no numbers here at all",
    "\\boxed{}",  # an empty box states nothing
    "\\boxed{ }",
    "so it is \\boxed{5} - no wait, \\boxed{6",  # the last box was cut off: no fallback to the earlier one
    "the answer is 12, i.e. \\boxed{",
])
def test_extract_answer_finds_none(text):
    assert extract_answer(text) is None


def test_a_loose_answer_just_over_the_bound_is_not_cut():
    # Read from the end, an answer one character too long must not lose its first character, here its sign.
    padding = "\\," * ((math_verifier.MAX_ANSWER_CHARS - 2) // 2)  # a LaTeX space, dropped by normalisation
    assert answer_reward(["q", "q"], [f"so -72{padding}", f"so -7{padding}"], ["72", "-7"]) == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("answer, canonical", [
    # thousands separators, and lists that only look like them
    ("1,234", "1234"),
    ("1,000,000", "1000000"),
    ("1{,}234", "1234"),
    ("1\\,234", "1234"),
    ("1,2", "1,2"),
    ("1, 2", "1,2"),
    ("1,2345", "1,2345"),
    # signs
    ("-5", "-5"),
    ("+5", "5"),
    ("\u22125", "-5"),
    ("- 5", "-5"),
    ("-0", "0"),
    ("-0.0", "0"),
    # fractions and decimals compare as exact values
    ("\\frac{3}{4}", "3/4"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\tfrac{3}{4}", "3/4"),
    ("\\frac34", "3/4"),
    ("3/4", "3/4"),
    ("0.75", "3/4"),
    (".75", "3/4"),
    ("6/8", "3/4"),
    ("-\\frac{1}{2}", "-1/2"),
    ("\\frac{-1}{2}", "-1/2"),
    ("2.50", "5/2"),
    ("3.0", "3"),
    # units, currency, percent and degrees
    ("$18", "18"),
    ("\\$18.00", "18"),
    ("18 dollars", "18"),
    ("18 dollars.", "18"),
    ("5\\text{ cm}", "5"),
    ("5\\text{cm}", "5"),
    ("5 \\mbox{cm}", "5"),
    ("60 km/h", "60"),
    ("50\\%", "50"),
    ("50%", "50"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30°", "30"),
    # layout
    ("  $42$. ", "42"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("x = 5", "5"),
    ("\\text{(C)}", "(C)"),
    ("no  solution", "no solution"),
    ("1 2", "1 2"),
])
def test_normalise_answer(answer, canonical):
    assert normalise_answer(answer) == canonical


@pytest.mark.parametrize("answer, number", [("5x", "5"), ("2\\pi", "2"), ("2 pi", "2"), ("2 i", "2"),
                                            ("3\\sqrt{2}", "3"), ("1/0", "1"), ("\\frac{1}{0}", "1")])
def test_algebra_is_not_mistaken_for_a_number_with_units(answer, number):
    # A letter or constant next to a number changes its value, so it is compared as text, not dropped; a zero
    # denominator is no number either.
    assert not answers_match(answer, number)
    assert answers_match(answer, answer)


@pytest.mark.parametrize("predicted, reference", [
    ("1,234", "1234"),
    ("1234", "1,234"),
    ("-5", "\u22125"),
    ("+5", "5"),
    ("\\frac{3}{4}", "0.75"),
    ("3/4", "\\dfrac{3}{4}"),
    ("0.5", "\\frac{1}{2}"),
    ("2.50", "2.5"),
    ("3", "3.0"),
    ("-0", "0"),
    ("$18", "18 dollars"),
    ("5\\text{ cm}", "5"),
    ("50\\%", "50"),
    ("(1, 2)", "\\left(1,2\\right)"),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt{3}}{2}"),
])
def test_answers_match(predicted, reference):
    assert answers_match(predicted, reference)
    assert answers_match(reference, predicted)


@pytest.mark.parametrize("predicted, reference", [
    ("5", "-5"),
    ("1,2", "12"),  # a list, not a thousands separator
    ("0.333", "1/3"),  # exact, no tolerance
    ("50\\%", "0.5"),  # a percent sign is dropped, not divided out
    ("5x", "5"),
    ("72", "27"),
    (None, "5"),
    ("5", None),
    (None, None),
    ("", ""),
    ("$", "$"),
])
def test_answers_differ(predicted, reference):
    assert not answers_match(predicted, reference)


# ------------------------------------------------------------------------------------------------ rewards
def test_answer_reward_scores_each_completion():
    completions = [
        "Half of 2,000 is \\boxed{1,000}.",  # right, with a separator
        "So she has 1000.",  # right, the number the text ends with
        "\\boxed{999}",  # wrong
        "I am not sure.",  # no answer
        "\\boxed{500} and then \\boxed{1000}",  # the last box is right
        "\\boxed{1000} and then \\boxed{500}",  # the last box is wrong
        "So she has 1000 left.",  # words after the last number
    ]
    reference = "She had 2,000 and spent half.\n#### 1,000"
    rewards = answer_reward(prompts=["q"] * 7, completions=completions, answer=[reference] * 7)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert all(type(r) is float for r in rewards)


@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # a bare LaTeX reference is taken whole, not searched for a number
    ("the answer is 0.5", "\\frac{1}{2}"),
    ("\\boxed{(1,2)}", "(1, 2)"),
    ("\\boxed{18}", "$18"),
    ("#### 18 dollars", "18"),
    ("\\boxed{-5}", "\u22125"),
    ("\\boxed{3/4}", "The probability is $\\boxed{\\dfrac{3}{4}}$."),  # a MATH-style solution
    ("\\boxed{72}", 72),  # a numeric column
])
def test_answer_reward_accepts_reference_forms(completion, reference):
    assert answer_reward(["q"], [completion], [reference]) == [1.0]


@pytest.mark.parametrize("completion", [
    "\\boxed{72}", "#### 72", "\\boxed{+72}", "\\boxed{72.0}", "\\boxed{72.}", "\\boxed{0072}", "\\boxed{\\$72}",
    "$\\boxed{72}$", "\\boxed{\\text{72}}", "\\boxed{72\\%}", "\\boxed{72^\\circ}", "\\boxed{x = 72}",
    "\\boxed{144/2}", "\\boxed{\\frac{144}{2}}", "\\boxed{\\dfrac{144}{2}}", "\\boxed{72 \\text{ dollars}}",
    "\\boxed{72\\text{cm}}", "\\boxed{72 \\mathrm{km/h}}", "\\boxed{72 Hours}", "\\boxed{72 miles per hour}",
    "\\boxed{72 square feet}", "\\boxed{72 \\text{cm}^2}", "\\boxed{72 percent}", "#### $72", "#### 72 dollars.",
    "\\boxed{ 72 }",
])
def test_accepted_forms_earn_both_rewards(completion):
    # The forms docs/reward-models.md lists; each is a number, at most one known unit, and layout.
    assert answer_reward(["q"], [completion], ["#### 72"]) == [1.0]
    assert format_reward(["q"], [completion]) == [1.0]


@pytest.mark.parametrize("unit", sorted(math_verifier.UNITS))
def test_every_unit_is_read_in_any_case_and_plural(unit):
    assert answers_match(f"72 {unit}", "72")
    assert answers_match(f"72 {unit.upper()}S", "72")


def test_the_docs_list_the_units():
    # The list under "Units" in the verifier's section of docs/reward-models.md, one category a line.
    docs = (Path(__file__).parents[2] / "docs" / "reward-models.md").read_text()
    listed = docs.split("\nUnits, ")[1].split("\n\n")[1]
    assert set(re.findall(r"`([^`]+)`", listed)) == math_verifier.UNITS


def test_answer_reward_reads_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "Adding them gives \\boxed{72}."}],
        [{"role": "assistant", "content": "\\boxed{1}"}, {"role": "assistant", "content": "#### 72"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{72}"}]}],
        [{"role": "assistant", "content": "\\boxed{71}"}],
        [{"role": "assistant", "content": "I cannot tell."}],
        [],
    ]
    rewards = answer_reward(prompts=[[{"role": "user", "content": "q"}]] * 6, completions=completions,
                            answer=["#### 72"] * 6)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_answer_reward_rejects_mismatched_columns_and_bad_completions():
    with pytest.raises(ValueError):
        answer_reward(["q", "q"], ["1", "2"], ["1"])
    with pytest.raises(TypeError, match="int"):
        answer_reward(["q"], [5], ["5"])


@pytest.mark.parametrize("completion, expected", [
    ("so \\boxed{5}", 1.0),
    ("so \\boxed{\\frac{1}{2}}", 1.0),
    ("working...\n#### 72", 1.0),
    ("\\boxed{7} is wrong but well formed", 1.0),  # the format, not the value, is scored
    ([{"role": "assistant", "content": "\\boxed{3}"}], 1.0),
    ("the answer is 5", 0.0),  # a loose number is not a checkable statement
    ("\\boxed{5} or \\boxed{6}", 0.0),  # two answers
    ("#### 5\n#### 6", 0.0),
    ("\\boxed{5}\n#### 5", 0.0),  # one box and one marker is still two statements
    ("\\boxed{}", 0.0),
    ("\\boxed{5", 0.0),  # cut off
    ("#### Step 1\nthe answer is 5", 0.0),  # a heading is not a marker
    ("\\boxed{(1,2)}", 0.0),  # not a number: without the reference, an expression is not told from a hedge
    ("\\boxed{\\boxed{5}}", 0.0),  # two boxes
    ("", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward(["q"], [completion]) == [expected]


def test_format_reward_returns_one_float_per_completion():
    completions = ["\\boxed{1}", "2", "#### 3", [{"role": "assistant", "content": "\\boxed{4}"}]]
    rewards = format_reward(prompts=["q"] * 4, completions=completions)
    assert rewards == [1.0, 0.0, 1.0, 1.0]
    assert all(type(r) is float for r in rewards)


def test_reward_functions_take_trl_keyword_arguments():
    # trl calls reward functions with keywords only: the prompts, completions, completion ids, the trainer state
    # and every other dataset column, whether the function uses it or not.
    columns = {"prompts": ["What is 8 * 9?", "What is 2 / 4?"], "completions": ["\\boxed{72}", "#### 0.25"],
               "answer": ["#### 72", "\\frac{1}{2}"], "completion_ids": [[1, 2], [3]], "trainer_state": None,
               "difficulty": ["easy", "easy"]}
    assert answer_reward(**columns) == [1.0, 0.0]
    assert format_reward(**columns) == [1.0, 1.0]
    for func in (answer_reward, format_reward):
        assert list(inspect.signature(func).parameters)[:2] == ["prompts", "completions"]


def test_format_reward_works_as_a_callable_reward_model():
    from reward_models.python_callable import CallableReward

    reward = CallableReward("reward_models.math_verifier:format_reward")
    assert reward(["q", "q"], ["\\boxed{1}", "1"]) == [1.0, 0.0]


def test_imports_nothing_from_llm_iif_but_errors():
    tree = ast.parse(Path(math_verifier.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name and name.startswith("llm_iif")} <= {"llm_iif.core.errors"}
