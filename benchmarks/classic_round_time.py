"""Per-round training time of IIFPPO against plain PPO, measured side by side on the classic recipes.

    .venv/bin/python benchmarks/classic_round_time.py [--envs frozenlake,acrobot,minigrid] [--rounds 8]

Both models train on the same recipe and seed, alternating one round each, so a machine that slows down
part-way (a second process on the 2 cores, thermal limits) slows both alike. A round is SB3's ``learn`` over n_steps: the rollout,
IIF's scoring and filtering, and the PPO epochs (on the kept transitions only, for IIF). Prints the mean
seconds per round of each, their ratio, the scoring time and the kept fraction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llm_iif.classic.train import build_model
from llm_iif.recipes import ClassicRecipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


def timed_round(model) -> float:
    start = time.perf_counter()
    model.learn(model.n_steps * model.n_envs, reset_num_timesteps=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="frozenlake,acrobot,minigrid")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per model, after one untimed round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| environment | PPO s/round | IIF s/round | IIF / PPO | scoring + filter s/round | IIF kept |")
    print("|---|---|---|---|---|---|")
    for env in args.envs.split(","):
        recipe = load_recipe(REPO / "recipes" / "classic" / f"{env}.yaml", [], kind=ClassicRecipe)
        standard, iif = build_model(recipe, "none", 0.0), build_model(recipe, recipe.iif.mode, recipe.iif.p)
        timed_round(standard), timed_round(iif)  # untimed: first-call overheads
        seconds = {"standard": [], "iif": []}
        scoring, kept = [], []
        for _ in range(args.rounds):
            seconds["standard"].append(timed_round(standard))
            seconds["iif"].append(timed_round(iif))
            scoring.append(iif.logger.name_to_value["iif/time_influence_s"])
            kept.append(iif.logger.name_to_value["iif/kept_fraction"])
        ppo, filtered = (sum(seconds[m]) / args.rounds for m in ("standard", "iif"))
        print(f"| {env} | {ppo:.2f} | {filtered:.2f} | {filtered / ppo:.2f} | {sum(scoring) / args.rounds:.3f} | "
              f"{sum(kept) / args.rounds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
