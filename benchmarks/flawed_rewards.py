"""Issue 37's tables and goal figures from a finished flawed-rewards suite (benchmarks/suites/flawed-rewards.yaml).

    .venv/bin/python benchmarks/flawed_rewards.py runs/suite-flawed-rewards [--figures DIR]

For each task (a flaw) and method, over seeds, IQM [95% stratified bootstrap interval]: the gold score the run
would ship at its last round (final), at the round with its best trusted margin (trusted-stop) and at its best
round by the gold score itself (oracle peak), and its final KL (`llm_iif.analysis.flaws`). Then the same-data
baselines (every method given the trusted triples: rm-plus-trusted, dpo-aux-*, kl-by-trusted, and every non-IIF
method's trusted-stop), the best of them by IQM, and the goal figures, paired seed by seed:
- iif's final minus the best same-data baseline's deployable number;
- iif's final over its own oracle peak;
- the share of rounds where iif's seed-mean (√KL, gold) point is on or above the KL sweep's frontier;
- iif-64's and iif-flipped's final minus standard's oracle peak;
- an IIF round's time over a standard round's (time_round_s, the median over rounds, per seed).
With ``--figures DIR``: DIR/flawed_<task>_gold_vs_sqrt_kl.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from llm_iif.analysis.flaws import (ShippedGold, frontier_margins, gold_key, kl_by_trusted, shipped_gold,
                                    trusted_stop_values)
from llm_iif.analysis.plots import Curve, Panel, curves_figure, save_figure
from llm_iif.analysis.report import find_runs
from llm_iif.analysis.statistics import estimate_text, interval_estimates
from llm_iif.analysis.summary import score_against_kl, trailing_mean
from llm_iif.core.errors import UserError

IIF = "iif"
SWEEP = ("standard", "kl-")
SAME_DATA = ("rm-plus-trusted", "dpo-aux-")


def interval(values) -> str:
    values = list(values)
    return estimate_text(interval_estimates(values)["iqm"]) if len(values) >= 2 else "n/a"


def paired(ours: dict[int, float], theirs: dict[int, float]) -> str:
    seeds = sorted(set(ours) & set(theirs))
    return interval([ours[s] - theirs[s] for s in seeds]) + f" ({len(seeds)} seeds)"


def is_sweep(method: str) -> bool:
    return method == SWEEP[0] or method.startswith(SWEEP[1])


def task_report(task_dir: Path, figures: Path | None) -> None:
    runs = find_runs(task_dir)
    histories = {method: {int(run.root.name.split("-")[-1]): run.logged_history() for run in group
                          if run.final.is_dir()} for method, group in runs.items()}
    histories = {method: by_seed for method, by_seed in histories.items() if by_seed}
    gold = gold_key(next(iter(next(iter(histories.values())).values())), str(task_dir))
    shipped = {method: {seed: shipped_gold(h, gold) for seed, h in by_seed.items()}
               for method, by_seed in histories.items()}
    print(f"\n## {task_dir.name}: {gold}, 5-round trailing mean; IQM [95% CI] over seeds")
    print(f"{'method':<16} {'seeds':>5}  {'final':<20} {'trusted-stop':<20} {'oracle peak':<20} {'final KL':<20}")
    for method, by_seed in shipped.items():
        runs_ = list(by_seed.values())
        stop = [r.trusted_stop for r in runs_ if r.trusted_stop is not None]
        kl = [r.final_kl for r in runs_ if r.final_kl is not None]
        print(f"{method:<16} {len(runs_):>5}  {interval(r.final for r in runs_):<20} {interval(stop):<20} "
              f"{interval(r.oracle_peak for r in runs_):<20} {interval(kl):<20}")

    if "standard" in histories:
        print_rise_and_fall(histories["standard"], gold)

    # The same-data baselines' deployable numbers, seed -> gold.
    baselines: dict[str, dict[int, float]] = {}
    for method, by_seed in shipped.items():
        if method.startswith(SAME_DATA):
            baselines[method] = {s: r.final for s, r in by_seed.items()}
        if not method.startswith(IIF):
            baselines[f"{method} @trusted-stop"] = trusted_stop_values(by_seed, method)
    sweep = {m: runs_ for m, runs_ in shipped.items() if is_sweep(m)}
    if len(sweep) > 1:
        picked = kl_by_trusted(sweep)
        baselines["kl-by-trusted"] = {seed: value for seed, (_, value) in picked.items()}
        choices = sorted({method for method, _ in picked.values()})
        print(f"kl-by-trusted picked: {', '.join(f'{m} ×{sum(p[0] == m for p in picked.values())}' for m in choices)}")
    print("\nsame-data baselines (deployable gold): " + "; ".join(
        f"{name} {interval(v.values())}" for name, v in baselines.items()))
    if IIF not in shipped:
        return
    best = max(baselines, key=lambda name: float(np.mean(list(baselines[name].values()))))
    iif_final = {s: r.final for s, r in shipped[IIF].items()}
    print(f"\nGOAL final gold: iif final − best same-data baseline ({best}): {paired(iif_final, baselines[best])}")
    for name, values in baselines.items():
        print(f"   vs {name:<26} {paired(iif_final, values)}")
    for method in ("iif-kl-0.2", "iif-draw-64"):  # IIF with a KL penalty, and at a fresh draw's cost
        if method in shipped:
            print(f"   {method} final − {best}: {paired({s: r.final for s, r in shipped[method].items()}, baselines[best])}")
    ratios = [r.final / r.oracle_peak for r in shipped[IIF].values()]
    print(f"GOAL no fall: iif final / own oracle peak: {interval(ratios)} (goal ≥ 0.95)")
    ours = root_kl_points(histories[IIF], gold)
    sweep_points = [p for m in sweep for p in root_kl_points(histories[m], gold)]
    margins = frontier_margins(ours, sweep_points)
    above = sum(m >= 0 for m in margins)
    print(f"GOAL frontier: iif on or above the KL sweep's (√KL, gold) frontier in {above} of {len(margins)} rounds "
          f"({above / max(len(margins), 1):.0%}; goal ≥ 90%)")
    standard_peak = {s: r.oracle_peak for s, r in shipped.get("standard", {}).items()}
    for method in ("iif-64", "iif-flipped", "iif-16", "iif-unseen"):
        if method in shipped:
            print(f"GOAL small/noisy set: {method} final − standard's oracle peak: "
                  f"{paired({s: r.final for s, r in shipped[method].items()}, standard_peak)}")
    for method in [m for m in histories if m.startswith(IIF) or m.startswith(SAME_DATA)]:
        cost = round_time_ratios(histories[method], histories.get("standard", {}))
        if cost:
            print(f"GOAL cost: a {method} round / a standard round (median time_round_s, per seed): {interval(cost)}"
                  " (goal for iif ≤ 1.3)")
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        from matplotlib import colormaps, colors  # tab20: no two of a suite's up to 13 methods share a colour

        palette = [colors.to_hex(colormaps["tab20"](i)) for i in range(20)]
        curves = [Curve([x for x, _ in pts], [y for _, y in pts], label=method, colour=palette[i % 20])
                  for i, (method, by_seed) in enumerate(histories.items()) for pts in [root_kl_points(by_seed, gold)]]
        save_figure(curves_figure([Panel(curves, title=f"{task_dir.name}: gold against √KL",
                                         xlabel="√KL to the reference (√nats)", ylabel="gold score", legend=True)],
                                    columns=1),
                    figures / f"flawed_{task_dir.name}_gold_vs_sqrt_kl.png")


def print_rise_and_fall(by_seed: dict[int, list[dict]], gold: str) -> None:
    """Standard's gold curve seed by seed: its start (the first 5 rounds' mean), peak (and round) and final; it
    fell when the final gave back at least a quarter of the climb from start to peak."""
    fell = 0
    print(f"\nstandard, seed by seed: start, peak (round), final of {gold}; fell = final ≤ peak − ¼ (peak − start)")
    for seed, history in sorted(by_seed.items()):
        values = [m[gold] for m in history if m.get(gold) is not None]
        curve = trailing_mean(values, 5)
        start, peak = float(np.mean(values[:5])), max(curve)
        dropped = curve[-1] <= peak - 0.25 * (peak - start)
        fell += dropped
        print(f"  seed {seed:>3}: {start:.2f}  {peak:.2f} ({curve.index(peak):>2})  {curve[-1]:.2f}  "
              f"{'fell' if dropped else 'held'}")
    print(f"  rose, peaked and fell on {fell} of {len(by_seed)} seeds (goal: at least 8 of 10)")


def root_kl_points(by_seed: dict[int, list[dict]], gold: str) -> list[tuple[float, float]]:
    """(√ seed-mean KL, seed-mean gold) per round, each curve a 5-round trailing mean."""
    kl, score = score_against_kl(list(by_seed.values()), gold, 5)
    return [(math.sqrt(max(k, 0.0)), s) for k, s in zip(kl, score)]


def round_time_ratios(ours: dict[int, list[dict]], theirs: dict[int, list[dict]]) -> list[float]:
    seeds = sorted(set(ours) & set(theirs))
    return [float(np.median([m["time_round_s"] for m in ours[s]]) / np.median([m["time_round_s"] for m in theirs[s]]))
            for s in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite_dir", type=Path)
    parser.add_argument("--figures", type=Path)
    args = parser.parse_args()
    tasks = sorted(p for p in args.suite_dir.iterdir() if (p / "comparison.json").is_file())
    if not tasks:
        raise UserError(f"{args.suite_dir}: no comparison.json in any of its folders; expected a suite directory")
    for task_dir in tasks:
        task_report(task_dir, args.figures)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # bad input: one line, exit 2
        sys.exit(f"flawed_rewards.py: error: {err}")
