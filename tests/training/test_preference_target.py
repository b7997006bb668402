"""The preference target (iif.target: preference) in the PPO trainer: its gradient is the trusted margin's,
exactly; bad trusted sets are one-line errors; overlap with a reward model's pairs warns. IIFGRPOTrainer's:
tests/grpo/test_grpo_preference.py."""

import json
import logging

import pytest
import torch
import yaml
from conftest import (assert_gradients_close, brute_force_margin_gradient, cli_in_process, moved_off_zero,
                      tiny_recipe_dict)

from llm_iif.core.config import recipe_from_dict
from llm_iif.lm.builtin import trusted_preference_triples
from llm_iif.lm.generation import tokenize_pairs
from llm_iif.lm.rollouts import estimate_advantages
from llm_iif.training import build_trainer
from llm_iif.training.factory import warn_of_shared_pairs

TRIPLES = 8


def test_ppo_preference_target_is_the_trusted_margins_gradient(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "target": "preference", "val_prompts": "builtin:trusted-preferences",
                  "val_size": TRIPLES, "score_batch_size": 3}
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


def test_builtin_trusted_triples_are_disjoint_from_the_reward_models_pairs():
    from llm_iif.lm.builtin import preference_pairs

    trusted = trusted_preference_triples()
    assert len(trusted["prompt"]) == 256
    assert not set(zip(*trusted.values())) & set(zip(*preference_pairs().values()))


def write_triples(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.mark.parametrize("rows,iif,message", [
    ([{"prompt": "a", "chosen": "b"}], {}, "iif.val_prompts: 'rejected' is not a column of"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": " ", "rejected": "c"}], {},
     "iif.val_prompts: row 1 of '{file}' has an empty chosen text; every trusted triple needs"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {"target_source": "batch"},
     "iif.target_source: expected fresh or cached with iif.target preference (the training batch holds no "
     "preferences), got 'batch'"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {"val_size": 6, "val_prompts": None},
     "iif.val_prompts: the preference target needs trusted (prompt, chosen, rejected) triples"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "", "chosen": "b", "rejected": "c"}], {},
     "iif.val_prompts: row 1 of '{file}' has an empty prompt text; every trusted triple needs non-empty prompt, "
     "chosen and rejected texts"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "same", "rejected": "same"}], {},
     "iif.val_prompts: row 1 of '{file}' has the same chosen and rejected text ('same'); every trusted triple "
     "needs a chosen text that differs from its rejected one"),
])
def test_bad_trusted_sets_are_one_line_errors(tmp_path, capsys, tiny_model_dir, rows, iif, message):
    triples = write_triples(tmp_path / "trusted.jsonl", rows)
    raw = tiny_recipe_dict(tmp_path / "run")
    raw["iif"] = {"enabled": True, "target": "preference", "val_prompts": str(triples), "val_size": 4, **iif}
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
    raw["iif"] = {"enabled": True, "target": "preference", "val_prompts": str(triples), "val_size": 4}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, stderr = cli_in_process(capsys, "train", recipe)
    assert code == 2 and stderr.count("\n") == 1
    assert f"iif.val_prompts: {triples}: not UTF-8 text: byte 63 (line 2) is 0xe9; expected a UTF-8 file" in stderr


def test_a_target_of_float_noise_drops_nothing_with_a_warning(tmp_path, tiny_model_dir, caplog):
    """Trusted triples that prefer each text to itself (refused when read, so planted here) give a target of
    rounding error: a round scored against it drops nothing, where ``bottom`` would drop half at random."""
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "target": "preference", "val_prompts": "builtin:trusted-preferences",
                  "val_size": TRIPLES, "mode": "bottom", "p": 0.5}
    trainer = build_trainer(recipe_from_dict(raw))
    moved_off_zero(trainer.accelerator.unwrap_model(trainer.policy))
    validation = trainer.iif.target_source.validation
    validation["chosen"] = list(validation["rejected"])
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    advantages = estimate_advantages(rollout, trainer.kl_controller.value, trainer.cfg, trainer.accelerator)
    with caplog.at_level(logging.WARNING, logger="llm_iif.attribution.stage"):
        selection = trainer.select(rollout, advantages)
    assert selection.keep.all() and selection.metrics["filtered"] == 0
    assert "IIF target: its gradient is float noise, so nothing is dropped this round" in caplog.text
