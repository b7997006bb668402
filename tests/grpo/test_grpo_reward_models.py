"""A reward model as a GRPO reward, beside reward functions, as trl's reward_funcs takes one."""

import json

import yaml

from conftest import cli_in_process
from test_grpo_recipes import RECIPE, small


def tiny_judge(directory, tokenizer_dir) -> str:
    """A randomly initialised one-label sequence classifier with the adder's tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def recipe_with_judge(directory, model_dir, **judge):
    """The GRPO recipe with its checker and a reward model ``judge`` (an hf-classifier) as rewards."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["rewards"] = {"llm_iif.lm.addition:exact_match_reward": 1.0,
                      "judge": {"name": "hf-classifier", "name_or_path": tiny_judge(directory / "judge", model_dir),
                                "weight": 0.5, **judge}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_reward_model_entry_trains_and_is_evaluated(random_adder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stderr = cli_in_process(capsys, "train", recipe_with_judge(tmp_path, random_adder_dir), "--output-dir", out,
                                  *small(random_adder_dir, "run.steps=1", "iif.enabled=false"))
    assert code == 0, stderr[-3000:]
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # trl logs each reward under its name; the classifier's logits are real numbers, not 0/1 like the checker's.
    assert {"rewards/judge/mean", "eval/judge", "eval/exact_match_reward"} <= line.keys()
    assert line["eval/judge"] not in (0.0, 1.0)


def test_a_reward_model_entry_that_is_no_classifier_is_one_line(random_adder_dir, tmp_path, capsys):
    bad = recipe_with_judge(tmp_path, random_adder_dir, name_or_path=str(random_adder_dir))
    code, stderr = cli_in_process(capsys, "train", bad, "--output-dir", tmp_path / "bad",
                                  *small(random_adder_dir, "run.steps=1"))
    assert code == 2 and stderr.strip().count("\n") == 0, stderr
    assert "rewards.judge.name_or_path: " in stderr and "is not a sequence classifier" in stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_a_reward_model_entry_with_an_unknown_key_names_it(random_adder_dir, tmp_path, capsys):
    recipe = recipe_with_judge(tmp_path, random_adder_dir, wieght=1)
    code, stderr = cli_in_process(capsys, "train", recipe, "--output-dir", tmp_path / "bad",
                                  *small(random_adder_dir, "run.steps=1"))
    assert code == 2 and "rewards.judge.wieght: unknown key" in stderr, stderr


def test_a_reward_model_gets_conversational_prompts_as_messages_and_completions_as_text():
    from llm_iif.grpo.run import model_reward_function

    seen = []

    def judge(prompts, responses, **columns):
        seen.append((prompts, responses, columns))
        return [float(len(r)) for r in responses]

    reward = model_reward_function("judge", judge)
    prompts = [[{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]] * 2
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "12"}]]
    assert reward.__name__ == "judge"  # trl logs rewards/judge/mean
    assert reward(prompts=prompts, completions=completions, answer=["3", "3"]) == [1.0, 2.0]
    assert seen == [(prompts, ["3", "12"], {})]  # a reward model reads text, not the data's columns
    assert reward(prompts=["1+2="], completions=["3"]) == [1.0]
