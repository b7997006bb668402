"""Training a `ClassicRecipe`: build `IIFPPO` on the recipe's environment, train round by round, evaluate."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from tqdm.auto import tqdm

from llm_iif.classic.iif_ppo import IIFPPO, SmallCNN
from llm_iif.core.errors import UserError
from llm_iif.core.imports import import_object
from llm_iif.core.fileio import append_jsonl
from llm_iif.runs.paths import RunPaths


def build_model(recipe, iif_mode: str, iif_p: float) -> IIFPPO:
    """An ``IIFPPO`` for a `ClassicRecipe` with the given filter rule, on ``env.n_envs`` environments."""
    ppo = recipe.ppo
    vec_env = make_env(recipe, n_envs=recipe.env.n_envs, seed=recipe.run.seed)
    policy_kwargs = {"optimizer_class": torch.optim.SGD if ppo.optimizer == "sgd" else torch.optim.Adam}
    if ppo.features_extractor == "small-cnn":
        policy_kwargs.update(features_extractor_class=SmallCNN, features_extractor_kwargs={"features_dim": 64})
    return IIFPPO(ppo.policy, vec_env, iif_mode=iif_mode, iif_p=iif_p, iif_target=recipe.iif.target,
                  iif_precondition=recipe.iif.precondition, iif_average_identical=recipe.iif.average_identical,
                  iif_guard=recipe.iif.guard,
                  n_steps=ppo.n_steps, batch_size=ppo.batch_size, n_epochs=ppo.n_epochs,
                  learning_rate=ppo.learning_rate, ent_coef=ppo.ent_coef, clip_range=ppo.clip_range,
                  gamma=ppo.gamma, gae_lambda=ppo.gae_lambda, vf_coef=ppo.vf_coef,
                  max_grad_norm=ppo.max_grad_norm, policy_kwargs=policy_kwargs, seed=recipe.run.seed, device="cpu")


class AfterRollout(BaseCallback):
    """Calls ``action(model, k)`` after the k-th rollout is collected (advantages computed, not yet trained)."""

    def __init__(self, action: Callable[[IIFPPO, int], None]):
        super().__init__()
        self.action, self.round = action, 0

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.action(self.model, self.round)
        self.round += 1


def make_env(recipe, n_envs: int, seed: int):
    """The recipe's environment as an SB3 vectorised env of ``n_envs`` copies (with ``env.wrapper``)."""
    env = recipe.env
    wrapper = import_object(env.wrapper, "env.wrapper", "module:Class") if env.wrapper else None
    try:
        return make_vec_env(env.id, n_envs=n_envs, seed=seed, env_kwargs=env.kwargs, wrapper_class=wrapper)
    except Exception as err:  # gymnasium raises several types for unknown ids and bad kwargs
        raise UserError(f"env.id: cannot make '{env.id}' with kwargs {env.kwargs} ({err})") from err


def evaluation_returns(model: IIFPPO, recipe, episodes: int, seed: int) -> np.ndarray:
    """Returns of ``episodes`` episodes of the stochastic policy on fresh environments (the paper's per-round
    evaluation), on random streams of its own seeded with ``seed`` (`isolated_random_streams`), so evaluating
    leaves training's streams where they were.

    Ordered episode by episode across the ``min(episodes, 10)`` environments (every environment's first
    episode, then every second one, ...): the first m returns, m a multiple of 10, are exactly those an
    m-episode evaluation with the same seed plays, since the environments step in lockstep either way.
    """
    n_envs = min(episodes, 10)
    targets = [(episodes + i) // n_envs for i in range(n_envs)]  # as SB3's evaluate_policy splits them
    returns: list[list[float]] = [[] for _ in range(n_envs)]
    with isolated_random_streams(seed):
        env = make_env(recipe, n_envs=n_envs, seed=10_000 + recipe.run.seed)
        observations = env.reset()
        while any(len(done) < target for done, target in zip(returns, targets)):
            actions, _ = model.predict(observations, deterministic=False)
            observations, _, dones, infos = env.step(actions)
            for i in np.flatnonzero(dones):
                if len(returns[i]) < targets[i]:
                    returns[i].append(float(infos[i]["episode"]["r"]))  # Monitor's undiscounted return
        env.close()
    return np.array([done[j] for j in range(max(targets)) for done in returns if j < len(done)])


def evaluate_return(model: IIFPPO, recipe, episodes: int) -> float:
    """Mean of `evaluation_returns` over ``episodes`` episodes, seeded with one draw from torch's global
    generator: for callers that fix that stream themselves (e.g. inside ``torch.random.fork_rng``)."""
    return float(evaluation_returns(model, recipe, episodes, int(torch.randint(2 ** 31, ()))).mean())


@contextmanager
def isolated_random_streams(seed: int):
    """Run the block on Python's, numpy's and torch's global random generators seeded with ``seed``, then
    restore their states: the block neither draws from the caller's streams nor depends on them."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def evaluation_seed(run_seed: int, round_index: int) -> int:
    """The evaluation stream's seed after round ``round_index`` of run ``run_seed``: fresh every round, the
    same for every method (common random numbers) and whatever ``run.eval_episodes`` is."""
    return int(np.random.SeedSequence([run_seed, round_index]).generate_state(1)[0])


def fewer_episode_means(returns: np.ndarray) -> dict[str, float]:
    """{m: mean of the first m returns} for m = 10, 100, 1000, ... below ``len(returns)``: the test returns
    m-episode evaluations would have measured (`evaluation_returns`), e.g. for the effect of the episode count."""
    sizes = [10 ** e for e in range(1, 7) if 10 ** e < len(returns)]
    return {str(m): float(returns[:m].mean()) for m in sizes}


def train_classic(recipe, iif_mode: str, iif_p: float, output_dir: Path,
                  on_loaded: Callable[[], None] | None = None) -> list[dict]:
    """Train round by round, evaluating after each; writes the run's metrics.jsonl and final.zip into
    ``output_dir`` (see `llm_iif.runs.paths.RunPaths`). ``on_loaded`` is called once the model is built (the
    environment and settings checked), before anything is written: a comparison deletes its earlier outputs
    then.

    Each history entry has ``round``, ``reward_mean`` (the test return over ``run.eval_episodes`` episodes, so
    `llm_iif.analysis.summary.summarize` applies), ``reward_mean_by_episodes`` (`fewer_episode_means`),
    ``kept_fraction`` (also among the transitions with a positive reward and those with a positive advantage:
    ``kept_fraction_rewarded``, ``kept_fraction_positive_advantage``), ``entropy`` (the policy's mean entropy on
    the round's update minibatches), ``time_influence_s`` and ``time_round_s`` (training only, evaluation excluded).
    """
    run = RunPaths(output_dir)
    model = build_model(recipe, iif_mode, iif_p)
    if on_loaded is not None:
        on_loaded()
    run.root.mkdir(parents=True, exist_ok=True)
    run.metrics.unlink(missing_ok=True)
    steps = recipe.ppo.n_steps * recipe.env.n_envs
    history = []
    bar = tqdm(range(recipe.run.rounds), desc=f"{recipe.env.id} rounds")
    for k in bar:
        start = time.perf_counter()
        model.learn(steps, reset_num_timesteps=(k == 0))
        seconds = time.perf_counter() - start
        logged = model.logger.name_to_value
        returns = evaluation_returns(model, recipe, recipe.run.eval_episodes, evaluation_seed(recipe.run.seed, k))
        metrics = {"round": k, "reward_mean": float(returns.mean()),
                   "reward_mean_by_episodes": fewer_episode_means(returns),
                   **{key: logged[f"iif/{key}"] for key in ("kept_fraction", "kept_fraction_rewarded",
                                                            "kept_fraction_positive_advantage", "time_influence_s")},
                   "entropy": -logged["train/entropy_loss"], "time_round_s": seconds}
        history.append(metrics)
        append_jsonl(run.metrics, metrics)
        bar.set_postfix(test_return=f"{metrics['reward_mean']:.3f}", kept=f"{metrics['kept_fraction']:.2f}")
    model.save(run.classic_model)
    return history

