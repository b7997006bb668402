"""IIF for Stable-Baselines3 PPO: exact scores, filtering reaches SB3's update, save/load, short runs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("stable_baselines3", reason="needs the classic extra: pip install 'llm_iif[classic]'")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import assert_scores_match  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402

from llm_iif.attribution.gradients import grad_dot  # noqa: E402
from llm_iif.classic.iif_ppo import (IIFPPO, identical_group_means, kept_transitions,  # noqa: E402
                                     minibatch_normalized, policy_layers)


def frozen_lake_model(**kwargs) -> IIFPPO:
    env = gym.make("FrozenLake-v1", is_slippery=False)
    settings = {**dict(n_steps=128, batch_size=32, n_epochs=2, seed=0, ent_coef=0.01), **kwargs}
    return IIFPPO("MlpPolicy", env, **settings)


def filled_buffer(model: IIFPPO) -> None:
    """Collect one rollout into the model's buffer, as ``learn`` does before ``train``."""
    model._setup_learn(model.n_steps)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)


def minigrid_model() -> IIFPPO:
    from minigrid.wrappers import ImgObsWrapper

    from llm_iif.classic.iif_ppo import SmallCNN

    env = ImgObsWrapper(gym.make("minigrid:MiniGrid-Empty-8x8-v0"))
    return IIFPPO("CnnPolicy", env, n_steps=64, batch_size=16, n_epochs=2, seed=0,
                  policy_kwargs={"features_extractor_class": SmallCNN})


def per_transition_scores(model: IIFPPO, target_loss, scale: dict | None = None) -> torch.Tensor:
    """Scores by one autograd call per transition: ⟨∇target_loss, ∇L_i⟩ over the scored layers, with the
    target multiplied elementwise by ``scale`` when given."""
    buffer = model.rollout_buffer
    obs = torch.as_tensor(buffer.swap_and_flatten(buffer.observations))
    actions = torch.as_tensor(buffer.swap_and_flatten(buffer.actions)).long().flatten()
    advantages = torch.as_tensor(buffer.swap_and_flatten(buffer.advantages)).flatten().float()
    np.random.seed(1)
    normalized = minibatch_normalized(advantages, model.batch_size, True)
    names = [n for n, _ in model.policy.named_parameters() if n.rsplit(".", 1)[0] in policy_layers(model.policy)]
    params = dict(model.policy.named_parameters())

    def grad(loss):
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))

    model.policy.set_training_mode(False)
    target = grad(target_loss(obs, actions, advantages))
    if scale is not None:
        target = {n: target[n] * scale[n] for n in target}
    scores = []
    for i in range(len(actions)):
        _, log_prob_i, entropy_i = model.policy.evaluate_actions(obs[i:i + 1], actions[i:i + 1])
        scores.append(grad_dot(grad(-(normalized[i] * log_prob_i).sum() - model.ent_coef * entropy_i.sum()),
                               target))
    return torch.stack(scores)


def return_target_loss(model):
    def loss(obs, actions, advantages):
        return -(advantages * model.policy.evaluate_actions(obs, actions)[1]).mean()
    return loss


@pytest.mark.parametrize("make_model", [frozen_lake_model, minigrid_model], ids=["mlp", "small-cnn"])
def test_scores_equal_a_per_transition_autograd_loop(make_model):
    model = make_model()
    filled_buffer(model)
    # Move away from the near-uniform initial policy, so the scores differ from sample to sample.
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    np.random.seed(1)
    scores = model.influence_scores()
    expected = per_transition_scores(model, return_target_loss(model))
    assert len(scores) == model.n_steps and (scores < 0).any() and (scores > 0).any()
    assert_scores_match(scores, expected)


def test_action_target_scores_equal_a_per_transition_autograd_loop():
    model = frozen_lake_model()
    filled_buffer(model)
    state, action = 14, 2

    def minus_log_prob(obs, actions, advantages):
        return -model.policy.evaluate_actions(torch.as_tensor([state]), torch.as_tensor([action]))[1].sum()

    np.random.seed(1)
    scores = model.influence_scores(model.action_target(state, action))
    expected = per_transition_scores(model, minus_log_prob)
    assert_scores_match(scores, expected)


def test_adam_preconditioned_scores_equal_a_per_transition_autograd_loop():
    model = frozen_lake_model(iif_precondition="adam")  # SB3's default optimiser is Adam
    model.learn(model.n_steps)  # one round, so that Adam has second moments
    filled_buffer(model)
    optimizer, params = model.policy.optimizer, model.scored_parameters()
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    scale = {}
    for name, p in params.items():
        state = optimizer.state[p]
        scale[name] = 1 / ((state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps)
    np.random.seed(1)
    scores = model.influence_scores()
    expected = per_transition_scores(model, return_target_loss(model), scale)
    assert model.preconditioned
    assert_scores_match(scores, expected)


def test_adam_preconditioning_needs_adam():
    from llm_iif.core.errors import UserError

    with pytest.raises(UserError, match="iif.precondition: adam needs an optimiser with second moments"):
        frozen_lake_model(iif_precondition="adam", policy_kwargs={"optimizer_class": torch.optim.SGD})


def test_small_cnn_layers_are_scored_and_the_value_network_is_not():
    names = set(policy_layers(minigrid_model().policy))
    assert {"features_extractor.cnn.0", "features_extractor.cnn.2", "features_extractor.linear.0",
            "action_net"} <= names
    assert not any("value_net" in name for name in names)


def test_scored_layers_exclude_the_value_network():
    names = set(policy_layers(frozen_lake_model().policy))
    assert names == {"mlp_extractor.policy_net.0", "mlp_extractor.policy_net.2", "action_net"}


def test_filtering_changes_what_sb3_trains_on(monkeypatch):
    seen = []
    original_train = PPO.train

    def recording_train(self):
        seen.append((self.rollout_buffer.buffer_size, self.rollout_buffer.observations.copy()))
        original_train(self)

    monkeypatch.setattr(PPO, "train", recording_train)
    model = frozen_lake_model(iif_mode="bottom", iif_p=0.25)
    model.learn(128)
    size, observations = seen[0]
    keep = model.last_keep.numpy()
    assert size == 96 == keep.sum()
    full = model.rollout_buffer
    assert np.array_equal(observations, full.swap_and_flatten(full.observations)[keep]
                          if not full.generator_ready else full.observations[keep])
    # The dropped transitions are the 32 lowest scores.
    assert model.last_scores[~model.last_keep].max() <= model.last_scores[model.last_keep].min()


def test_mode_none_trains_like_ppo():
    def trained(cls, **kwargs):
        env = gym.make("FrozenLake-v1", is_slippery=False)
        model = cls("MlpPolicy", env, n_steps=64, batch_size=16, n_epochs=2, seed=3, **kwargs)
        model.learn(128)
        return torch.cat([p.detach().flatten() for p in model.policy.parameters()])

    assert torch.equal(trained(PPO), trained(IIFPPO, iif_mode="none"))


def test_kept_transitions_keeps_the_selected_rows():
    model = frozen_lake_model()
    filled_buffer(model)
    keep = np.zeros(128, dtype=bool)
    keep[[0, 5, 127]] = True
    kept = kept_transitions(model.rollout_buffer, keep)
    flat_returns = model.rollout_buffer.swap_and_flatten(model.rollout_buffer.returns)
    assert kept.buffer_size == 3 and np.array_equal(kept.returns, flat_returns[keep])
    assert sum(len(batch.returns) for batch in kept.get(2)) == 3


def test_save_and_load_keep_the_iif_settings(tmp_path):
    model = frozen_lake_model(iif_mode="neg-random", iif_p=0.3)
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = IIFPPO.load(tmp_path / "model")
    assert (loaded.iif_mode, loaded.iif_p, loaded.iif_target) == ("neg-random", 0.3, "return")
    obs = np.arange(16)
    assert np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


def test_iif_metrics_reach_the_logger():
    model = frozen_lake_model()
    model.learn(128)
    # SB3 dumps its logger before each update, so the last round's values are still there.
    logged = model.logger.name_to_value
    assert logged["iif/kept_fraction"] == pytest.approx(model.last_keep.float().mean().item())
    assert logged["iif/influence_neg_fraction"] == pytest.approx((model.last_scores < 0).float().mean().item())
    assert logged["iif/time_influence_s"] > 0


def test_identical_group_means_average_equal_rows_only():
    identity = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    scores = torch.tensor([1.0, 5.0, 2.0, -4.0, 6.0])
    assert torch.equal(identical_group_means(scores, identity), torch.tensor([3.0, 5.0, 3.0, -4.0, 3.0]))


def test_average_identical_gives_identical_records_one_score():
    model = frozen_lake_model(iif_average_identical=True)
    model.learn(128)
    identity, scores = model.record_identity(), model.last_scores
    _, group = torch.unique(identity, dim=0, return_inverse=True)
    assert group.max() + 1 < len(group)  # FrozenLake's buffer repeats records
    for g in group.unique():
        assert torch.allclose(scores[group == g], scores[group == g][0].expand(int((group == g).sum())))


@pytest.mark.parametrize("guard", ["positive-advantage", "rewarded"])
def test_guard_keeps_its_transitions_and_filters_the_rest_by_score(guard):
    model = frozen_lake_model(iif_mode="bottom", iif_p=0.5, iif_guard=guard, n_steps=2048)
    model.learn(2048)  # a random policy reaches the goal in about 1 of 60 episodes
    protected = model.flat_buffer()[2] > 0 if guard == "positive-advantage" else model.flat_rewards() > 0
    assert protected.any() and model.last_keep[protected].all()
    dropped = ~model.last_keep
    assert dropped.any() and not protected[dropped].any()
    # Of the unprotected ones, the lowest scores go, as without the guard.
    assert model.last_scores[dropped].max() <= model.last_scores[~protected & model.last_keep].min()


@pytest.mark.parametrize("kwargs", [{"iif_mode": "worst"}, {"iif_p": 1.5}, {"iif_target": "seq"},
                                    {"iif_guard": "goal"}])
def test_bad_iif_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        frozen_lake_model(**kwargs)


REPO = Path(__file__).resolve().parents[2]
SHORT = ["ppo.n_steps=128", "ppo.batch_size=32", "ppo.n_epochs=2", "run.rounds=2", "run.eval_episodes=5"]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "classic").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_classic_recipe_runs_two_short_rounds(recipe, tmp_path):
    from llm_iif.classic.train import train_classic
    from llm_iif.recipes import ClassicRecipe, load_recipe

    loaded = load_recipe(recipe, SHORT, kind=ClassicRecipe)
    history = train_classic(loaded, loaded.iif.mode, loaded.iif.p, tmp_path)
    assert [m["round"] for m in history] == [0, 1]
    assert all(0.0 < m["kept_fraction"] <= 1.0 and np.isfinite(m["reward_mean"]) for m in history)
    assert IIFPPO.load(tmp_path / "final.zip").iif_p == loaded.iif.p


def test_evaluation_does_not_change_training(tmp_path):
    from llm_iif.classic.train import train_classic
    from llm_iif.recipes import ClassicRecipe, load_recipe

    def run(episodes):
        recipe = load_recipe(REPO / "recipes/classic/frozenlake.yaml",
                             [*SHORT, "ppo.n_steps=64", f"run.eval_episodes={episodes}"], kind=ClassicRecipe)
        history = train_classic(recipe, recipe.iif.mode, recipe.iif.p, tmp_path / str(episodes))
        params = IIFPPO.load(tmp_path / str(episodes) / "final.zip").policy.parameters()
        return [m["kept_fraction"] for m in history], torch.cat([p.detach().flatten() for p in params])

    (kept_2, params_2), (kept_5, params_5) = run(2), run(5)
    assert kept_2 == kept_5 and torch.equal(params_2, params_5)


def test_fewer_evaluation_episodes_are_a_prefix_of_more():
    from llm_iif.classic.train import evaluation_returns
    from llm_iif.recipes import ClassicRecipe, load_recipe

    recipe = load_recipe(REPO / "recipes/classic/frozenlake.yaml", SHORT, kind=ClassicRecipe)
    model = frozen_lake_model()
    model.learn(128)
    state = torch.get_rng_state()
    many, few = evaluation_returns(model, recipe, 50, seed=7), evaluation_returns(model, recipe, 20, seed=7)
    assert np.array_equal(many[:20], few) and len(many) == 50
    assert torch.equal(torch.get_rng_state(), state)


def test_classic_compare_command(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "llm_iif", "classic", "compare", str(REPO / "recipes/classic/frozenlake.yaml"),
            "--seeds", "0", "--output-dir", str(out)] + [a for s in SHORT for a in ("--set", s)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"standard", "iif", "random"}
    assert summary["methods"]["standard"]["mean_kept_fraction"][0] == 1.0
    assert {"SE_ave", "SE_peak", "RT_peak"} <= summary["methods"]["iif"]["vs_baseline"].keys()
    assert (out / "reward_curves.png").exists() and "test return" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("env.id=NoSuchEnv-v0", "env.id: cannot make 'NoSuchEnv-v0'"),
    ("iif.p=2", "iif.p: expected a value in [0, 1]"),
    ("env.kwargs=3", "env.kwargs: expected a mapping"),
])
def test_classic_bad_input_is_one_line_exit_2(tmp_path, override, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llm_iif", "classic", "compare",
                           str(REPO / "recipes/classic/frozenlake.yaml"), "--set", override, "--set", "run.rounds=1",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_linear_datamodeling_check_reports_and_restores_the_model():
    model = frozen_lake_model(iif_precondition="adam")
    model.learn(model.n_steps)
    filled_buffer(model)
    # Move away from the near-uniform initial policy, so that subsets differ in what they do.
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    result = model.linear_datamodeling_check(num_subsets=8)
    assert {"lds_plain", "lds_preconditioned", "lds_random", "sign_agreement"} <= result.keys()
    for kind in ("plain", "preconditioned", "random"):
        low, high = result[f"lds_{kind}_interval"]
        assert -1 <= low <= result[f"lds_{kind}"] <= high <= 1
    for name, p in model.policy.named_parameters():
        assert torch.equal(p, before[name])
