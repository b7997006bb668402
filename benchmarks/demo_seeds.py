"""Measure the offline demo across seeds: reward rise, diversity kept, and wall time per run.

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2] [--recipe recipes/tiny-sentiment.yaml]

Prints one row per seed, measured in this run: round-0 reward, mean reward of the last 3 rounds, the rise,
distinct-2 of the last round over round 0's, the largest per-round KL, and seconds for the whole run
(the tiny model must already be cached, e.g. by `make demo`, or the first seed also pays for building it).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from llm_iif.cli import quiet_libraries
from llm_iif.config import load_recipe
from llm_iif.trainer import PPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny-sentiment.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    quiet_libraries()
    print(f"{'seed':>4} {'reward r0':>10} {'last 3':>8} {'rise':>7} {'d2 ratio':>9} {'max KL':>7} {'seconds':>8}")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            recipe = load_recipe(args.recipe, [f"run.seed={seed}", f"run.output_dir={out}"])
            start = time.perf_counter()
            history = PPOTrainer(recipe).train()
            seconds = time.perf_counter() - start
        first = history[0]
        tail = sum(m["reward_mean"] for m in history[-3:]) / 3
        ratio = history[-1]["distinct_2"] / first["distinct_2"]
        max_kl = max(m["kl"] for m in history)
        print(f"{seed:>4} {first['reward_mean']:>+10.3f} {tail:>+8.3f} {tail - first['reward_mean']:>+7.3f} "
              f"{ratio:>9.2f} {max_kl:>7.2f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
