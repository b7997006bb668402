"""Reward models: one interface, chosen by name."""

import pytest

from llm_iif.config import RewardConfig
from llm_iif.errors import UserError
from reward_models import load_reward_model


def test_vader_scores_the_response_sentiment():
    reward = load_reward_model(RewardConfig(name="vader"))
    good, bad, flat = reward(["the movie was"] * 3, [" great .", " awful .", " long ."])
    assert good > 0.5 and bad < -0.4 and flat == 0.0


def test_hf_classifier_loads_a_local_directory(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                                                     n_layer=1, n_head=2, num_labels=1,
                                                     pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path), batch_size=2))
    scores = reward(["a", "b", "c"], [" great .", " awful .", " long and boring ."])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    # A batch must score like single samples: padding may not leak into the score.
    assert reward(["c"], [" long and boring ."])[0] == pytest.approx(scores[2], abs=1e-5)


@pytest.mark.parametrize("cfg, message", [
    (RewardConfig(name="nope"), "reward.name: unknown reward model 'nope'"),
    (RewardConfig(name="hf-classifier"), "reward.name_or_path: required"),
    (RewardConfig(name="hf-classifier", name_or_path="no/such-model"), "reward.name_or_path: cannot load"),
])
def test_bad_reward_config(cfg, message):
    with pytest.raises(UserError, match=message):
        load_reward_model(cfg)
