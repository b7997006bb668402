"""In-run scoring for the PPO trainer (`llm_iif.training.in_run`): the scores, the decision and the first epoch
made by one pass at θ(k)."""

import pytest
import torch

from conftest import assert_scores_match, moved_off_zero, tiny_recipe_dict
from llm_iif.recipes import recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.lm.iif import minibatch_loss, ppo_terms
from llm_iif.lm.rollouts import estimate_advantages
from llm_iif.training import build_trainer


def in_run_trainer(tmp_path, ppo_settings=None, lora=None, trusted=None, **iif):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "val_size": 16, "score_batch_size": 3, "p": 0.5, "scoring": "in-run", **iif}
    raw["ppo"].update(ppo_settings or {})
    raw["lora"].update(lora or {})
    if trusted:
        raw["trusted"] = trusted
    return build_trainer(recipe_from_dict(raw))


def rollout_at_moved_weights(trainer):
    """A rollout and its advantages, with LoRA's B and the value head moved off zero, so that every LoRA
    gradient and the value loss's share of them count."""
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    moved_off_zero(policy)
    with torch.no_grad():
        policy.value_head.weight.normal_(0.0, 0.1)
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    return rollout, estimate_advantages(rollout, trainer.kl_controller.value, trainer.cfg, trainer.accelerator)


@pytest.mark.parametrize("target_source,train_grad", [("batch", "policy"), ("batch", "full"), ("fresh", "policy"),
                                                      ("fresh", "full")])
def test_scores_and_kept_sets_equal_the_separate_pass(tmp_path, tiny_model_dir, target_source, train_grad):
    trainer = in_run_trainer(tmp_path, target_source=target_source, train_grad=train_grad)
    rollout, advantages = rollout_at_moved_weights(trainer)
    in_run, first_epoch = trainer.select(rollout, advantages)
    trainer.in_run = None  # the separate path, on the same rollout and (fresh) the same target rows
    losses = trainer.per_sample_losses(rollout, advantages)
    if target_source == "batch":
        separate = trainer.iif.select(trainer.policy, losses, len(rollout))
    else:
        influence, _ = trainer.iif.influence(trainer.policy, losses, len(rollout), rows=trainer.iif.target_rows)
        separate = trainer.iif.selection(influence, 0.0, len(rollout), preconditioned=False)
    assert_scores_match(in_run.influence, separate.influence)
    assert torch.equal(in_run.keep, separate.keep) and not in_run.keep.all()
    assert len(first_epoch) == int(in_run.keep.sum())
    assert in_run.metrics["time_influence_s"] > 0


def minibatch_gradient(trainer, rollout, advantages, rows):
    """The update's gradient of one minibatch's token-mean loss at the current parameters, by autograd."""
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    batch, mb = rollout.select(rows), advantages.select(rows)
    terms = ppo_terms(*policy(batch.input_ids, batch.attention_mask), batch, mb.advantages, mb.returns, trainer.cfg)
    loss = minibatch_loss(terms, batch.response_mask, trainer.cfg.vf_coef)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in policy.named_parameters() if p.requires_grad])
    return dict(zip(names, grads))


@pytest.mark.parametrize("train_grad", ["policy", "full"])
def test_a_first_epoch_step_takes_its_minibatchs_gradient_at_theta_k(tmp_path, tiny_model_dir, train_grad):
    """Each step of the first epoch gets the gradient that the update would take on its kept rows at θ(k),
    value term and all, over every trainable parameter (the LoRA layers and the value head)."""
    trainer = in_run_trainer(tmp_path, train_grad=train_grad)
    rollout, advantages = rollout_at_moved_weights(trainer)
    selection, first_epoch = trainer.select(rollout, advantages)
    kept = selection.keep.nonzero().flatten()
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    for rows in (torch.tensor([0, 2]), torch.arange(len(first_epoch))):
        statistics = first_epoch.set_gradients(rows, policy, trainer.accelerator)
        expected = minibatch_gradient(trainer, rollout, advantages, kept[rows])
        ours = torch.cat([policy.get_parameter(n).grad.flatten() for n in expected])
        want = torch.cat([g.flatten() for g in expected.values()])
        assert ((ours - want).norm() / want.norm()).item() <= 1e-4
        assert policy.value_head.weight.grad.norm() > 0
        assert statistics[-1] == 1 and statistics[2:5].abs().max() < 1e-6  # no clip and no KL at θ(k)
        trainer.optimizer.zero_grad(set_to_none=True)


def test_with_one_minibatch_per_epoch_the_run_equals_the_separate_path(tmp_path, tiny_model_dir):
    """With one minibatch per epoch nothing in the first epoch is stale: two rounds of in-run and of separate
    scoring end at the same weights and the same metrics. With SGD: Adam's first steps move every weight by
    about the learning rate whatever its gradient, so a rounding difference in a near-zero gradient would
    show as a difference of that size."""
    settings = {"mini_batch_size": 8}  # = run.batch_size
    runs = {}
    for scoring in ("in-run", "separate"):
        trainer = in_run_trainer(tmp_path / scoring, settings, target_source="batch", scoring=scoring)
        policy = trainer.accelerator.unwrap_model(trainer.policy)
        initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        trainer.optimizer = torch.optim.SGD(trainer.trainable, lr=0.1)
        history = trainer.train()
        runs[scoring] = history, {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    (in_run, weights), (separate, expected) = runs["in-run"], runs["separate"]
    assert [m["kept_fraction"] for m in in_run] == [m["kept_fraction"] for m in separate]
    assert in_run[0]["kept_fraction"] < 1
    for key in ("reward_mean", "policy_loss", "value_loss", "influence_mean"):
        assert [m[key] for m in in_run] == pytest.approx([m[key] for m in separate], rel=1e-4, abs=1e-7)
    for name, value in expected.items():
        assert torch.allclose(weights[name], value, rtol=1e-4, atol=1e-7), name
    assert any(not torch.equal(weights[name], initial[name]) for name in initial)


@pytest.mark.parametrize("setting,message", [
    ({"mode": "random"}, "iif.scoring: in-run with iif.mode random"),
    ({"lora": {"dropout": 0.1}}, "dropout p=0.1"),
    ({"trusted": {"source": "builtin:trusted-preferences", "size": 16, "dpo_coef": 0.1}}, "trusted.dpo_coef: 0.1"),
])
def test_settings_in_run_cannot_honour_are_refused_in_one_line(tmp_path, tiny_model_dir, setting, message):
    setting = dict(setting)
    with pytest.raises(UserError) as error:
        in_run_trainer(tmp_path, lora=setting.pop("lora", None), trusted=setting.pop("trusted", None), **setting)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_deepspeed_launch_is_refused_in_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """In-run scoring sets the first epoch's gradients itself, which DeepSpeed's engine owns."""
    from accelerate.state import AcceleratorState

    from llm_iif.training.in_run import check_in_run

    trainer = in_run_trainer(tmp_path)
    monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda self: object()))
    with pytest.raises(UserError) as error:
        check_in_run(trainer.recipe, trainer.accelerator.unwrap_model(trainer.policy), trainer.accelerator)
    assert "DeepSpeed" in str(error.value) and "\n" not in str(error.value)
