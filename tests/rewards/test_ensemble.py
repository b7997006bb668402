"""The conservative ensemble: the members' mean score minus their standard deviation."""

import math

import pytest

from llm_iif.recipes import RewardConfig
from llm_iif.core.errors import UserError
from llm_iif.models.builtins import resolve_reward_config
from reward_models import load_reward_model
from reward_models.ensemble import ConservativeEnsembleReward


def test_the_reward_is_the_members_mean_minus_their_standard_deviation():
    members = [lambda prompts, responses: [1.0, 0.5], lambda prompts, responses: [3.0, 0.5]]
    scores = ConservativeEnsembleReward(members)(["p", "p"], ["a", "b"])
    assert scores == pytest.approx([2.0 - math.sqrt(2.0), 0.5])  # agreeing members keep their score


def test_an_ensemble_needs_two_members():
    with pytest.raises(UserError, match=r"reward.members: conservative-ensemble needs at least 2 reward models \(got 1\)"):
        load_reward_model(RewardConfig(name="conservative-ensemble", members=["somewhere"]))


def test_builtin_members_resolve_to_directories(monkeypatch):
    from llm_iif.models import builtins

    monkeypatch.setattr(builtins, "ensure_tiny_reward_model", lambda name: f"/cache/{name}/model")
    cfg = resolve_reward_config(RewardConfig(name="conservative-ensemble",
                                             members=["builtin:tiny-biased-reward-model", "/my/model"]))
    assert cfg.members == ["/cache/tiny-biased-reward-model/model", "/my/model"] and cfg.name_or_path is None
