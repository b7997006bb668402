"""The preference target (iif.target: preference) in IIFGRPOTrainer: its gradient is the trusted margin's, exactly,
and each round takes the next triples."""

import pytest
from conftest import assert_gradients_close, brute_force_margin_gradient, moved_off_zero
from datasets import Dataset
from grpo_setup import make_trainer

from llm_iif.core.config import GRPOIIFConfig
from llm_iif.core.errors import UserError
from llm_iif.lm.generation import tokenize_pairs


def test_grpo_preference_target_is_the_trusted_margins_gradient(random_adder_dir, tmp_path):
    # Prompts of one length: trl's forward gives GPT-2 no position ids, so left padding would shift positions
    # and a padded row would not equal the same row alone (completions may differ: they are padded on the right).
    triples = {"prompt": ["12+34=", "50+70=", "18+18=", "40+22="], "chosen": ["46", "120", "36", "62"],
               "rejected": ["47", "12", "63", "26"]}
    trainer = make_trainer(random_adder_dir, tmp_path, validation_dataset=Dataset.from_dict(triples),
                           iif=GRPOIIFConfig(enabled=True, target="preference", target_source="fresh", val_size=4))
    model = trainer.accelerator.unwrap_model(trainer.model)
    moved_off_zero(model)
    target, _ = trainer._stage.target_gradient(trainer.model)

    def tokenize(prompts, responses):
        return tokenize_pairs(trainer.processing_class, prompts, responses, "cpu")

    model.eval()
    expected = brute_force_margin_gradient(model, trainer._sequence_logprobs, tokenize, triples, 4)
    assert_gradients_close(target, expected)
    assert trainer.iif_state_dict()["target_round"] == 1  # the next round takes the next triples


@pytest.mark.parametrize("columns,iif,message", [
    ({"prompt": ["1+1="], "chosen": ["2"]}, {},
     "validation_dataset: iif.target preference needs trusted rows with prompt, chosen and rejected text columns "
     "(got columns: prompt, chosen)"),
    ({"prompt": ["1+1="] * 3, "chosen": ["2"] * 3, "rejected": ["3"] * 3}, {"val_size": 3},
     "iif.val_size: 3 triples; expected an even number per process"),
    ({"prompt": ["1+1="] * 2, "chosen": ["2"] * 2, "rejected": ["3"] * 2}, {"target_source": "batch"},
     "iif.target_source: 'batch' with iif.target preference; expected fresh"),
])
def test_bad_trusted_sets_are_one_line_errors(random_adder_dir, tmp_path, columns, iif, message):
    config = GRPOIIFConfig(enabled=True, target="preference", **{"target_source": "fresh", "val_size": 2, **iif})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        make_trainer(random_adder_dir, tmp_path, validation_dataset=Dataset.from_dict(columns), iif=config)
    assert "\n" not in str(err.value)


def test_a_grpo_recipe_trains_with_a_file_of_trusted_triples(random_adder_dir, tmp_path, capsys):
    import json

    from conftest import cli_in_process
    from test_grpo_recipes import RECIPE, small

    triples = tmp_path / "trusted.jsonl"
    triples.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
                                 for a, b in ((12, 34), (50, 70), (18, 18), (40, 22))))
    out = tmp_path / "run"
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", out,
                                  *small(random_adder_dir, "run.steps=1", "iif.target=preference",
                                         "iif.target_source=fresh", f"iif.val_prompts={triples}", "iif.val_size=4"))
    assert code == 0, stderr
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert -1.0 <= step["target_split_cos"] <= 1.0 and 0 < step["kept_fraction"] <= 1


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


@pytest.mark.parametrize("target", ["identical triples", "all-zero advantages"])
def test_a_target_of_float_noise_drops_nothing_with_a_warning(random_adder_dir, tmp_path, caplog, target):
    """Triples that prefer each text to itself (the API takes them; a recipe's file is refused), or a batch
    target whose advantages are all 0: the scores are rounding error or 0, and ``bottom`` would drop half the
    completions at random. Through the shared attribution core, as for PPO."""
    import logging

    if target == "identical triples":
        triples = {"prompt": ["12+34=", "50+70="], "chosen": ["46", "120"], "rejected": ["46", "120"]}
        kwargs = dict(validation_dataset=Dataset.from_dict(triples),
                      iif=GRPOIIFConfig(enabled=True, target="preference", target_source="fresh", val_size=2,
                                        mode="bottom", p=0.5))
    else:
        kwargs = dict(reward_funcs=[constant_reward], iif=GRPOIIFConfig(enabled=True, mode="bottom", p=0.5))
    trainer = make_trainer(random_adder_dir, tmp_path, **kwargs)
    moved_off_zero(trainer.accelerator.unwrap_model(trainer.model))
    with caplog.at_level(logging.WARNING, logger="llm_iif.attribution.stage"):
        trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "iif/kept_fraction" in entry]
    assert logged["iif/kept_fraction"] == 1.0 and logged["iif/filtered"] == 0.0
    assert "IIF target: " in caplog.text and "nothing is dropped this round" in caplog.text
