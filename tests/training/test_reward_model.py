"""`llm-iif reward train`: trl's RewardTrainer on preference pairs, saved for the hf-classifier reward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_iif.recipes import RewardConfig
from llm_iif.lm.preferences import hidden_preference_score, preference_pairs
from reward_models import load_reward_model

REPO = Path(__file__).resolve().parents[2]


def write_pairs(path: Path, n: int, columns=("prompt", "chosen", "rejected")) -> Path:
    pairs = preference_pairs(num_pairs=n, seed=5)
    path.write_text("".join(json.dumps({c: pairs[c][i] for c in columns}) + "\n" for i in range(n)))
    return path


def reward_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_iif", "reward", "train",
                           str(REPO / "recipes/reward/tiny.yaml"), *args],
                          capture_output=True, text=True, timeout=900)


def test_preference_pairs_follow_the_hidden_rule():
    pairs = preference_pairs(num_pairs=50)
    chosen = hidden_preference_score(pairs["prompt"], pairs["chosen"])
    rejected = hidden_preference_score(pairs["prompt"], pairs["rejected"])
    assert all(c > r for c, r in zip(chosen, rejected))


@pytest.fixture(scope="module")
def trained_reward_model(tmp_path_factory) -> Path:
    """OUTPUT_DIR of `llm-iif reward train` on 600 pairs from a local jsonl file, one epoch (about 40 s)."""
    tmp_path = tmp_path_factory.mktemp("reward-train")
    data = write_pairs(tmp_path / "pairs.jsonl", 600)
    proc = reward_train("--set", f"data.source={data}", "--set", "train.epochs=1", "--set", "data.validation_fraction=0.2",
                        "--output-dir", str(tmp_path / "rm"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "rm"


def test_reward_train_learns_the_preferences_and_saves_a_loadable_model(trained_reward_model):
    metrics = json.loads((trained_reward_model / "eval.json").read_text())
    assert metrics["heldout_pairs"] == 120 and metrics["train_pairs"] == 480
    assert metrics["heldout_accuracy"] >= 0.75  # chance is 0.5
    # The saved directory is what the hf-classifier reward loads, as it is.
    reward = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(trained_reward_model / "model"),
                                            append_eos=True))
    good, bad = reward(["the food was"] * 2, [" really wonderful and the staff was friendly .", " awful ."])
    assert good > bad


def test_learned_reward_recipe_trains_and_reports_the_hidden_rule(trained_reward_model, tmp_path):
    # The recipe's builtin:tiny-reward-model is the same training on more pairs; a smaller one stands in.
    proc = subprocess.run([sys.executable, "-m", "llm_iif", "train", str(REPO / "recipes/tiny-learned-rm.yaml"),
                           "--set", f"reward.name_or_path={trained_reward_model / 'model'}", "--set", "run.rounds=2",
                           "--set", "run.batch_size=16", "--set", "iif.val_size=16", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pyarrow.parquet as pq

    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all("kept_fraction" in m for m in rounds)
    for k, metrics in enumerate(rounds):  # reward/hidden_rule is the rule's mean over the round's samples
        records = pq.read_table(tmp_path / "records" / f"round_{k:04d}.parquet").to_pydict()
        rule = hidden_preference_score(records["prompt"], records["response"])
        assert metrics["reward/hidden_rule"] == pytest.approx(sum(rule) / len(rule), abs=1e-6)


def test_reward_train_with_lora_saves_a_merged_model(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 80, columns=("chosen", "rejected"))
    proc = reward_train("--set", f"data.source={data}", "--set", "data.prompt_column=null", "--set", "train.epochs=1",
                        "--set", "train.use_lora=true", "--output-dir", str(tmp_path / "rm"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "rm" / "model" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["use_lora"] is True
    load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "rm" / "model")))


@pytest.mark.parametrize("columns, override, message", [
    (("prompt", "chosen"), [], "data.rejected_column: 'rejected' is not a column of"),
    (("prompt", "chosen", "rejected"), ["--set", "data.chosen_column=better"],
     "data.chosen_column: 'better' is not a column of"),
])
def test_preference_file_with_missing_columns(tmp_path, columns, override, message):
    data = write_pairs(tmp_path / "pairs.jsonl", 10, columns=columns)
    proc = reward_train("--set", f"data.source={data}", *override, "--output-dir", str(tmp_path / "rm"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_training_a_reward_model_leaves_later_runs_in_full_precision(tmp_path, tiny_model_dir):
    # trl's RewardConfig defaults to bf16, and an HF Trainer resets Accelerate's process-wide state to its own:
    # a policy trained after it in the same process (a suite whose cache is cold) would inherit bf16.
    from accelerate import Accelerator

    from llm_iif.recipes import RewardTrainRecipe, recipe_from_dict
    from llm_iif.models.reward_model import train_reward_model

    before = Accelerator()
    recipe = recipe_from_dict({"model": {"name_or_path": str(tiny_model_dir)},
                               "data": {"source": str(write_pairs(tmp_path / "pairs.jsonl", 40))},
                               "train": {"epochs": 1, "max_length": 32}, "run": {"output_dir": str(tmp_path / "rm")}},
                              source="test", kind=RewardTrainRecipe)
    train_reward_model(recipe, base_model=str(tiny_model_dir))
    after = Accelerator()
    assert (before.mixed_precision, after.mixed_precision, after.native_amp) == ("no", "no", False)


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"


def conversational_pairs(path: Path, n: int, implicit_prompt: bool) -> Path:
    """trl's conversational preference format: message lists, the prompt inside chosen and rejected (implicit) or
    in a prompt column of its own."""
    pairs = preference_pairs(num_pairs=n, seed=5)
    rows = []
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        user = [{"role": "user", "content": prompt}]
        answers = [[{"role": "assistant", "content": text}] for text in (chosen, rejected)]
        rows.append({"chosen": user + answers[0], "rejected": user + answers[1]} if implicit_prompt
                    else {"prompt": user, "chosen": answers[0], "rejected": answers[1]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def base_with_chat_template(directory: Path, tiny_model_dir) -> Path:
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("implicit_prompt", [True, False])
def test_conversational_pairs_are_written_through_the_chat_template(tmp_path, tiny_model_dir, implicit_prompt):
    from transformers import AutoTokenizer

    from llm_iif.recipes import PreferenceDataConfig
    from llm_iif.core.errors import UserError
    from llm_iif.models.reward_model import _pair_texts

    source = conversational_pairs(tmp_path / "chat.jsonl", 3, implicit_prompt)
    data = PreferenceDataConfig(source=str(source), prompt_column=None if implicit_prompt else "prompt")
    tokenizer = AutoTokenizer.from_pretrained(base_with_chat_template(tmp_path / "base", tiny_model_dir))
    pairs, conversational = _pair_texts(data, tokenizer)
    plain = preference_pairs(num_pairs=3, seed=5)
    assert conversational and pairs[0] == (f"<user> {plain['prompt'][0]} <assistant> {plain['chosen'][0]} ",
                                           f"<user> {plain['prompt'][0]} <assistant> {plain['rejected'][0]} ")
    with pytest.raises(UserError, match="holds conversations, and the tokenizer of model.name_or_path has no chat "
                                        "template"):
        _pair_texts(data, AutoTokenizer.from_pretrained(tiny_model_dir))


def test_reward_train_reads_a_conversational_dataset(tmp_path, tiny_model_dir):
    source = conversational_pairs(tmp_path / "chat.jsonl", 60, implicit_prompt=True)
    base = base_with_chat_template(tmp_path / "base", tiny_model_dir)
    proc = reward_train("--set", f"data.source={source}", "--set", "data.prompt_column=null",
                        "--set", f"model.name_or_path={base}", "--set", "train.epochs=1",
                        "--output-dir", str(tmp_path / "rm"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "append_eos: true, chat_template: true" in proc.stdout
    metrics = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert metrics["chat_template"] and metrics["train_pairs"] + metrics["heldout_pairs"] == 60
    reward = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "rm" / "model"),
                                            append_eos=True, chat_template=True))
    assert len(reward(["a review"], [" great ."])) == 1
