"""Trusted triples in IIFGRPOTrainer (the ``trusted`` section): the preference target's gradient is the trusted
margin's, exactly, with or without a chat template, and points the right way; prompts are tokenised as trl
tokenises the policy's and padded on the left; the margin is logged every step and the DPO term raises it."""

import json
import logging
import math

import pytest
import torch
from conftest import assert_gradients_close, brute_force_margin_gradient, cli_in_process, moved_off_zero
from grpo_setup import make_trainer

from llm_iif.recipes import GRPOIIFConfig, TrustedConfig
from llm_iif.core.errors import UserError
from llm_iif.grpo.trusted import TrustedSet
from llm_iif.lm.generation import tokenize_pairs

# Prompts of one length: trl's forward gives GPT-2 no position ids, so left padding would shift positions and a
# padded row would not equal the same row alone (responses may differ: they are padded on the right).
TRIPLES = {"prompt": ["12+34=", "50+70=", "18+18=", "40+22="], "chosen": ["46", "120", "36", "62"],
           "rejected": ["47", "12", "63", "26"]}
# A chat template written in the adder's characters: every turn "=content", then "==" for the assistant's turn.
CHAT_TEMPLATE = "{% for m in messages %}={{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=={% endif %}"


def preference_iif(**settings):
    return GRPOIIFConfig(enabled=True, target="preference", target_source="fresh", **settings)


def chat_tokenizer(model_dir, padding_side="left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


@pytest.mark.parametrize("chat,length_normalised", [(False, False), (True, False), (True, True)])
def test_grpo_preference_target_is_the_trusted_margins_gradient(random_adder_dir, tmp_path, chat, length_normalised):
    """With a chat template (the run's prompts conversational), a plain-text trusted prompt is one user turn and
    a message-list one goes through the template as it is; either way the trusted prompt's tokens are the ones
    trl gives the policy for that prompt. The tokenizer pads on the right: the trusted rows do not."""
    triples = dict(TRIPLES)
    if chat:  # half the prompts as messages
        triples["prompt"] = [p if v % 2 else [{"role": "user", "content": p}] for v, p in enumerate(TRIPLES["prompt"])]
    tokenizer = chat_tokenizer(random_adder_dir, padding_side="right")
    trainer = make_trainer(random_adder_dir, tmp_path, tokenizer=tokenizer, conversational=chat, iif=preference_iif(),
                           trusted=TrustedSet(triples, TrustedConfig(source="t", length_normalised=length_normalised)))
    rows = trainer._trusted.rows
    trl_ids = trainer._tokenize_prompts([trainer.train_dataset[0]["prompt"]])[0][0]
    assert tokenizer.decode(trl_ids) == ("=" + trainer.train_dataset[0]["prompt"][0]["content"] + "==" if chat
                                         else trainer.train_dataset[0]["prompt"])
    expected_prompt = trainer._tokenize_prompts([[{"role": "user", "content": "12+34="}] if chat else "12+34="])[0][0]
    assert rows.query_ids[0].tolist() == expected_prompt and rows.query_ids[4].tolist() == expected_prompt
    model = trainer.accelerator.unwrap_model(trainer.model)
    moved_off_zero(model)
    target, _ = trainer._scoring.stage.target_gradient(trainer.model)

    def tokenize(prompts, responses):  # one row at a time: no padding
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                             add_generation_prompt=True) if chat else prompts[0]
        return tokenize_pairs(tokenizer, [text], responses, "cpu")

    def logprobs(model, *ids):  # per-token log-probs, divided by the response's length when normalised
        values = trainer._sequence_logprobs(model, *ids)
        return values / ids[3].sum() if length_normalised else values

    model.eval()
    assert_gradients_close(target, brute_force_margin_gradient(model, logprobs, tokenize, TRIPLES, 4))
    assert "target_round" not in trainer.iif_state_dict()  # every round takes every triple


def test_a_drawn_grpo_target_is_the_margins_gradient_over_the_triples_drawn(random_adder_dir, tmp_path):
    """trusted.target_draw in GRPO: the same draw as PPO's (`TrustedTriples.target_rows`), from the generator
    the trainer's checkpoints save."""
    trainer = make_trainer(random_adder_dir, tmp_path, iif=preference_iif(),
                           trusted=TrustedSet(TRIPLES, TrustedConfig(source="t", target_draw=2)))
    replay = torch.Generator()
    replay.set_state(trainer._trusted.generator.get_state())
    drawn = torch.randperm(4, generator=replay)[:2].sort().values.tolist()
    model = trainer.accelerator.unwrap_model(trainer.model)
    moved_off_zero(model)
    target, _ = trainer._scoring.stage.target_gradient(trainer.model)

    def tokenize(prompts, responses):
        return tokenize_pairs(trainer.processing_class, prompts, responses, "cpu")

    model.eval()
    triples = {column: [values[i] for i in drawn] for column, values in TRIPLES.items()}
    assert_gradients_close(target, brute_force_margin_gradient(model, trainer._sequence_logprobs, tokenize, triples,
                                                               2))


def test_trusted_prompts_are_padded_on_the_left_whatever_the_tokenizer_pads(random_adder_dir, tmp_path):
    triples = {"prompt": ["1+2=", "123+456="], "chosen": ["3", "579"], "rejected": ["4", "5"]}
    trainer = make_trainer(random_adder_dir, tmp_path, tokenizer=chat_tokenizer(random_adder_dir, "right"),
                           trusted=TrustedSet(triples))
    rows, tok = trainer._trusted.rows, trainer.processing_class
    pad, eos = tok.pad_token_id, tok.eos_token_id
    short = tok("1+2=")["input_ids"]
    assert rows.query_ids[0].tolist() == [pad] * 4 + short and rows.query_mask[0].tolist() == [0] * 4 + [1] * 4
    assert rows.query_mask[:, -1].all() and rows.query_ids[1].tolist() == tok("123+456=")["input_ids"]
    # responses: chosen then rejected, each ended by EOS and padded on the right
    assert rows.response_ids[0].tolist() == tok("3")["input_ids"] + [eos, pad, pad]
    assert rows.response_ids[1].tolist() == tok("579")["input_ids"] + [eos]
    assert rows.response_mask[0].tolist() == [1, 1, 0, 0] and rows.weights[2:].sum() < 0 < rows.weights[:2].sum()


def test_without_peft_the_reference_is_the_model_as_built(random_adder_dir, tmp_path):
    """Without an adapter to disable, the reference margins are the starting model's, taken when the trainer is
    built: at those parameters every implicit reward is 0, and after a change of weights the margins move."""
    trainer = make_trainer(random_adder_dir, tmp_path, lora=False, trusted=TrustedSet(TRIPLES))
    reference = trainer._trusted.reference_margins.clone()
    assert trainer._trusted.metrics(trainer.model) == {"trusted/margin": pytest.approx(reference.mean().item()),
                                                       "trusted/accuracy": 0.0}
    with torch.no_grad():
        trainer.model.lm_head.weight.add_(0.1 * torch.randn_like(trainer.model.lm_head.weight))
    assert trainer._trusted.metrics(trainer.model)["trusted/margin"] != pytest.approx(reference.mean().item())
    assert torch.equal(trainer._trusted.reference_margins, reference)


def test_samples_that_raise_the_trusted_margin_score_above_those_that_lower_it(random_adder_dir, tmp_path):
    """The target's sign: a completion that is a trusted chosen response, with a positive advantage (GRPO raises
    its log-prob), helps the margin and scores positive, above its triple's rejected response, which scores
    negative (the other triples' gradients make a single score's sign noisy, so 3 of 4 are asked for). Flipping
    the target's sign flips every comparison."""
    trainer = make_trainer(random_adder_dir, tmp_path, iif=preference_iif(), trusted=TrustedSet(TRIPLES))
    moved_off_zero(trainer.accelerator.unwrap_model(trainer.model))
    rows = trainer._trusted.rows  # the 4 chosen responses, then the 4 rejected ones, as completions
    batch = {"prompt_ids": rows.query_ids, "prompt_mask": rows.query_mask, "completion_ids": rows.response_ids,
             "completion_mask": rows.response_mask, "advantages": torch.ones(len(rows)),
             "num_items_in_batch": rows.response_mask.sum()}
    scores, _ = trainer._scoring.stage.influence(trainer.model, trainer._scoring.loss_and_target(batch), len(rows))
    chosen, rejected = scores[:4], scores[4:]
    assert (chosen > rejected).all() and chosen.mean() > 0 > rejected.mean(), scores
    assert (chosen > 0).sum() >= 3 and (rejected < 0).sum() >= 3, scores


@pytest.mark.parametrize("triples,iif,message", [
    (None, {}, "trusted: iif.target preference needs trusted (prompt, chosen, rejected) triples"),
    ({k: v[:3] for k, v in TRIPLES.items()}, {},
     "trusted.size: 3 triples give each of 1 process(es) an odd number; expected an even number per process"),
    (TRIPLES, {"target_source": "batch"}, "iif.target_source: 'batch' with iif.target preference; expected fresh"),
    ({"prompt": ["1+1="], "chosen": ["2"]}, {}, "trusted: the triples have no rejected"),
])
def test_bad_trusted_sets_are_one_line_errors(random_adder_dir, tmp_path, triples, iif, message):
    config = GRPOIIFConfig(enabled=True, target="preference", **{"target_source": "fresh", **iif})
    trusted = TrustedSet(triples) if triples is not None else None
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        make_trainer(random_adder_dir, tmp_path, iif=config, trusted=trusted)
    assert "\n" not in str(err.value)


def test_a_grpo_recipe_logs_the_trusted_margin_and_the_dpo_loss(random_adder_dir, tmp_path, capsys):
    """A recipe's trusted section: a file of triples scored against (iif.target preference) and trained on
    (trusted.dpo_coef); every step's metrics line has the margin, its accuracy, the DPO loss and each reward
    function's training mean (trl's rewards/<name>/mean), and the margin's
    seconds go to timings.jsonl, outside time_round_s."""
    from test_grpo_recipes import RECIPE, small

    triples = tmp_path / "trusted.jsonl"
    triples.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
                                 for a, b in ((12, 34), (50, 70), (18, 18), (40, 22))))
    out = tmp_path / "run"
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", out,
                                  *small(random_adder_dir, "run.steps=2", "iif.target=preference",
                                         "iif.target_source=fresh", f"trusted.source={triples}",
                                         "trusted.dpo_coef=0.5"))
    assert code == 0, stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for step in steps:
        assert -1.0 <= step["target_split_cos"] <= 1.0 and 0 < step["kept_fraction"] <= 1
        assert {"trusted/margin", "trusted/accuracy", "dpo_loss"} <= step.keys() and "time_trusted_s" not in step
        assert 0 <= step["rewards/exact_match_reward/mean"] <= 1 and 0 <= step["rewards/format_reward/mean"] <= 1
    assert steps[0]["trusted/accuracy"] == 0.0  # at the reference itself (LoRA's B is zero)
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert all(0 < t["time_trusted_s"] < t["time_round_s"] for t in timings)


def margin_after(random_adder_dir, tmp_path, dpo_coef):
    """(the trusted margin after 3 steps of plain GRPO plus dpo_coef × DPO, the logged history)."""
    trainer = make_trainer(random_adder_dir, tmp_path, max_steps=3, learning_rate=1e-2,
                           trusted=TrustedSet(TRIPLES, TrustedConfig(source="t", dpo_coef=dpo_coef, dpo_beta=0.5)))
    trainer.train()
    return trainer._trusted.metrics(trainer.model)["trusted/margin"], trainer.state.log_history


def test_the_dpo_term_raises_the_trusted_margin(random_adder_dir, tmp_path):
    """The same seed with and without the DPO term: the trusted margin ends higher with it. Without IIF, the
    margin is still logged at every step, and the DPO loss only with the term."""
    plain, plain_logs = margin_after(random_adder_dir, tmp_path / "plain", 0.0)
    with_dpo, dpo_logs = margin_after(random_adder_dir, tmp_path / "dpo", 1.0)
    start = dpo_logs[0]["trusted/margin"]  # at θ(0), the same for both runs
    assert with_dpo - start > 2 * (plain - start) and with_dpo > plain + 0.15, (start, plain, with_dpo)
    steps = [entry for entry in dpo_logs if "loss" in entry]
    assert len(steps) == 3 and all({"trusted/margin", "trusted/accuracy", "dpo_loss"} <= e.keys() for e in steps)
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2))  # at the reference: −log σ(0)
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"]
    assert all("trusted/margin" in e and "dpo_loss" not in e for e in plain_logs if "loss" in e)


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


@pytest.mark.parametrize("target", ["identical triples", "all-zero advantages"])
def test_a_target_of_float_noise_drops_nothing_with_a_warning(random_adder_dir, tmp_path, caplog, target):
    """Triples that prefer each text to itself (the API takes them; a recipe's file is refused), or a batch
    target whose advantages are all 0: the scores are rounding error or 0, and ``bottom`` would drop half the
    completions at random. Through the shared attribution core, as for PPO."""
    if target == "identical triples":
        triples = {"prompt": ["12+34=", "50+70="], "chosen": ["46", "120"], "rejected": ["46", "120"]}
        kwargs = dict(trusted=TrustedSet(triples), iif=preference_iif(mode="bottom", p=0.5))
    else:
        kwargs = dict(reward_funcs=[constant_reward], iif=GRPOIIFConfig(enabled=True, mode="bottom", p=0.5))
    trainer = make_trainer(random_adder_dir, tmp_path, **kwargs)
    moved_off_zero(trainer.accelerator.unwrap_model(trainer.model))
    with caplog.at_level(logging.WARNING, logger="llm_iif.attribution.stage"):
        trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "iif/kept_fraction" in entry]
    assert logged["iif/kept_fraction"] == 1.0 and logged["iif/filtered"] == 0.0
    assert "IIF target: " in caplog.text and "nothing is dropped this round" in caplog.text
