"""Reward models: one interface, chosen by name."""

import pytest
import torch

from llm_iif.recipes import RewardConfig
from llm_iif.core.errors import UserError
from reward_models import load_reward_model
from reward_models.hf_classifier import label_score


def test_vader_scores_the_response_sentiment():
    reward = load_reward_model(RewardConfig(name="vader"))
    good, bad, flat = reward(["the movie was"] * 3, [" great .", " awful .", " long ."])
    assert good > 0.5 and bad < -0.4 and flat == 0.0


def test_vader_as_a_trl_reward_function_reads_text_and_conversational_completions():
    from reward_models.vader import sentiment_reward

    rewards = sentiment_reward([" great .", [{"role": "assistant", "content": " awful ."}]], prompts=["a", "b"])
    assert rewards[0] > 0.5 and rewards[1] < -0.4


def save_tiny_classifier(directory, tokenizer_dir, num_labels: int, names=None):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def test_hf_classifier_loads_a_local_directory(tmp_path, tiny_model_dir):
    save_tiny_classifier(tmp_path, tiny_model_dir, num_labels=1)
    reward = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path), batch_size=2))
    scores = reward(["a", "b", "c"], [" great .", " awful .", " long and boring ."])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    # A batch must score like single samples: padding may not leak into the score.
    assert reward(["c"], [" long and boring ."])[0] == pytest.approx(scores[2], abs=1e-5)


def test_hf_classifier_label_output_and_input(tmp_path, tiny_model_dir):
    model, tokenizer = save_tiny_classifier(tmp_path, tiny_model_dir, num_labels=3,
                                            names=["hate", "neutral", "offensive"])
    prompts, responses = ["the film was", "i felt"], [" great and fun .", " dull ."]

    def expected(texts, pairs=None):
        logits = []
        for i, text in enumerate(texts):  # one at a time: no padding
            args = (text,) if pairs is None else (pairs[i], text)
            with torch.no_grad():
                logits.append(model(**tokenizer(*args, return_tensors="pt")).logits[0])
        return torch.stack(logits)

    def scores(**options):
        cfg = RewardConfig(name="hf-classifier", name_or_path=str(tmp_path), **options)
        return torch.tensor(load_reward_model(cfg)(prompts, responses))

    on_response = expected(responses)
    on_both = expected([p + r for p, r in zip(prompts, responses)])
    assert torch.allclose(scores(label="neutral", input="response"), on_response[:, 1], atol=1e-5)
    assert torch.allclose(scores(label=1, input="response"), on_response[:, 1], atol=1e-5)
    assert torch.allclose(scores(label="offensive"), on_both[:, 2], atol=1e-5)  # prompt+response by default
    assert torch.allclose(scores(label=1, input="response", output="prob"), on_response.softmax(-1)[:, 1],
                          atol=1e-5)
    assert torch.allclose(scores(label=1, input="response", output="log_prob"),
                          on_response.log_softmax(-1)[:, 1], atol=1e-5)
    assert torch.allclose(scores(label=0, input="pair"), expected(responses, pairs=prompts)[:, 0], atol=1e-5)


def test_one_label_probability_is_a_sigmoid():
    logits = torch.tensor([[0.0], [2.0]])
    assert torch.allclose(label_score(logits, 0, "prob"), torch.sigmoid(logits[:, 0]))
    assert torch.allclose(label_score(logits, 0, "log_prob"), torch.log(torch.sigmoid(logits[:, 0])))


def test_hf_classifier_errors(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    three = tmp_path / "three"
    save_tiny_classifier(three, tiny_model_dir, num_labels=3, names=["hate", "neutral", "offensive"])
    with pytest.raises(UserError, match=r"reward.label: 'nice' is not a label of .* 0=hate, 1=neutral"):
        load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(three), label="nice"))
    with pytest.raises(UserError, match="reward.label: '3' is not a label"):
        load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(three), label=3))
    with pytest.raises(UserError, match="reward.label: required .* which has 3 labels"):
        load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(three)))
    reward = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(three), label=0,
                                            input="response"))
    with pytest.raises(UserError, match="response 1 .* is empty"):
        reward(["a", "b"], [" fine .", ""])
    # A causal LM checkpoint has no classification head: loading it must not invent a random one.
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "lm")
    save_tiny_classifier(tmp_path / "unused", tiny_model_dir, num_labels=1)[1].save_pretrained(tmp_path / "lm")
    with pytest.raises(UserError, match="is not a sequence classifier"):
        load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "lm")))


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


def wrong_count(prompts, responses):
    return [1.0]


def not_numbers(prompts, responses):
    return ["high"] * len(responses)


def one_argument(responses):
    return [0.0] * len(responses)


def test_callable_reward():
    reward = load_reward_model(RewardConfig(name="callable", function=f"{__name__}:length_reward"))
    assert reward(["p", "q"], [" a b c", " d"]) == [3.0, 1.0]


@pytest.mark.parametrize("function, message", [
    (None, "reward.function: expected module:function"),
    ("no_such_module:f", "reward.function: cannot import 'no_such_module:f'"),
    (f"{__name__}:nothing_here", "cannot import"),
    (f"{__name__}:one_argument", "must accept \\(prompts, responses\\)"),
])
def test_callable_reward_bad_function(function, message):
    with pytest.raises(UserError, match=message):
        load_reward_model(RewardConfig(name="callable", function=function))


@pytest.mark.parametrize("function, message", [
    ("wrong_count", "returned 1 values for 2 responses"),
    ("not_numbers", "returned 'high'; expected a number"),
])
def test_callable_reward_bad_output(function, message):
    reward = load_reward_model(RewardConfig(name="callable", function=f"{__name__}:{function}"))
    with pytest.raises(UserError, match=message):
        reward(["p", "q"], [" a", " b"])


@pytest.mark.parametrize("cfg, message", [
    (RewardConfig(name="nope"), "reward.name: unknown reward model 'nope'"),
    (RewardConfig(name="hf-classifier"), "reward.name_or_path: required"),
    (RewardConfig(name="hf-classifier", name_or_path="no/such-model"), "reward.name_or_path: cannot load 'no/such-model'"),
])
def test_bad_reward_config(cfg, message):
    with pytest.raises(UserError, match=message):
        load_reward_model(cfg)


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"


def test_hf_classifier_reads_a_conversation_through_its_chat_template(tmp_path, tiny_model_dir):
    _, tokenizer = save_tiny_classifier(tmp_path / "plain", tiny_model_dir, num_labels=1)
    model, _ = save_tiny_classifier(tmp_path / "chat", tiny_model_dir, num_labels=1)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(tmp_path / "chat")
    chat = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "chat"),
                                          chat_template=True))
    as_text = load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "chat"),
                                             input="response"))
    system = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the movie"}]
    scores = chat(["the movie", system], [" was great .", " was awful ."])
    # The score of exactly the text the template makes, message lists included.
    assert scores == pytest.approx(as_text(["", ""], ["<user> the movie <assistant>  was great . ",
                                                     "<system> be kind <user> the movie <assistant>  was awful . "]),
                                   abs=1e-6)
    assert scores[0] != pytest.approx(as_text([""], ["the movie was great ."])[0], abs=1e-4)  # not the plain text
    with pytest.raises(UserError, match="reward.chat_template: true, but the tokenizer of .* has no chat template"):
        load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "plain"), chat_template=True))
    with pytest.raises(UserError, match="reward.chat_template: true reads prompt and response as one conversation; "
                                        "expected reward.input: prompt\\+response, got pair"):
        load_reward_model(RewardConfig(name="hf-classifier", name_or_path=str(tmp_path / "chat"), input="pair",
                                       chat_template=True))
