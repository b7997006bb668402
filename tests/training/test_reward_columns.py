"""PPO rewards read the prompts' other dataset columns, as trl's reward functions do, so one math checker serves
PPO and GRPO."""

import json

import pytest

from llm_iif.recipes import DataConfig, recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.lm.data import read_prompts
from llm_iif.lm.generation import tokenize_pairs
from llm_iif.lm.rollouts import RewardWithColumns
from llm_iif.training import build_trainer
from reward_models.python_callable import CallableReward

SUMS = [(a, b) for a in range(1, 5) for b in range(3, 5)]  # 8 problems


def answer_only(prompts, responses, answer):
    return [float(a) for a in answer]


def every_column(prompts, responses, **columns):
    return [float(len(columns))] * len(responses)


def text_only(prompts, responses):
    return [1.0] * len(responses)


def test_a_callable_reward_gets_the_columns_it_names_or_all_with_kwargs():
    columns = {"answer": ["7", "9"], "level": [1, 2]}
    assert CallableReward(f"{__name__}:answer_only")(["p", "q"], ["r", "s"], **columns) == [7.0, 9.0]
    assert CallableReward(f"{__name__}:every_column")(["p", "q"], ["r", "s"], **columns) == [2.0, 2.0]
    assert CallableReward(f"{__name__}:text_only")(["p", "q"], ["r", "s"], **columns) == [1.0, 1.0]
    with pytest.raises(UserError, match="needs the dataset column 'answer'"):
        CallableReward(f"{__name__}:answer_only")(["p"], ["r"], level=[1])


def write_problems(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_read_prompts_keeps_each_prompts_other_columns(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    source = write_problems(tmp_path / "p.jsonl", [{"prompt": "the movie was great", "label": 1},
                                                   {"prompt": "the movie was dull", "label": 0},
                                                   {"prompt": "the film", "label": 1}])
    prompts, dropped, columns = read_prompts(DataConfig(source=source), tokenizer)
    assert prompts == ["the movie was great", "the movie was dull", "the film"] and dropped == 0
    assert [columns.get(p) for p in prompts] == [{"label": 1}, {"label": 0}, {"label": 1}]
    assert columns.names() == {"label"} and columns.get("no such prompt") is None
    # Cut to their first three tokens, two prompts become one text with two labels: no reward may read them.
    cut, _, columns = read_prompts(DataConfig(source=source, truncate_prompt_tokens=3), tokenizer)
    assert cut[0] == cut[1] and cut[0] in columns and columns.get(cut[0]) is None
    assert columns.get("the film") == {"label": 1}
    # Two sources: a text they give different columns has none; the same columns are no conflict.
    other = write_problems(tmp_path / "q.jsonl", [{"prompt": "the movie was great", "label": 0},
                                                  {"prompt": "the film", "label": 1}])
    merged = read_prompts(DataConfig(source=source), tokenizer)[2].merged(read_prompts(DataConfig(source=other),
                                                                                      tokenizer)[2])
    assert merged.get("the movie was great") is None and merged.get("the film") == {"label": 1}
    assert merged.get("the movie was dull") == {"label": 0}


def test_reward_with_columns_refuses_what_it_cannot_look_up(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    source = write_problems(tmp_path / "p.jsonl", [{"prompt": "the movie was great", "answer": "7"},
                                                   {"prompt": "the movie was dull", "answer": "8"}])
    columns = read_prompts(DataConfig(source=source, truncate_prompt_tokens=3), tokenizer)[2]
    (shared,) = {p for p in ["the movie was"] if p in columns}
    full = read_prompts(DataConfig(source=source), tokenizer)[2]
    reward = RewardWithColumns(CallableReward(f"{__name__}:answer_only"), full, "reward")
    assert reward(["the movie was dull"], ["r"]) == [8.0]
    with pytest.raises(UserError, match="reward: reads dataset columns, but the prompt 'the movie was' is shared by "
                                        "rows with different columns"):
        RewardWithColumns(CallableReward(f"{__name__}:answer_only"), columns, "reward")([shared], ["r"])
    with pytest.raises(UserError, match="the prompt 'q' is in no row of the data"):
        reward(["q"], ["r"])
    # A reward that reads no column scores any prompt.
    assert RewardWithColumns(CallableReward(f"{__name__}:text_only"), full, "reward")(["q"], ["r"]) == [1.0]
    labels = write_problems(tmp_path / "l.jsonl", [{"prompt": "the film", "level": 1}])
    with pytest.raises(UserError, match="reward: needs the dataset column 'answer', which the prompts' data lacks "
                                        r"\(columns: level\)"):
        RewardWithColumns(CallableReward(f"{__name__}:answer_only"), read_prompts(DataConfig(source=labels),
                                                                                 tokenizer)[2], "reward")


def right_for_odd_sums(lm, tokenizer, prompts, cfg, device):
    """The right sum for problems whose sum is odd, one more for the others: half the answers are right."""
    sums = [sum(int(n) for n in prompt.rstrip("=").split("+")) for prompt in prompts]
    return tokenize_pairs(tokenizer, prompts, [str(s if s % 2 else s + 1) for s in sums], device)


def test_ppo_pays_math_verifier_answers_from_the_answer_column(tmp_path, random_adder_dir):
    source = write_problems(tmp_path / "sums.jsonl", [{"prompt": f"{a}+{b}=", "answer": f"#### {a + b}"}
                                                      for a, b in SUMS])
    raw = {"model": {"name_or_path": str(random_adder_dir)}, "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
           "data": {"source": source, "validation_fraction": 0.0},
           "reward": {"name": "callable", "function": "reward_models.math_verifier:answer_reward"},
           "ppo": {"mini_batch_size": 4, "epochs": 1, "max_new_tokens": 3},
           "run": {"rounds": 1, "batch_size": 8, "output_dir": str(tmp_path / "run")}}
    history = build_trainer(recipe_from_dict(raw), sampler=right_for_odd_sums).train()
    odd = sum((a + b) % 2 for a, b in SUMS)
    assert history[0]["reward_mean"] == pytest.approx(odd / len(SUMS))  # 1 for each right answer, 0 otherwise
    write_problems(tmp_path / "sums.jsonl", [{"prompt": f"{a}+{b}=", "solution": a + b} for a, b in SUMS])
    with pytest.raises(UserError, match="reward: needs the dataset column 'answer', which the prompts' data lacks "
                                        r"\(columns: solution\)"):
        build_trainer(recipe_from_dict(raw), sampler=right_for_odd_sums)
