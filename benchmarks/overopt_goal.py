"""Issue 27's goal figures from a finished tiny-overopt comparison (a suite task directory or `llm-iif compare`).

    .venv/bin/python benchmarks/overopt_goal.py runs/suite-full/tiny-overopt [--score reward/hidden_rule]

For every method, over seeds: the peak and the final of the hidden score (its 5-round trailing mean), as
IQMs with 95% stratified bootstrap intervals. Then, seed by seed, `iif` (the trusted preference target)
against every other method: the difference of the peaks; `iif`'s final against standard's peak; and where
`iif`'s seed-mean curve of hidden score against KL lies against the KL sweep's frontier (standard and the
kl-* methods): the best seed-mean hidden score any of them reached at no more KL, round by round.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llm_iif.analysis.report import find_runs
from llm_iif.analysis.statistics import estimate_text, interval_estimates
from llm_iif.analysis.summary import summarize, trailing_mean

SMOOTH = 5
METHOD = "iif"
SWEEP_PREFIX = "kl-"


def smoothed(history: list[dict], key: str) -> list[float]:
    return trailing_mean([m[key] for m in history], SMOOTH)


def seed_mean_curve(histories: list[list[dict]], key: str) -> list[tuple[float, float]]:
    """(mean KL, mean smoothed score) per round over seeds."""
    rounds = min(map(len, histories))
    kl = np.mean([smoothed(h, "kl")[:rounds] for h in histories], axis=0)
    score = np.mean([smoothed(h, key)[:rounds] for h in histories], axis=0)
    return list(zip(kl.tolist(), score.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", type=Path)
    parser.add_argument("--score", default="reward/hidden_rule")
    args = parser.parse_args()
    key = args.score
    runs = find_runs(args.comparison)
    histories = {method: {int(run.root.name.split("-")[-1]): run.logged_history() for run in group
                          if run.final.is_dir()} for method, group in runs.items()}  # finished runs only
    print(f"{key}, {SMOOTH}-round trailing mean; IQM [95% CI] over seeds")
    print(f"{'method':<16} {'peak':<22} {'final':<22} {'final KL':<22}")
    for method, by_seed in histories.items():
        peaks = [max(smoothed(h, key)) for h in by_seed.values()]
        finals = [smoothed(h, key)[-1] for h in by_seed.values()]
        kls = [smoothed(h, "kl")[-1] for h in by_seed.values()]
        cells = [estimate_text(interval_estimates(v)["iqm"]) for v in (peaks, finals, kls)]
        print(f"{method:<16} {cells[0]:<22} {cells[1]:<22} {cells[2]:<22}")
    print(f"\n{METHOD} against each method, seed by seed (IQM [95% CI] of the difference)")
    for baseline in histories:
        if baseline == METHOD:
            continue
        common = sorted(set(histories[baseline]) & set(histories[METHOD]))
        pair = {name: {s: histories[name][s] for s in common} for name in (baseline, METHOD)}
        stats = summarize(pair, smooth=SMOOTH, baseline=baseline)["methods"][METHOD]["intervals"]
        peak = stats[f"peak_{key}_difference"]["iqm"]
        final = stats[f"final_{key}_difference"]["iqm"]
        print(f"  vs {baseline:<14} Δ peak {estimate_text(peak)}   Δ final {estimate_text(final)}")
    seeds = sorted(set(histories[METHOD]) & set(histories["standard"]))
    gap = [smoothed(histories[METHOD][s], key)[-1] - max(smoothed(histories["standard"][s], key)) for s in seeds]
    print(f"\n{METHOD}'s final minus standard's peak: "
          f"{estimate_text(interval_estimates(gap)['iqm'])}")
    sweep = [point for method, by_seed in histories.items() if method == "standard" or method.startswith(SWEEP_PREFIX)
             for point in seed_mean_curve(list(by_seed.values()), key)]
    ours = seed_mean_curve(list(histories[METHOD].values()), key)
    margins = []
    for kl, score in ours:
        reachable = [s for k, s in sweep if k <= kl]
        if reachable:
            margins.append(score - max(reachable))
    above = sum(m > 0 for m in margins)
    print(f"KL sweep frontier: {METHOD}'s seed-mean curve lies above it in {above} of {len(margins)} rounds "
          f"(margin min {min(margins):+.3f}, median {float(np.median(margins)):+.3f}, max {max(margins):+.3f})")


if __name__ == "__main__":
    main()
