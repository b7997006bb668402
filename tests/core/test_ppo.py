"""PPO math against values worked out by hand (see the comments for the arithmetic)."""

import pytest
import torch

from llm_iif.core import ppo
from llm_iif.lm.generation import truncate_after_eos


def test_gae_full_rows():
    # γ=1, λ=0.5. δ2 = 1 - 0.3 = 0.7; δ1 = 0.3 - 0.4 = -0.1; δ0 = 0.4 - 0.5 = -0.1
    # A2 = 0.7; A1 = -0.1 + 0.5·0.7 = 0.25; A0 = -0.1 + 0.5·0.25 = 0.025
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    adv, ret = ppo.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.025, 0.25, 0.7]]))
    torch.testing.assert_close(ret, torch.tensor([[0.525, 0.65, 1.0]]))


def test_gae_ignores_padding_after_the_last_token():
    # γ=0.9, λ=1; the padded third token (reward 9, value 5) must not leak back.
    # A1 = 2 + 0.9·0 - 1 = 1; A0 = (0 + 0.9·1 - 1) + 0.9·1 = 0.8
    rewards = torch.tensor([[0.0, 2.0, 9.0]])
    values = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.8, 2.0, 0.0]]))


def test_masked_whiten_uses_only_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased variance 1
    torch.testing.assert_close(ppo.masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))


def test_masked_whiten_with_given_moments_matches_whole_batch():
    # Whitening two halves with the moments of the union equals whitening the union: the multi-process path.
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    ma, mb = torch.ones(3, 5), torch.ones(2, 5)
    ma[0, 3:] = 0
    moments = ppo.masked_moments(a, ma) + ppo.masked_moments(b, mb)
    joint = ppo.masked_whiten(torch.cat([a, b]), torch.cat([ma, mb]))
    split = torch.cat([ppo.masked_whiten(a, ma, moments), ppo.masked_whiten(b, mb, moments)])
    torch.testing.assert_close(split, joint)


def test_masked_mean():
    values = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    assert ppo.masked_mean(values, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(3.0)


def test_kl_penalized_rewards_put_score_on_last_token():
    scores = torch.tensor([1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0]])
    rewards, kl = ppo.kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.0, 0.0]]))


@pytest.mark.parametrize("ratio, adv, loss, clipped", [
    (1.5, 2.0, -2.4, 1.0),   # -A·ρ = -3, -A·1.2 = -2.4: the pessimistic (clipped) branch
    (1.5, -2.0, 3.0, 0.0),   # 3 vs 2.4: unclipped
    (0.5, 2.0, -1.0, 0.0),   # -1 vs -1.6: unclipped
    (0.5, -2.0, 1.6, 1.0),   # 1 vs 1.6: clipped at 0.8
])
def test_clipped_policy_loss(ratio, adv, loss, clipped):
    logp = torch.tensor([[torch.log(torch.tensor(ratio)).item()]])
    out, was_clipped = ppo.clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), clip_range=0.2)
    assert out.item() == pytest.approx(loss, rel=1e-5)
    assert was_clipped.item() == clipped


@pytest.mark.parametrize("value, old, ret, loss, clipped", [
    (1.0, 0.5, 0.6, 0.08, 0.0),    # clip to 0.7: (0.4)² = 0.16 vs (0.1)² = 0.01 → ½·0.16
    (1.0, 0.5, 2.0, 0.845, 1.0),   # (1.0)² = 1 vs (1.3)² = 1.69 → ½·1.69
])
def test_clipped_value_loss(value, old, ret, loss, clipped):
    out, was_clipped = ppo.clipped_value_loss(torch.tensor([[value]]), torch.tensor([[old]]),
                                              torch.tensor([[ret]]), clip_range_value=0.2)
    assert out.item() == pytest.approx(loss, rel=1e-5)
    assert was_clipped.item() == clipped


@pytest.mark.parametrize("kl, expected", [
    (9.0, 0.2 * (1 + 0.2 * 256 / 10000)),    # error 0.5 is clipped to 0.2
    (3.0, 0.2 * (1 - 0.2 * 256 / 10000)),    # error -0.5 is clipped to -0.2
    (6.6, 0.2 * (1 + 0.1 * 256 / 10000)),    # error 0.1
])
def test_adaptive_kl_controller(kl, expected):
    ctl = ppo.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(kl, n_steps=256)
    assert ctl.value == pytest.approx(expected)


def test_fixed_kl_controller_never_moves():
    ctl = ppo.FixedKLController(0.3)
    ctl.update(100.0, n_steps=256)
    assert ctl.value == 0.3


def test_truncate_after_eos_keeps_the_first_eos_and_pads_the_rest():
    ids = torch.tensor([[5, 2, 0, 7], [5, 6, 7, 8], [0, 0, 3, 4]])
    out, mask = truncate_after_eos(ids, eos_token_id=0, pad_token_id=1)
    torch.testing.assert_close(out, torch.tensor([[5, 2, 0, 1], [5, 6, 7, 8], [0, 1, 1, 1]]))
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))


def test_distinct_2():
    # bigrams: (1,2) (2,1) (1,2) | (1,2) → 2 distinct of 4
    assert ppo.distinct_n([[1, 2, 1, 2], [1, 2], [3]], 2) == pytest.approx(0.5)
    assert ppo.distinct_n([[1]], 2) == 0.0
