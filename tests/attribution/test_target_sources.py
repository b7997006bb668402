"""The IIF target sources: cross-fitted scores on the training batch, and importance weights of cached
validation responses."""

import math

import pytest
import torch

from conftest import tiny_recipe_dict
from llm_iif.attribution.gradients import LoraGradientCapture, lora_parameters
from llm_iif.recipes import recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.lm.iif import importance_weights, ppo_sample_loss, ppo_sample_loss_and_target, rollout_target_rows
from llm_iif.lm.rollouts import estimate_advantages
from llm_iif.training import build_trainer


def batch_source_trainer(tmp_path, **iif):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "target_source": "batch", **iif}
    return build_trainer(recipe_from_dict(raw))


@pytest.mark.parametrize("folds, score_batch_size", [(2, 64), (3, 64), (2, 3)])
def test_cross_fitted_scores_equal_a_brute_force_computation(tmp_path, tiny_model_dir, folds, score_batch_size):
    """One fused pass (the batch fits a chunk) and the two-pass path (chunks of 3) against autograd."""
    trainer = batch_source_trainer(tmp_path, folds=folds, score_batch_size=score_batch_size)
    acc = trainer.accelerator
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    advantages = estimate_advantages(rollout, trainer.kl_controller.value, trainer.cfg, acc)
    rows = rollout_target_rows("seq", rollout, advantages, acc)
    loss = ppo_sample_loss(rollout, advantages, trainer.cfg, "policy", 5.0)
    loss_and_target = ppo_sample_loss_and_target(rollout, advantages, trainer.cfg, "policy", 5.0, rows.weights)
    scores, _ = trainer.iif.cross_fitted_scores(trainer.policy, loss_and_target, len(rollout))

    policy = acc.unwrap_model(trainer.policy)
    params = lora_parameters(policy)
    with LoraGradientCapture(policy) as capture:
        loss(policy, torch.arange(len(rollout))).sum().backward()
    per_sample = capture.per_sample_grads()                                  # {name: [B, *shape]}
    policy.zero_grad(set_to_none=True)
    fold = torch.arange(len(rollout)) % folds
    expected = torch.empty(len(rollout))
    for k in range(folds):
        others = (fold != k).nonzero().flatten()
        logprobs = trainer.iif.sequence_logprobs(policy, rows.query_ids[others], rows.query_mask[others],
                                                 rows.response_ids[others], rows.response_mask[others])
        target_loss = -(rows.weights[others] * logprobs * rows.response_mask[others]).sum() / len(others)
        target = dict(zip(params, torch.autograd.grad(target_loss, list(params.values()))))
        mine = (fold == k).nonzero().flatten()
        expected[mine] = sum((per_sample[n][mine].flatten(1) * target[n].flatten()).sum(1) for n in params)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert expected.abs().max() > 0


def test_importance_weights_are_one_when_the_policy_has_not_changed(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "target_source": "cached", "val_size": 8}
    trainer = build_trainer(recipe_from_dict(raw))
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    again = trainer.collector.rescore(rollout)
    weights, ess = importance_weights(again.logprobs, rollout.logprobs, rollout.response_mask, trainer.accelerator)
    assert torch.allclose(weights, torch.ones(len(rollout)), atol=1e-5)
    assert ess == pytest.approx(len(rollout), rel=1e-5)


def test_importance_weights_are_self_normalised_and_truncated():
    from accelerate import Accelerator

    mask = torch.ones(4, 1)
    now = torch.tensor([[0.0], [0.0], [0.0], [5.0]])  # one response became e^5 times likelier
    weights, ess = importance_weights(now, torch.zeros(4, 1), mask, Accelerator(cpu=True))
    assert weights.mean().item() == pytest.approx(1.0)
    # Normalised, the likelier one weighs 4·e^5/(3 + e^5) ≈ 3.92 > √4, so it is truncated to 2 against the
    # others' 4/(3 + e^5): a ratio of (3 + e^5)/2 instead of e^5.
    assert weights[3] / weights[0] == pytest.approx((3 + math.exp(5)) / 2, rel=1e-5)
    assert ess == pytest.approx(weights.sum().item() ** 2 / (weights ** 2).sum().item())


@pytest.mark.parametrize("change, message", [
    ({"target_source": "nearby"}, "iif.target_source: expected one of"),
    ({"target_source": "cached", "refresh_every": 0}, "iif.refresh_every: expected a positive integer, got 0"),
    ({"target_source": "batch", "folds": 1}, "iif.folds: expected an integer in [2, run.batch_size=8], got 1"),
    ({"target_source": "batch", "folds": 9}, "iif.folds: expected an integer in [2, run.batch_size=8], got 9"),
])
def test_bad_target_source_settings_name_the_key(tmp_path, change, message):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, **change}
    with pytest.raises(UserError) as err:
        recipe_from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_cached_source_without_validation_data_is_refused(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["data"]["validation_fraction"] = 0.0
    raw["iif"] = {"enabled": True, "target_source": "cached"}
    with pytest.raises(UserError, match="iif.val_prompts: not set and data.validation_fraction is 0"):
        build_trainer(recipe_from_dict(raw))
