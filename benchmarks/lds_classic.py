"""How well classic IIF scores predict training: the LDS of plain, Adam-preconditioned and random scores.

    .venv/bin/python benchmarks/lds_classic.py [--envs frozenlake,acrobot] [--seeds 0,1,2] [--rounds 1,10,30] [--subsets 16]

For each recipe of recipes/classic/ (with ``ppo.optimizer: adam``, ``ppo.learning_rate: 3e-4`` and
``iif.precondition: adam``) and seed, `IIFPPO` trains round by round; after each round in ``--rounds`` it fills
a fresh buffer and runs `IIFPPO.linear_datamodeling_check` on it (``--subsets`` random half-subsets, the real
SB3 update redone on each). Prints every check, then per recipe and checked round the mean ± standard error over
seeds of each kind of score's LDS, the relative gain of preconditioned over plain scores, and how often
dropping the negative-score transitions raised the target more than training on all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_iif.classic.train import build_model
from llm_iif.recipes import ClassicRecipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from lds_lm import mean_se, relative_gain  # noqa: E402

OVERRIDES = ["ppo.optimizer=adam", "ppo.learning_rate=3.0e-4", "iif.precondition=adam"]


def checks(env: str, seed: int, rounds: list[int], subsets: int) -> dict[int, dict]:
    recipe = load_recipe(REPO / "recipes" / "classic" / f"{env}.yaml", [*OVERRIDES, f"run.seed={seed}"],
                         kind=ClassicRecipe)
    model = build_model(recipe, recipe.iif.mode, recipe.iif.p)
    steps = recipe.ppo.n_steps * recipe.env.n_envs
    results = {}
    for k in range(1, max(rounds) + 1):
        model.learn(steps, reset_num_timesteps=(k == 1))
        if k in rounds:
            model._setup_learn(steps, reset_num_timesteps=False)
            model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
            results[k] = model.linear_datamodeling_check(num_subsets=subsets, seed=seed)
            shown = {key: round(v, 3) for key, v in results[k].items() if key.startswith("lds_")
                     and not key.endswith("interval")}
            print(f"{env} seed {seed} after round {k}: {shown} sign_agreement={results[k]['sign_agreement']}",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="frozenlake,acrobot")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", default="1,10,30")
    parser.add_argument("--subsets", type=int, default=16)
    args = parser.parse_args()
    rounds = [int(r) for r in args.rounds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    table = {}
    for env in args.envs.split(","):
        for seed in seeds:
            for k, result in checks(env, seed, rounds, args.subsets).items():
                table.setdefault((env, k), []).append(result)
    print(f"\n{'recipe':<11} | {'round':>5} | {'LDS plain':>15} | {'LDS precond.':>15} | {'LDS random':>15} | "
          f"precond./plain - 1 | sign agr.")
    for (env, k), results in table.items():
        plain, preconditioned = ([r[key] for r in results] for key in ("lds_plain", "lds_preconditioned"))
        agreement = f"{sum(r['sign_agreement'] for r in results)} of {len(results)}"
        print(f"{env:<11} | {k:>5} | {mean_se(plain):>15} | {mean_se(preconditioned):>15} | "
              f"{mean_se([r['lds_random'] for r in results]):>15} | "
              f"{relative_gain(plain, preconditioned):>18} | {agreement}")


if __name__ == "__main__":
    main()
