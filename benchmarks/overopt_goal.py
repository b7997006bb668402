"""Issue 27's goal figures from a finished tiny-overopt comparison (a suite task directory or `llm-iif compare`).

    .venv/bin/python benchmarks/overopt_goal.py runs/suite-full/tiny-overopt [--score reward/hidden_rule]
        [--figures docs/images]

For every method, over seeds: the peak and the final of the hidden score (its 5-round trailing mean), as
IQMs with 95% stratified bootstrap intervals. Then, seed by seed, `iif` (the trusted preference target)
against every other method: the difference of the peaks; `iif`'s final against standard's peak; and where
`iif`'s seed-mean curve of hidden score against KL lies against the KL sweep's frontier (standard and the
kl-* methods): the best seed-mean hidden score any of them reached at no more KL, round by round. With
``--figures DIR``: DIR/overopt_score_vs_kl.png (the seed-mean score against KL, one curve per method) and
DIR/overopt_score.png (the score and the proxy reward over rounds, mean ± one standard error over seeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llm_iif.analysis.plots import Panel, curves_figure, save_figure, score_against_kl_figure, seed_mean_curve
from llm_iif.analysis.report import find_runs
from llm_iif.analysis.statistics import estimate_text, interval_estimates
from llm_iif.analysis.summary import score_against_kl, summarize, trailing_mean

SMOOTH = 5
METHOD = "iif"
SWEEP_PREFIX = "kl-"


def smoothed(history: list[dict], key: str) -> list[float]:
    return trailing_mean([m[key] for m in history], SMOOTH)


def kl_and_score(histories: list[list[dict]], key: str) -> list[tuple[float, float]]:
    """(mean KL, mean smoothed score) per round over seeds."""
    return list(zip(*score_against_kl(histories, key, SMOOTH)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", type=Path)
    parser.add_argument("--score", default="reward/hidden_rule")
    parser.add_argument("--figures", type=Path)
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
             for point in kl_and_score(list(by_seed.values()), key)]
    ours = kl_and_score(list(histories[METHOD].values()), key)
    margins = []
    for kl, score in ours:
        reachable = [s for k, s in sweep if k <= kl]
        if reachable:
            margins.append(score - max(reachable))
    above = sum(m > 0 for m in margins)
    print(f"KL sweep frontier: {METHOD}'s seed-mean curve lies above it in {above} of {len(margins)} rounds "
          f"(margin min {min(margins):+.3f}, median {float(np.median(margins)):+.3f}, max {max(margins):+.3f})")
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        by_label = {method: list(by_seed.values()) for method, by_seed in histories.items()}
        save_figure(score_against_kl_figure(by_label, key), args.figures / "overopt_score_vs_kl.png")
        panels = [Panel([seed_mean_curve(method, [smoothed(h, metric) for h in runs]) for method, runs in by_label.items()],
                        title=title, legend=i == 0) for i, (metric, title) in
                  enumerate(((key, f"{key} (not trained on)"), ("reward_mean", "proxy reward (trained on)")))]
        save_figure(curves_figure(panels, columns=2), args.figures / "overopt_score.png")


if __name__ == "__main__":
    main()
