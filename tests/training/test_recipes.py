"""The real-model recipes, run for one round on tiny local stand-ins: a model of the same architecture family
built from a config (no downloads), classifiers with the same labels, and data files with the same columns.

This proves each recipe's code paths (LoRA targets, chat template, column mapping, filters, reward wiring,
evaluation); it says nothing about the results at full size."""

import json
import math
import random

import pytest
import yaml

from llm_iif.recipes import load_recipe
from llm_iif.training import build_trainer

WORDS = ("the movie was good bad awful great fun dull and but really quite slow plot acting it felt very "
         "we this story").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def save_with_tokenizer(model, tokenizer, path, chat_template=None):
    model.save_pretrained(path)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_causal_lm(model_type, tokenizer, path, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256),
             "gpt_neo": dict(num_layers=2, hidden_size=32, num_heads=2, attention_types=[[["global", "local"], 1]],
                             window_size=16, max_position_embeddings=256),
             "qwen2": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=512)}[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **sizes)
    return save_with_tokenizer(AutoModelForCausalLM.from_config(config), tokenizer, path, **extra)


def tiny_classifier(model_type, tokenizer, path, labels):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=600,
                                  pad_token_id=tokenizer.pad_token_id,
                                  id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    if model_type == "distilbert":
        config.update(dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    return save_with_tokenizer(AutoModelForSequenceClassification.from_config(config), tokenizer, path)


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def stand_ins(name, tmp_path, tokenizer):
    """--set overrides that swap a recipe's hub models and data sets for tiny local ones."""
    rng = random.Random(0)
    if name == "gptneo-2.7b-toxicity":
        prompts = write_rows(tmp_path / "rtp.jsonl", [
            {"filename": f"{i}.txt", "begin": 0, "end": 1, "challenging": False,
             "prompt": {"text": sentence(rng, 12), "toxicity": rng.random() if i % 5 else None, "profanity": 0.1},
             "continuation": {"text": sentence(rng, 8), "toxicity": rng.random(), "profanity": 0.1}}
            for i in range(60)])
        wiki = write_rows(tmp_path / "wiki_toxic.jsonl", [
            {"id": str(i), "comment_text": sentence(rng, rng.randint(5, 30)), "label": i % 2} for i in range(40)])
        return {"model.name_or_path": tiny_causal_lm("gpt_neo", tokenizer, tmp_path / "gpt-neo"),
                "reward.name_or_path": tiny_classifier("roberta", tokenizer, tmp_path / "roberta",
                                                       ["nothate", "hate"]),
                "data.source": prompts, "eval.data.source": wiki,
                "eval.rewards.toxicity.name_or_path": tiny_classifier("electra", tokenizer, tmp_path / "electra",
                                                                      ["not offensive", "offensive"])}
    if name == "gpt2-imdb-sentiment":
        reviews = [{"text": sentence(rng, rng.randint(3, 60)), "label": i % 2} for i in range(60)]
        imdb = write_rows(tmp_path / "imdb.jsonl", reviews)
        sentiment = tiny_classifier("distilbert", tokenizer, tmp_path / "distilbert", ["NEGATIVE", "POSITIVE"])
        return {"model.name_or_path": tiny_causal_lm("gpt2", tokenizer, tmp_path / "gpt2"),
                "reward.name_or_path": sentiment, "data.source": imdb, "eval.data.source": imdb,
                "eval.rewards.sentiment.name_or_path": sentiment}
    if name == "qwen2.5-0.5b-instruct-rm":
        prefs = write_rows(tmp_path / "ultrafeedback.jsonl", [
            {"prompt": sentence(rng, rng.randint(4, 20)), "prompt_id": str(i), "score_chosen": 8.0,
             "score_rejected": 4.0} for i in range(60)])
        reward_model = tiny_classifier("deberta-v2", tokenizer, tmp_path / "deberta", ["LABEL_0"])
        return {"model.name_or_path": tiny_causal_lm("qwen2", tokenizer, tmp_path / "qwen2",
                                                     chat_template=CHAT_TEMPLATE),
                "reward.name_or_path": reward_model, "data.source": prefs, "eval.data.source": prefs,
                "eval.rewards.judge.name_or_path": tiny_classifier("deberta-v2", tokenizer, tmp_path / "judge",
                                                                   ["LABEL_0"])}
    if name == "qwen2.5-0.5b-instruct-trusted":
        prefs = write_rows(tmp_path / "ultrafeedback.jsonl", [
            {"prompt": sentence(rng, rng.randint(4, 20)), "prompt_id": str(i),
             "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentence(rng, 6)}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentence(rng, 9)}],
             "score_chosen": 8.0, "score_rejected": 4.0} for i in range(60)])
        return {"model.name_or_path": tiny_causal_lm("qwen2", tokenizer, tmp_path / "qwen2",
                                                     chat_template=CHAT_TEMPLATE),
                "reward.name_or_path": tiny_classifier("deberta-v2", tokenizer, tmp_path / "deberta", ["LABEL_0"]),
                "data.source": prefs, "trusted.source": prefs, "trusted.size": 8, "eval.data.source": prefs,
                "eval.rewards.judge.name_or_path": tiny_classifier("deberta-v2", tokenizer, tmp_path / "judge",
                                                                   ["LABEL_0"])}
    raise KeyError(name)


SHRINK = {"run.rounds": 1, "run.batch_size": 4, "run.save_every": 0, "iif.val_size": 4, "iif.score_batch_size": 2,
          "ppo.mini_batch_size": 2, "ppo.epochs": 1, "ppo.min_new_tokens": 2, "ppo.max_new_tokens": 6,
          "ppo.generation_batch_size": 3, "eval.every": 1, "eval.size": 4}


@pytest.mark.parametrize("name", ["gptneo-2.7b-toxicity", "gpt2-imdb-sentiment", "qwen2.5-0.5b-instruct-rm",
                                  "qwen2.5-0.5b-instruct-trusted"])
def test_real_model_recipe_runs_a_round_on_stand_ins(name, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    overrides = {**stand_ins(name, tmp_path, tokenizer), **SHRINK, "run.output_dir": str(tmp_path / "run"),
                 "run.mixed_precision": None}  # bf16 autocast is for the GPU; the stand-in runs in fp32 math
    recipe = load_recipe(f"recipes/{name}.yaml", [f"{k}={v if v is not None else ''}" for k, v in overrides.items()])
    original = yaml.safe_load(open(f"recipes/{name}.yaml"))
    trainer = build_trainer(recipe)
    (metrics,) = trainer.train()
    assert metrics["samples"] == 4 and 0 < metrics["kept_fraction"] <= 1
    eval_names = list(original["eval"]["rewards"])
    assert all(math.isfinite(metrics[f"eval/{n}"]) for n in eval_names)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    if name == "gptneo-2.7b-toxicity":  # the data filters and token limits were applied
        assert all(10 <= len(tokenizer(p)["input_ids"]) <= 15 for p in trainer.prompts.prompts)
        rows = [json.loads(line) for line in open(tmp_path / "rtp.jsonl")]
        expected = {r["prompt"]["text"] for r in rows if r["prompt"]["toxicity"] is not None
                    and r["prompt"]["toxicity"] > 0.3 and 10 <= len(tokenizer(r["prompt"]["text"])["input_ids"]) <= 15}
        assert set(trainer.prompts.prompts + trainer.iif.target_source.validation["prompt"]) == expected and len(expected) >= 8
        assert len(trainer.evaluator.prompts) == 4
    if name == "qwen2.5-0.5b-instruct-trusted":  # the preference target on the conversational triples
        assert metrics["filtered"] == 1 and math.isfinite(metrics["trusted/margin"])
        assert trainer.trusted.size == 8
    if name.startswith("qwen2.5"):  # prompts reach the policy through the chat template
        assert trainer.collector.format_prompt("hi") == "<user> hi\n<assistant> "
