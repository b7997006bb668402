"""The preference target (iif.target: preference) in the PPO trainer: its gradient is the trusted margin's,
exactly; bad trusted sets are one-line errors; overlap with a reward model's pairs warns. IIFGRPOTrainer's:
tests/grpo/test_grpo_preference.py."""

import json
import logging
import math

import pytest
import torch
import yaml
from conftest import (assert_gradients_close, brute_force_margin_gradient, cli_in_process, moved_off_zero,
                      tiny_recipe_dict)

from llm_iif.recipes import recipe_from_dict
from llm_iif.lm.preferences import trusted_preference_triples
from llm_iif.lm.generation import tokenize_pairs
from llm_iif.lm.rollouts import estimate_advantages
from llm_iif.training import build_trainer
from llm_iif.training.factory import warn_of_shared_pairs

TRIPLES = 8


def test_ppo_preference_target_is_the_trusted_margins_gradient(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["trusted"] = {"source": "builtin:trusted-preferences", "size": TRIPLES}
    raw["iif"] = {"enabled": True, "target": "preference", "score_batch_size": 3}
    trainer = build_trainer(recipe_from_dict(raw))
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    moved_off_zero(policy)
    target, _ = trainer.iif.target_gradient(trainer.policy)
    collector = trainer.collector

    def tokenize(prompts, responses):
        return tokenize_pairs(collector.tokenizer, [collector.format_prompt(p) for p in prompts], responses, "cpu")

    policy.eval()
    expected = brute_force_margin_gradient(policy, trainer.iif.sequence_logprobs, tokenize,
                                           trusted_preference_triples(), TRIPLES)
    assert_gradients_close(target, expected)


def test_a_drawn_target_is_the_margins_gradient_over_the_triples_drawn(tmp_path, tiny_model_dir, capsys):
    """trusted.target_draw: each round a fresh even draw of the set, whose margin's gradient the target is; the
    generator that draws is the one checkpoints save."""
    raw = tiny_recipe_dict(tmp_path)
    raw["trusted"] = {"source": "builtin:trusted-preferences", "size": 16, "target_draw": 6}
    raw["iif"] = {"enabled": True, "target": "preference", "score_batch_size": 3}
    trainer = build_trainer(recipe_from_dict(raw))
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    moved_off_zero(policy)
    trusted = trainer.trusted
    replay = torch.Generator()
    replay.set_state(trusted.generator.get_state())
    drawn = torch.randperm(16, generator=replay)[:6].sort().values.tolist()
    target, _ = trainer.iif.target_gradient(trainer.policy)
    collector = trainer.collector

    def tokenize(prompts, responses):
        return tokenize_pairs(collector.tokenizer, [collector.format_prompt(p) for p in prompts], responses, "cpu")

    policy.eval()
    triples = {column: [values[i] for i in drawn] for column, values in trusted_preference_triples().items()}
    assert_gradients_close(target, brute_force_margin_gradient(policy, trainer.iif.sequence_logprobs, tokenize,
                                                               triples, 6))
    rounds = [trusted.target_rows().response_ids for _ in range(3)]
    assert all(len(ids) == 12 for ids in rounds) and not torch.equal(rounds[0], rounds[1])
    code, stderr = cli_in_process(capsys, "train", write_recipe(tmp_path, raw, "trusted.target_draw", 5),
                                  "--output-dir", tmp_path / "odd")
    assert code == 2 and "trusted.target_draw: 5 triples a round over 1 process(es); expected an even number per " \
                          "process, at most its 16 triples" in stderr and stderr.strip().count("\n") == 0


def write_recipe(directory, raw, key, value):
    """``raw`` with ``key`` (section.name) set to ``value``, written as a recipe file."""
    section, name = key.split(".")
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({**raw, section: {**raw[section], name: value}}))
    return path


def test_builtin_trusted_triples_are_disjoint_from_the_reward_models_pairs():
    from llm_iif.lm.preferences import preference_pairs

    trusted = trusted_preference_triples()
    assert len(trusted["prompt"]) == 256
    assert not set(zip(*trusted.values())) & set(zip(*preference_pairs().values()))


def write_triples(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


GOOD = {"prompt": "a", "chosen": "b", "rejected": "c"}


@pytest.mark.parametrize("rows,sections,message", [
    ([{"prompt": "a", "chosen": "b"}], {}, "trusted.source: 'rejected' is not a column of"),
    ([GOOD, GOOD, {"prompt": "a", "chosen": " ", "rejected": "c"}], {},
     "trusted.source: row 2 of '{file}' has an empty text as its chosen; expected non-empty text or a list of "
     "role/content messages"),
    ([GOOD, GOOD, {"prompt": "a", "chosen": 3, "rejected": "c"}], {},
     "trusted.source: row 2 of '{file}' has a int (3) as its chosen; expected non-empty text or a list of "
     "role/content messages"),
    ([GOOD, GOOD, {"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "c"}]}], {},
     "trusted.source: row 2 of '{file}' has a rejected message list with no assistant text"),
    ([GOOD, GOOD], {"iif": {"target_source": "batch"}},
     "iif.target_source: expected fresh or cached with iif.target preference (the training batch holds no "
     "preferences), got 'batch'"),
    ([GOOD, GOOD], {"trusted": None},
     "trusted.source: iif.target preference needs trusted (prompt, chosen, rejected) triples; expected a source"),
    ([GOOD, GOOD], {"trusted": {"dpo_coef": 0.5}},
     "trusted.source: trusted.dpo_coef 0.5 needs trusted (prompt, chosen, rejected) triples; expected a source"),
    ([GOOD, GOOD], {"trusted": {"size": 3}}, "trusted.size: 3, but '{file}' has only 2 complete triples"),
    ([GOOD, GOOD], {"trusted": {"columns": {"answer": "x"}}},
     "trusted.columns.answer: unknown column (expected prompt, chosen or rejected)"),
    ([GOOD, GOOD], {"trusted": {"columns": {"prompt": "question"}}},
     "trusted.columns.prompt: 'question' is not a column of"),
    ([GOOD, {"prompt": "a", "chosen": "same", "rejected": "same"}], {},
     "trusted.source: row 1 of '{file}' has the same chosen and rejected text ('same'); every trusted triple "
     "needs a chosen text that differs from its rejected one"),
])
def test_bad_trusted_sets_are_one_line_errors(tmp_path, capsys, tiny_model_dir, rows, sections, message):
    triples = write_triples(tmp_path / "trusted.jsonl", rows)
    raw = tiny_recipe_dict(tmp_path / "run")
    raw["iif"] = {"enabled": True, "target": "preference", **sections.get("iif", {})}
    raw["trusted"] = {"source": str(triples)}
    if "trusted" in sections:
        raw["trusted"] = None if sections["trusted"] is None else {**raw["trusted"], **sections["trusted"]}
        if sections["trusted"] and "dpo_coef" in sections["trusted"]:
            raw["trusted"] = {"dpo_coef": 0.5}
            raw["iif"] = {"enabled": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, stderr = cli_in_process(capsys, "train", recipe)
    error = stderr.strip().splitlines()[-1]  # after any progress bar of datasets reading the file
    assert code == 2 and "Traceback" not in stderr and error.startswith("llm-iif: error: ")
    assert message.format(file=triples) in error


def test_trusted_triples_among_the_reward_models_pairs_warn_with_their_count(tmp_path, caplog):
    pairs = write_triples(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                                     for i in range(5)])
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "eval.json").write_text(json.dumps({"data": {"source": str(pairs)}}))  # as reward train writes
    triples = {"prompt": ["p", "p", "q"], "chosen": ["good 1", "good 4", "good 1"], "rejected": ["bad 1", "bad 4", "bad 1"]}
    with caplog.at_level(logging.WARNING):
        warn_of_shared_pairs(triples, str(tmp_path / "rm" / "model"), "trusted.jsonl")
    assert "2 of 3 trusted triples of 'trusted.jsonl' are among the reward model's training pairs" in caplog.text
    caplog.clear()
    warn_of_shared_pairs(triples, str(tmp_path / "elsewhere" / "model"), "trusted.jsonl")  # pairs unknown: silent
    assert caplog.text == ""


def test_a_trusted_file_that_is_not_utf8_names_the_byte(tmp_path, capsys):
    triples = tmp_path / "trusted.jsonl"
    triples.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                        + '{"prompt": "café", "chosen": "b", "rejected": "c"}\n'.encode("latin-1"))
    raw = tiny_recipe_dict(tmp_path / "run")
    raw["iif"] = {"enabled": True, "target": "preference"}
    raw["trusted"] = {"source": str(triples)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, stderr = cli_in_process(capsys, "train", recipe)
    assert code == 2 and stderr.count("\n") == 1
    assert f"trusted.source: {triples}: not UTF-8 text: byte 63 (line 2) is 0xe9; expected a UTF-8 file" in stderr


def test_a_target_of_float_noise_drops_nothing_with_a_warning(tmp_path, tiny_model_dir, caplog):
    """Trusted triples that prefer each text to itself (refused when read, so planted here) give a target of
    rounding error: a round scored against it drops nothing, where ``bottom`` would drop half at random."""
    raw = tiny_recipe_dict(tmp_path)
    raw["trusted"] = {"source": "builtin:trusted-preferences", "size": TRIPLES}
    raw["iif"] = {"enabled": True, "target": "preference", "mode": "bottom", "p": 0.5}
    trainer = build_trainer(recipe_from_dict(raw))
    moved_off_zero(trainer.accelerator.unwrap_model(trainer.policy))
    rows = trainer.trusted.rows
    for rejected, chosen in ((rows.response_ids, rows.response_ids), (rows.response_mask, rows.response_mask),
                             (rows.weights, -rows.weights)):
        rejected[TRIPLES:] = chosen[:TRIPLES]
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    advantages = estimate_advantages(rollout, trainer.kl_controller.value, trainer.cfg, trainer.accelerator)
    with caplog.at_level(logging.WARNING, logger="llm_iif.attribution.stage"):
        selection, _ = trainer.select(rollout, advantages)
    assert selection.keep.all() and selection.metrics["filtered"] == 0
    assert "IIF target: its gradient is float noise, so nothing is dropped this round" in caplog.text


def chat_model_dir(tmp_path, tiny_model_dir):
    """The tiny model with a chat template, as an instruct model's tokenizer has one."""
    import shutil

    from transformers import AutoTokenizer

    directory = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("length_normalised", [False, True])
def test_the_target_with_a_chat_template_is_the_margins_gradient(tmp_path, tiny_model_dir, length_normalised):
    """Text prompts go through the chat template as the policy is prompted, message-list prompts as they are;
    a length-normalised target is the gradient of the mean-log-prob margin."""
    triples = trusted_preference_triples()
    rows = [{"prompt": p if v % 2 else [{"role": "user", "content": p}], "chosen": c, "rejected": r}
            for v, (p, c, r) in enumerate(zip(*(triples[k][:TRIPLES] for k in ("prompt", "chosen", "rejected"))))]
    raw = tiny_recipe_dict(tmp_path / "run")
    raw["model"] = {"name_or_path": str(chat_model_dir(tmp_path, tiny_model_dir)), "chat_template": True}
    raw["trusted"] = {"source": str(write_triples(tmp_path / "trusted.jsonl", rows)),
                      "length_normalised": length_normalised}
    raw["iif"] = {"enabled": True, "target": "preference", "score_batch_size": 3}
    trainer = build_trainer(recipe_from_dict(raw))
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    moved_off_zero(policy)
    target, _ = trainer.iif.target_gradient(trainer.policy)
    tokenizer = trainer.collector.tokenizer
    assert "[user]" in tokenizer.decode(trainer.trusted.rows.query_ids[0])

    def logprobs(model, *ids):  # the per-token log-probs, divided by the length when normalised
        values = trainer.iif.sequence_logprobs(model, *ids)
        return values / ids[3].sum() if length_normalised else values

    def tokenize(prompts, responses):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenize_pairs(tokenizer, [text], responses, "cpu")

    policy.eval()
    assert_gradients_close(target, brute_force_margin_gradient(policy, logprobs, tokenize, triples, TRIPLES))


def test_samples_that_raise_the_trusted_margin_score_above_those_that_lower_it(tmp_path, tiny_model_dir):
    """The target's sign: training samples that are the trusted chosen responses, with a positive advantage (PPO
    raises their log-probs), help the margin and score positive on average; the rejected ones score negative
    on average (with the target's sign flipped, both would turn). Single samples may not: a share of 6 in 8 of
    each sign, asserted before, held for one build of the tiny model and not for another (5 in 8 rejected
    ones), so it was the model's property, not the target's."""
    from llm_iif.attribution.influence import influence_scores
    from llm_iif.core.records import Advantages
    from llm_iif.lm.iif import ppo_sample_loss

    triples = trusted_preference_triples()
    raw = tiny_recipe_dict(tmp_path)
    raw["trusted"] = {"source": "builtin:trusted-preferences", "size": TRIPLES}
    raw["iif"] = {"enabled": True, "target": "preference"}
    trainer = build_trainer(recipe_from_dict(raw))
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    moved_off_zero(policy)
    target, _ = trainer.iif.target_gradient(trainer.policy)
    prompts = triples["prompt"][:TRIPLES] * 2
    rollout = trainer.collector.rescore(fixed_rollout(trainer, prompts, triples["chosen"][:TRIPLES]
                                                      + triples["rejected"][:TRIPLES]))
    ones = rollout.response_mask.float()
    advantages = Advantages(kl=torch.zeros_like(ones), advantages=ones, returns=torch.zeros_like(ones))
    scores = influence_scores(policy, ppo_sample_loss(rollout, advantages, trainer.cfg, "policy", 5.0),
                              len(rollout), target, 8, "cpu")
    chosen, rejected = scores[:TRIPLES], scores[TRIPLES:]
    assert chosen.mean() > 0 > rejected.mean()


def fixed_rollout(trainer, prompts, responses):
    """A rollout of the given responses (rewards 0), without sampling."""
    from llm_iif.core.records import Rollout

    collector = trainer.collector
    ids = tokenize_pairs(collector.tokenizer, [collector.format_prompt(p) for p in prompts], responses, "cpu")
    zeros = torch.zeros(len(prompts))
    empty = torch.zeros(ids[2].shape)
    return Rollout(prompts, responses, *ids, zeros, logprobs=empty, ref_logprobs=empty, values=empty, entropy=empty)


def test_trusted_rows_with_missing_values_drop_their_whole_triple(tmp_path, caplog):
    from llm_iif.recipes import TrustedConfig
    from llm_iif.lm.data import read_trusted_triples

    rows = [GOOD, {"prompt": "a", "chosen": None, "rejected": "c"}, {"q": "x", "prompt": "d", "chosen": "e",
                                                                     "rejected": "f"}]
    path = write_triples(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        triples = read_trusted_triples(TrustedConfig(source=str(path)))
    assert triples == {"prompt": ["a", "d"], "chosen": ["b", "e"], "rejected": ["c", "f"]}
    assert "dropped 1 row(s)" in caplog.text
    import pandas

    parquet = tmp_path / "t.parquet"  # pandas writes a missing text as NaN in an object column, or None
    pandas.DataFrame({"question": ["a", "d", "g"], "chosen": ["b", float("nan"), "h"],
                      "rejected": ["c", "f", "i"]}).to_parquet(parquet)
    triples = read_trusted_triples(TrustedConfig(source=str(parquet), columns={"prompt": "question"}, size=2))
    assert triples == {"prompt": ["a", "g"], "chosen": ["b", "h"], "rejected": ["c", "i"]}


def test_conversational_triples_read_as_trl_writes_them(tmp_path):
    from llm_iif.recipes import TrustedConfig
    from llm_iif.lm.data import read_trusted_triples

    user = [{"role": "user", "content": "How was it?"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "Great."}],  # trl's explicit prompt
             "rejected": [{"role": "assistant", "content": "Bad."}]},
            {"prompt": user, "chosen": user + [{"role": "assistant", "content": "Great."}],  # UltraFeedback's
             "rejected": user + [{"role": "assistant", "content": "Bad."}]}]
    triples = read_trusted_triples(TrustedConfig(source=str(write_triples(tmp_path / "t.jsonl", rows))))
    assert triples == {"prompt": [user, user], "chosen": ["Great.", "Great."], "rejected": ["Bad.", "Bad."]}


def test_trusted_metrics_every_round_and_the_dpo_loss_raises_the_margin(tmp_path, tiny_model_dir):
    """Every round logs the margin and implicit accuracy at θ(k); a DPO loss on the triples raises the
    margin over a few rounds more than PPO alone does."""
    finals = {}
    for coef in (0.0, 2.0):
        raw = tiny_recipe_dict(tmp_path / f"dpo-{coef}")
        raw["run"]["rounds"] = 3
        raw["trusted"] = {"source": "builtin:trusted-preferences", "size": 16, "dpo_coef": coef}
        history = build_trainer(recipe_from_dict(raw)).train()
        assert all({"trusted/margin", "trusted/accuracy", "time_trusted_s"} <= m.keys() for m in history)
        assert history[0]["trusted/accuracy"] == 0.0  # θ(0) is the reference: no implicit reward yet
        assert ("dpo_loss" in history[0]) == bool(coef)
        finals[coef] = history[-1]["trusted/margin"] - history[0]["trusted/margin"]
        if coef:  # at the reference every implicit reward is 0: the loss is log 2, and DPO steps lower it
            assert history[-1]["dpo_loss"] < math.log(2)
    assert finals[2.0] > max(finals[0.0], 0.0)


def test_triples_among_a_built_in_reward_models_pairs_warn(caplog):
    """A built-in reward model records its data like `llm-iif reward train` does, so overlap is found too."""
    from llm_iif.lm.preferences import biased_preference_pairs
    from llm_iif.models.builtins import resolve_builtin

    pairs = biased_preference_pairs()
    triples = {column: values[:6] for column, values in pairs.items()}
    with caplog.at_level(logging.WARNING):
        warn_of_shared_pairs(triples, resolve_builtin("builtin:tiny-biased-reward-model"), "mine.jsonl")
    assert "6 of 6 trusted triples of 'mine.jsonl' are among the reward model's training pairs" in caplog.text
