"""Training a `ClassicRecipe`: build `IIFPPO` on the recipe's environment, train round by round, evaluate."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from tqdm.auto import tqdm

from llm_iif.classic.iif_ppo import IIFPPO, SmallCNN
from llm_iif.core.errors import UserError
from llm_iif.core.imports import import_object
from llm_iif.core.fileio import append_jsonl
from llm_iif.core.paths import RunPaths


def build_model(recipe, iif_mode: str, iif_p: float) -> IIFPPO:
    """An ``IIFPPO`` for a `ClassicRecipe` with the given filter rule, on ``env.n_envs`` environments."""
    ppo = recipe.ppo
    vec_env = make_env(recipe, n_envs=recipe.env.n_envs, seed=recipe.run.seed)
    policy_kwargs = {"optimizer_class": torch.optim.SGD if ppo.optimizer == "sgd" else torch.optim.Adam}
    if ppo.features_extractor == "small-cnn":
        policy_kwargs.update(features_extractor_class=SmallCNN, features_extractor_kwargs={"features_dim": 64})
    return IIFPPO(ppo.policy, vec_env, iif_mode=iif_mode, iif_p=iif_p, iif_target=recipe.iif.target,
                  iif_precondition=recipe.iif.precondition,
                  n_steps=ppo.n_steps, batch_size=ppo.batch_size, n_epochs=ppo.n_epochs,
                  learning_rate=ppo.learning_rate, ent_coef=ppo.ent_coef, clip_range=ppo.clip_range,
                  gamma=ppo.gamma, gae_lambda=ppo.gae_lambda, vf_coef=ppo.vf_coef,
                  max_grad_norm=ppo.max_grad_norm, policy_kwargs=policy_kwargs, seed=recipe.run.seed, device="cpu")


def make_env(recipe, n_envs: int, seed: int):
    """The recipe's environment as an SB3 vectorised env of ``n_envs`` copies (with ``env.wrapper``)."""
    env = recipe.env
    wrapper = import_object(env.wrapper, "env.wrapper", "module:Class") if env.wrapper else None
    try:
        return make_vec_env(env.id, n_envs=n_envs, seed=seed, env_kwargs=env.kwargs, wrapper_class=wrapper)
    except Exception as err:  # gymnasium raises several types for unknown ids and bad kwargs
        raise UserError(f"env.id: cannot make '{env.id}' with kwargs {env.kwargs} ({err})") from err


def evaluate_return(model: IIFPPO, recipe, episodes: int) -> float:
    """Mean return of the stochastic policy over ``episodes`` episodes on fresh environments (the paper's
    per-round evaluation)."""
    env = make_env(recipe, n_envs=min(episodes, 10), seed=10_000 + recipe.run.seed)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=False)
    env.close()
    return float(mean)


def train_classic(recipe, iif_mode: str, iif_p: float, output_dir: Path) -> list[dict]:
    """Train round by round, evaluating after each; writes the run's metrics.jsonl and final.zip into
    ``output_dir`` (see `llm_iif.core.paths.RunPaths`).

    Each history entry has ``round``, ``reward_mean`` (the test return, so `llm_iif.analysis.summary.summarize`
    applies), ``kept_fraction``, ``time_influence_s`` and ``time_round_s`` (training only, evaluation excluded).
    """
    run = RunPaths(output_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.metrics.unlink(missing_ok=True)
    model = build_model(recipe, iif_mode, iif_p)
    steps = recipe.ppo.n_steps * recipe.env.n_envs
    history = []
    bar = tqdm(range(recipe.run.rounds), desc=f"{recipe.env.id} rounds")
    for k in bar:
        start = time.perf_counter()
        model.learn(steps, reset_num_timesteps=(k == 0))
        seconds = time.perf_counter() - start
        logged = model.logger.name_to_value
        metrics = {"round": k, "reward_mean": evaluate_return(model, recipe, recipe.run.eval_episodes),
                   "kept_fraction": logged["iif/kept_fraction"], "time_influence_s": logged["iif/time_influence_s"],
                   "time_round_s": seconds}
        history.append(metrics)
        append_jsonl(run.metrics, metrics)
        bar.set_postfix(test_return=f"{metrics['reward_mean']:.3f}", kept=f"{metrics['kept_fraction']:.2f}")
    model.save(final_model(run))
    return history


def final_model(run: RunPaths) -> Path:
    """The trained SB3 model of a classic run: final.zip beside metrics.jsonl."""
    return run.final.with_suffix(".zip")
