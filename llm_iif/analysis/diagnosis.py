"""The paper's classic-RL diagnosis (§4): what the bottom-influence records are, and what dropping them does.

- `diagnose`: train standard PPO for K rounds, collect B(K), score every transition at θ(K) against the
  return target, and set the GAE advantages Â beside Monte-Carlo advantages Ā computed from the buffer
  (Fig. 3c/3d). Optionally also scores against the action target log π(a|s) for a chosen (s, a).
- `intervene`: at chosen rounds, redo the update from θ(k) on B(k) three ways (all records, without the
  negative-influence records, without a random set of the same size) and compare test returns (Fig. 5/11).

Both train plain PPO (``IIFPPO`` with mode ``none``) and hook into it after each rollout, where θ(k) and the
filled buffer B(k) are at hand. They need the classic extra; Stable-Baselines3 and gymnasium are imported only
when they run, so the statistics here import without it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llm_iif.analysis.plots import plot_diagnosis, plot_intervention
from llm_iif.core.errors import UserError
from llm_iif.core.fileio import atomic_write_text

if TYPE_CHECKING:
    from stable_baselines3.common.buffers import RolloutBuffer
    from stable_baselines3.common.callbacks import BaseCallback

    from llm_iif.classic.iif_ppo import IIFPPO

EDGE_FRACTION = 0.2  # the "top" and "bottom" regions of Fig. 3c: 20% of the records each


def standard_ppo(recipe) -> IIFPPO:
    from llm_iif.classic.train import build_model

    return build_model(recipe, "none", 0.0)


def rounds_of_training(model: IIFPPO, rounds: int, callback: BaseCallback) -> None:
    """Run ``rounds`` PPO rounds (rollout, then update) with ``callback``."""
    model.learn(rounds * model.n_steps * model.n_envs, callback=callback)


# ------------------------------------------------------------------------------------ Monte-Carlo advantages

def discounted_returns(rewards: np.ndarray, episode_starts: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-transition discounted return-to-go within its episode, for buffers [T, n_envs].

    Returns (returns, complete): ``complete`` is False for each environment's trailing episode, which the
    buffer cuts off, so its returns are partial.
    """
    steps, n_envs = rewards.shape
    returns = np.zeros_like(rewards, dtype=np.float64)
    complete = np.zeros_like(rewards, dtype=bool)
    for env in range(n_envs):
        starts = np.flatnonzero(episode_starts[:, env])
        cut = starts[-1] if len(starts) else 0  # returns-to-go are complete up to the last episode start
        following = 0.0
        for t in reversed(range(steps)):
            ends_here = t + 1 < steps and episode_starts[t + 1, env]
            following = rewards[t, env] + gamma * (0.0 if ends_here or t + 1 == steps else following)
            returns[t, env] = following
        complete[:cut, env] = True
    return returns, complete


def monte_carlo_advantages(buffer: RolloutBuffer, gamma: float) -> np.ndarray:
    """[N] Ā(s, a) = Q̄(s, a) − V̄(s) for every transition of a filled buffer over a discrete observation space
    (flattened env-major, as `IIFPPO.influence_scores` orders them).

    Q̄ and V̄ average the discounted returns of the buffer's complete episodes over every visit of (s, a) and
    of s (the paper's App. B.4 estimate). A pair never seen in a complete episode gets NaN.
    """
    from gymnasium import spaces

    if not isinstance(buffer.observation_space, spaces.Discrete):
        raise UserError(f"Monte-Carlo advantages need a discrete observation space (e.g. FrozenLake-v1), "
                        f"got {type(buffer.observation_space).__name__}")
    returns, complete = discounted_returns(buffer.rewards, buffer.episode_starts, gamma)
    def flat(a: np.ndarray) -> np.ndarray:  # [T, n_envs, ...] -> [n_envs * T], env-major
        return buffer.swap_and_flatten(a.reshape(a.shape[0], a.shape[1], -1)).reshape(-1)

    states, actions = flat(buffer.observations).astype(int), flat(buffer.actions).astype(int)
    returns, complete = flat(returns), flat(complete)
    q, v = {}, {}
    for s, a, g in zip(states[complete], actions[complete], returns[complete]):
        q.setdefault((s, a), []).append(g)
        v.setdefault(s, []).append(g)
    return np.array([np.mean(q[(s, a)]) - np.mean(v[s]) if (s, a) in q else np.nan
                     for s, a in zip(states, actions)])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (the Pearson correlation of average ranks)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def advantage_agreement(influence: np.ndarray, gae: np.ndarray, monte_carlo: np.ndarray) -> dict:
    """How well Â agrees with Ā along the influence ranking: sign mismatch (Ā·Â < 0) and |Ā − Â| in the top
    and bottom 20% of records, and Spearman(influence, Ā·Â), also against the rank as the paper reports it
    (about −0.67 on FrozenLake at k = 5). Records without an Ā are left out."""
    valid = np.isfinite(monte_carlo)
    influence, gae, monte_carlo = influence[valid], gae[valid], monte_carlo[valid]
    order = np.argsort(-influence, kind="stable")  # decreasing influence
    edge = max(1, int(EDGE_FRACTION * len(order)))
    regions = {"top": order[:edge], "bottom": order[-edge:], "all": order}
    product, gap = gae * monte_carlo, np.abs(monte_carlo - gae)
    correlation = spearman(influence, product)
    return {"records": int(valid.sum()), "records_without_mc": int((~valid).sum()),
            "spearman_influence_vs_mc_times_gae": correlation,
            # The paper's Fig. 3d correlates Ā·Â with the rank (1 = most helpful), which flips the sign.
            "spearman_rank_vs_mc_times_gae": -correlation,
            **{f"sign_mismatch_{name}": float((product[idx] < 0).mean()) for name, idx in regions.items()},
            **{f"mean_abs_gap_{name}": float(gap[idx].mean()) for name, idx in regions.items()}}


# ---------------------------------------------------------------------------------------------- diagnose

def diagnose(recipe, round_k: int, output_dir: Path, bottom: int = 20,
             action_target: tuple[int, int] | None = None) -> dict:
    """`llm-iif classic diagnose`: standard PPO to round ``round_k``, then the analysis of B(k) at θ(k).

    Writes diagnosis.json (the agreement statistics and the bottom records), records.csv (every record by
    decreasing influence) and diagnosis.png (Fig. 3c/3d analogues); returns diagnosis.json's content.
    """
    from gymnasium import spaces

    from llm_iif.classic.train import AfterRollout

    if round_k < 0 or round_k >= recipe.run.rounds:
        raise UserError(f"--round {round_k}: expected 0 <= K < run.rounds ({recipe.run.rounds})")
    found = {}

    def analyse(model: IIFPPO, k: int) -> None:
        if k != round_k:
            return
        buffer = model.rollout_buffer
        found["influence"] = model.influence_scores().numpy()
        found["monte_carlo"] = monte_carlo_advantages(buffer, model.gamma)
        observations, actions, advantages = model.flat_buffer()
        found["states"], found["actions"] = observations.reshape(-1).long().numpy(), actions.reshape(-1).long().numpy()
        found["gae"] = advantages.numpy()
        if action_target is not None:
            found["action_influence"] = model.influence_scores(model.action_target(*action_target)).numpy()

    model = standard_ppo(recipe)
    if not isinstance(model.observation_space, spaces.Discrete):
        raise UserError(f"{recipe.env.id}: diagnose needs a discrete observation space (e.g. FrozenLake-v1), "
                        f"got {type(model.observation_space).__name__}")
    rounds_of_training(model, round_k + 1, AfterRollout(analyse))

    influence, gae, mc = found["influence"], found["gae"], found["monte_carlo"]
    order = np.argsort(-influence, kind="stable")
    rows = [{"rank": rank + 1, "state": int(found["states"][i]), "action": int(found["actions"][i]),
             "gae_advantage": float(gae[i]), "mc_advantage": float(mc[i]), "influence": float(influence[i]),
             **({"action_target_influence": float(found["action_influence"][i])} if action_target else {})}
            for rank, i in enumerate(order)]
    result = {"env": recipe.env.id, "round": round_k, "seed": recipe.run.seed,
              **advantage_agreement(influence, gae, mc), "bottom_records": rows[-bottom:][::-1]}
    if action_target is not None:
        by_action = sorted(rows, key=lambda r: -r["action_target_influence"])
        result["action_target"] = {"state": action_target[0], "action": action_target[1],
                                   "top_records": by_action[:bottom], "bottom_records": by_action[-bottom:][::-1]}
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "diagnosis.json", json.dumps(result, indent=2))
    header = list(rows[0])
    atomic_write_text(output_dir / "records.csv",
                      "\n".join([",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]) + "\n")
    plot_diagnosis(influence, gae, mc, EDGE_FRACTION, output_dir / "diagnosis.png",
                   title=f"{recipe.env.id}, round {round_k}")
    return result


# --------------------------------------------------------------------------------------------- intervene

def intervene(recipe, rounds: list[int], seeds: list[int], output_dir: Path) -> dict:
    """`llm-iif classic intervene`: for each seed, standard PPO; at each round k in ``rounds``, the update from
    θ(k) on B(k) is redone on all records, without the negative-influence records, and without a random set of
    the same size, and each result's test return is measured with the same evaluation randomness.

    Writes intervention.json and intervention.png (Δ test return against the all-records update, per round);
    returns intervention.json's content.
    """
    if not rounds or min(rounds) < 0 or max(rounds) >= recipe.run.rounds:
        raise UserError(f"--rounds: expected rounds in 0..{recipe.run.rounds - 1}, got {rounds}")
    results = {}
    for seed in seeds:
        seeded = copy.deepcopy(recipe)
        seeded.run.seed = seed
        results[str(seed)] = _intervene_one_seed(seeded, sorted(set(rounds)))
    summary = {"env": recipe.env.id, "rounds": sorted(set(rounds)), "seeds": results,
               "per_round": _intervention_summary(results)}
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "intervention.json", json.dumps(summary, indent=2))
    plot_intervention(summary, output_dir / "intervention.png")
    return summary


def _intervene_one_seed(recipe, rounds: list[int]) -> list[dict]:
    from llm_iif.classic.train import AfterRollout, evaluate_return

    rows = []

    def compare_updates(model: IIFPPO, k: int) -> None:
        if k not in rounds:
            return
        policy_state = copy.deepcopy(model.policy.state_dict())
        optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())
        influence = model.influence_scores().numpy()
        negative = influence < 0
        random_drop = np.random.default_rng([recipe.run.seed, k]).permutation(len(influence))[:int(negative.sum())]
        keeps = {"all": np.ones(len(influence), dtype=bool), "influence": ~negative,
                 "random": ~np.isin(np.arange(len(influence)), random_drop)}
        returns = {}
        for name, keep in keeps.items():
            model.policy.load_state_dict(policy_state)
            model.policy.optimizer.load_state_dict(optimizer_state)
            model.train_on(keep)
            with torch.random.fork_rng():  # common random numbers: every variant plays the same evaluation draws
                torch.manual_seed(recipe.run.seed * 1000 + k)
                returns[name] = evaluate_return(model, recipe, recipe.run.eval_episodes)
        model.policy.load_state_dict(policy_state)  # the run itself goes on with the standard update
        model.policy.optimizer.load_state_dict(optimizer_state)
        rows.append({"round": k, "dropped": int(negative.sum()), "records": len(influence),
                     **{f"return_{name}": value for name, value in returns.items()},
                     "delta_influence": returns["influence"] - returns["all"],
                     "delta_random": returns["random"] - returns["all"]})
        print(f"   round {k}: dropped {negative.sum()}/{len(influence)}  Δ influence {rows[-1]['delta_influence']:+.3f}"
              f"  Δ random {rows[-1]['delta_random']:+.3f}", flush=True)

    model = standard_ppo(recipe)
    rounds_of_training(model, max(rounds) + 1, AfterRollout(compare_updates))
    return rows


def _intervention_summary(results: dict) -> list[dict]:
    by_round: dict[int, list[dict]] = {}
    for rows in results.values():
        for row in rows:
            by_round.setdefault(row["round"], []).append(row)
    return [{"round": k, **{f"{stat}_{kind}": float(fn(np.array([r[f"delta_{kind}"] for r in rows])))
                            for kind in ("influence", "random")
                            for stat, fn in (("median_delta", np.median), ("share_positive", lambda d: (d > 0).mean()),
                                             ("share_negative", lambda d: (d < 0).mean()))}}
            for k, rows in sorted(by_round.items())]
