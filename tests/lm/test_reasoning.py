"""The offline chain-of-thought task (`llm_iif.lm.reasoning`): problems, worked chains, rewards, tokenizer and the
model build (a few warm-up steps into a temporary cache; the real build takes minutes)."""

import json

import pytest

from llm_iif.lm import reasoning
from llm_iif.lm.builtin import EOS_TOKEN
from llm_iif.lm.reasoning import (MAX_CHAIN_TOKENS, NUM_OPERANDS, answer_reward, chain_problems, final_answer,
                                  format_reward, reasoner_tokenizer, worked_chain)


def test_problems_are_deterministic_and_equally_long():
    rows = chain_problems(300, seed=4)
    assert rows == chain_problems(300, seed=4) and rows != chain_problems(300, seed=5)
    # trl never left-pads prompts of one length, so every prompt is sampled and scored at the same positions.
    assert {len(reasoner_tokenizer().encode(r["prompt"])) for r in rows} == {3 * NUM_OPERANDS}
    assert chain_problems(1, seed=0)[0].keys() == {"prompt", "answer", "chain"}


def test_worked_chains_add_up_to_the_answer():
    tokenizer = reasoner_tokenizer()
    for row in chain_problems(300, seed=1):
        operands = [int(x) for x in row["prompt"].rstrip("=").split("+")]
        assert row["answer"] == str(sum(operands))
        steps, answer = row["chain"].split(";")
        assert answer == row["answer"]
        total = operands[0]
        for step, operand in zip(steps.split(","), operands[1:], strict=True):
            left, right = step.split("=")
            assert [int(x) for x in left.split("+")] == [total, operand] and int(right) == total + operand
            total += operand
        assert len(tokenizer.encode(row["chain"])) + 1 <= MAX_CHAIN_TOKENS  # with EOS, within a completion


def test_worked_chain_copies_the_prompt_operands():
    assert worked_chain([17, 25, 8, 40]) == "17+25=42,42+08=50,50+40=90;90"
    assert worked_chain([3, 4, 99, 99]) == "03+04=7,7+99=106,106+99=205;205"


@pytest.mark.parametrize("completion, reward", [
    ("17+25=42,42+08=50,50+40=90;90", 1.0),
    (" 17+25=42,42+08=50,50+40=90;90 ", 1.0),                # whitespace around is not part of it
    ("17+25=42,42+08=50,50+40=90;90" + EOS_TOKEN + "1", 1.0),  # nor anything after an end of text
    ("17+25=41,41+08=50,50+40=90;90", 1.0),                  # a wrong step is not checked: only the answer is
    (";90", 1.0),                                            # nor is a missing chain
    ("17+25=42,42+08=50,50+40=91;91", 0.0),
    ("17+25=42,42+08=50,50+40=90;090", 0.0),                 # exactly the number, unpadded
    ("17+25=42,42+08=50,50+40=90", 0.0),                     # no final answer
    ("17+25=42,42+08=50,50+40=90;", 0.0),
    ("90", 0.0),
    ("", 0.0),
])
def test_answer_reward_checks_the_final_answer_only(completion, reward):
    assert answer_reward([completion], ["90"]) == [reward]


def test_rewards_read_conversational_completions():
    message = [{"role": "assistant", "content": "17+25=42,42+08=50,50+40=90;90"}]
    assert answer_reward([message, []], ["90", "90"]) == [1.0, 0.0]
    assert format_reward([message, []]) == [1.0, 0.0]
    assert final_answer(message) == "90" and final_answer("17+25=42") is None


@pytest.mark.parametrize("completion, reward", [
    ("17+25=42,42+08=50,50+40=90;90", 1.0),
    ("17+25=41,41+08=50;7", 1.0),       # wrong arithmetic, any number of steps: the shape is right
    ("17+25=42;42", 1.0),
    (";90", 0.0),                      # no chain
    ("17+25=42,42+08=50,50+40=90", 0.0),
    ("17+25=42,,42+08=50;50", 0.0),
    ("17+25=42,42+08=;50", 0.0),
    ("17+25=42;4;2", 0.0),
    ("17+25=42,42+08=50;50=", 0.0),
])
def test_format_reward_pays_for_the_shape_of_a_chain(completion, reward):
    assert format_reward([completion]) == [reward]


def test_tokenizer_has_one_token_per_character_and_round_trips():
    tokenizer = reasoner_tokenizer()
    row = chain_problems(1, seed=0)[0]
    ids = tokenizer.encode(row["prompt"] + row["chain"])
    assert len(ids) == len(row["prompt"] + row["chain"]) and tokenizer.unk_token_id not in ids[:-1]
    assert tokenizer.decode(ids) == row["prompt"] + row["chain"]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == row["prompt"] + row["chain"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (0, 1, "left")


def test_a_short_build_is_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("a", "b"):
        reasoning.build_tiny_reasoner(tmp_path / name, seed=3, max_steps=4, check_every=2, batch_size=8, n_embd=32,
                                      n_layer=1, probe_size=8)
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]
    record = json.loads((tmp_path / "a" / "warmup.json").read_text())
    assert record["version"] == reasoning.REASONER_MODEL_VERSION and record["steps"] == 4
    assert record["sampled_accuracy"] < record["target_accuracy"]  # four steps are far too few: it ran out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tokenizer.encode("17+25+08+40=") == reasoner_tokenizer().encode("17+25+08+40=")
    accuracy = reasoning.chain_accuracy(model, tokenizer, chain_problems(4, seed=0), temperature=0.0)
    assert 0.0 <= accuracy <= 1.0


def test_builtin_name_builds_once_into_the_cache(tmp_path, monkeypatch):
    from llm_iif.models.builtins import resolve_builtin

    builds = []
    monkeypatch.setenv("LLM_IIF_CACHE", str(tmp_path))
    monkeypatch.setattr(reasoning, "build_tiny_reasoner",
                        lambda out, seed: (builds.append(seed), (out / "config.json").touch()))
    first = resolve_builtin("builtin:tiny-reasoner")
    assert resolve_builtin("builtin:tiny-reasoner") == first and builds == [0]
    assert first == str(tmp_path / f"tiny-reasoner-{reasoning.REASONER_MODEL_VERSION}")
