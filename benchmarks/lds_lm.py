"""How well IIF scores predict training on an LM recipe: the LDS of plain, Adam-preconditioned and random scores.

    .venv/bin/python benchmarks/lds_lm.py [--recipe recipes/tiny-sentiment.yaml] [--seeds 0,1,2]
                                          [--rounds 0,10,30] [--subsets 64] [--set section.key=value ...]
                                          [--output-dir runs/lds-lm]

For each seed it trains the recipe with IIF (single process) up to the last of ``--rounds``, with
``iif.lds_rounds`` set to ``--rounds``: at each of them the trainer redoes the round's update on ``--subsets``
random half-subsets of the batch (`llm_iif.training.lds_check`). Prints, per checked round, the mean ± standard
error over seeds of each kind of score's LDS, the relative gain of preconditioned over plain scores, and how
often training on the non-negative-score samples alone raised the target more than training on all of them.
Each run's lds/round_XXXX.json holds the subsets' predicted and real changes. The process uses one torch thread:
beside a second training run on 2 CPU cores, two threads each slowed some rounds a hundredfold.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from llm_iif.analysis.summary import mean_and_sem
from llm_iif.recipes import load_recipe
from llm_iif.training import build_trainer

REPO = Path(__file__).resolve().parents[1]


def mean_se(values: list[float]) -> str:
    """Mean ± standard error over seeds (`analysis.summary.mean_and_sem`)."""
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "—"
    return "{:.3f} ± {:.3f}".format(*mean_and_sem(values))


def relative_gain(plain: list[float], preconditioned: list[float]) -> str:
    """mean(preconditioned) / mean(plain) - 1, or why it is not shown."""
    if not preconditioned:
        return "— (no Adam state)"
    if statistics.mean(plain) <= 0:
        return "— (plain LDS ≤ 0)"
    return f"{statistics.mean(preconditioned) / statistics.mean(plain) - 1:+.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-sentiment.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", default="0,10,30")
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "lds-lm"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = sorted(int(r) for r in args.rounds.split(","))
    by_round: dict[int, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        recipe = load_recipe(args.recipe, [*args.overrides, "iif.enabled=true", f"iif.lds_rounds={rounds}",
                                           f"iif.lds_subsets={args.subsets}", f"run.rounds={rounds[-1] + 1}",
                                           f"run.seed={seed}", f"run.output_dir={args.output_dir}/seed-{seed}",
                                           "run.report_to=[]"])
        history = build_trainer(recipe).train(overwrite=True)
        for k in rounds:
            by_round.setdefault(k, []).append(history[k])
            shown = {key: round(v, 3) for key, v in history[k].items() if key.startswith("lds_")}
            print(f"seed {seed} round {k}: {shown}", flush=True)
    print(f"\n{'round':>5} | {'LDS plain':>15} | {'LDS precond.':>15} | {'LDS random':>15} | precond./plain - 1 | sign agr.")
    for k, checks in by_round.items():
        plain = [c["lds_plain"] for c in checks]
        preconditioned = [c["lds_preconditioned"] for c in checks if "lds_preconditioned" in c]
        agreement = f"{sum(c['lds_sign_agreement'] for c in checks)} of {len(checks)}"
        print(f"{k:>5} | {mean_se(plain):>15} | {mean_se(preconditioned):>15} | "
              f"{mean_se([c['lds_random'] for c in checks]):>15} | {relative_gain(plain, preconditioned):>18} | {agreement}")


if __name__ == "__main__":
    main()
