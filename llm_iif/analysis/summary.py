"""Summaries of a methods × seeds comparison: smoothed curves, efficiency against a baseline, means ± SE.

The efficiency figures follow the paper (Hu et al. 2025, §5): SE_ave and SE_peak compare the rounds a
method needs against a baseline's (standard PPO or GRPO, unless told otherwise); RT_peak compares wall-clock
seconds to the baseline's peak.
"""

from __future__ import annotations

import math
import statistics

from llm_iif.analysis.statistics import REPORTED_ENDS, auc_above_start, paired_statistics

LEVELS = tuple(round(0.1 * i, 1) for i in range(2, 10))  # 0.2 ... 0.9
# `efficiency`'s fractions of the baseline's budget -> their column header in printed and HTML tables.
BUDGET_FRACTIONS = {"rounds_to_baseline_final": "rounds→final", "seconds_to_baseline_final": "s→final",
                    "rounds_to_baseline_peak": "rounds→peak", "seconds_to_baseline_peak": "s→peak",
                    "round_time_ratio": "s/round ×"}


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    # Summed afresh at each position: a running sum drifts, and a level test like 1.0 >= 1.0 would then fail.
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def rounds_to_reach(curve: list[float], level: float) -> int | None:
    """Rounds run until ``curve`` first reaches ``level`` (1 for the first round), or None."""
    return next((i + 1 for i, value in enumerate(curve) if value >= level), None)


def efficiency(baseline: list[float], method: list[float], baseline_seconds: list[float],
               method_seconds: list[float], smooth: int = 5) -> dict:
    """The paper's SE_ave, SE_peak and RT_peak (in %) of ``method`` against ``baseline``, and the fractions
    of the baseline's budget the method needs, in rounds and in seconds:

      rounds_to_baseline_final, seconds_to_baseline_final   to reach the baseline's final (smoothed) reward, as
                                                             a fraction of the baseline's whole run;
      rounds_to_baseline_peak, seconds_to_baseline_peak     to reach the baseline's peak, as a fraction of what
                                                             the baseline needed to reach it;
      round_time_ratio                                      median round time, method / baseline.

    baseline, method: per-round mean rewards; *_seconds: per-round wall times.
    """
    std, meth = trailing_mean(baseline, smooth), trailing_mean(method, smooth)
    start, peak = std[0], max(std)
    unreached = 0

    def rounds(curve, level):
        nonlocal unreached
        reached = rounds_to_reach(curve, level)
        if reached is None:
            unreached += 1
            return len(curve) + 1
        return reached

    def reduction(level):
        return 100.0 * (1.0 - rounds(meth, level) / rounds(std, level))

    def seconds(per_round, n):
        """Seconds of the first n rounds; an unreached level (n past the end) costs one more mean round."""
        return sum(per_round[:n]) + (sum(per_round) / len(per_round) if n > len(per_round) else 0.0)

    se_ave = sum(reduction(start + f * (peak - start)) for f in LEVELS) / len(LEVELS)
    se_peak = reduction(peak)
    m_std, m_meth = rounds(std, peak), rounds(meth, peak)
    seconds_std, seconds_meth = seconds(baseline_seconds, m_std), seconds(method_seconds, m_meth)
    to_final = rounds(meth, std[-1])
    return {"SE_ave": se_ave, "SE_peak": se_peak, "RT_peak": 100.0 * (1.0 - seconds_meth / seconds_std),
            "rounds_to_baseline_final": to_final / len(std),
            "seconds_to_baseline_final": seconds(method_seconds, to_final) / sum(baseline_seconds),
            "rounds_to_baseline_peak": m_meth / m_std,
            "seconds_to_baseline_peak": seconds_meth / seconds_std,
            "round_time_ratio": statistics.median(method_seconds) / statistics.median(baseline_seconds),
            "unreached_levels": unreached}


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def kl_spikes(kl: list[float], baseline_kl: list[float], factor: float = 3.0) -> int:
    """Rounds whose KL to the reference exceeds ``factor`` × the median KL of the baseline's run of the same seed."""
    threshold = factor * statistics.median(baseline_kl)
    return sum(value > threshold for value in kl)


def score_against_kl(histories: list[list[dict]], key: str, smooth: int) -> tuple[list[float], list[float]]:
    """(KL, ``key``) per round, each the mean over ``histories`` (one per seed) of the run's ``smooth``-round
    trailing mean, over the rounds that log both and that every run reached; empty lists when none does."""
    logged = [[m for m in h if "kl" in m and key in m] for h in histories]
    rounds = min(map(len, logged))
    if not rounds:
        return [], []
    def seed_mean(name: str) -> list[float]:
        curves = [trailing_mean([m[name] for m in h], smooth)[:rounds] for h in logged]
        return [sum(values) / len(values) for values in zip(*curves)]

    return seed_mean("kl"), seed_mean(key)


def reported_rewards(history: list[dict]) -> list[str]:
    """The ``reward/NAME`` metrics (the rewards of `reward.report`, never trained on) a run logged."""
    return [key for key in history[0] if key.startswith("reward/")]


def evaluated_rounds(history: list[dict]) -> list[dict]:
    """The rounds of ``history`` that have a reward (GRPO evaluates every ``run.eval_every`` steps), each with
    the wall time of every round since the previous one and their mean kept fraction: the points of its curve.
    A history with a reward every round comes back as it is."""
    points, seconds, kept = [], 0.0, []
    for metrics in history:
        seconds += metrics["time_round_s"]
        kept.append(metrics["kept_fraction"])
        if "reward_mean" in metrics:
            points.append({**metrics, "time_round_s": seconds, "kept_fraction": sum(kept) / len(kept)})
            seconds, kept = 0.0, []
    return points


def summarize(histories: dict[str, dict[int, list[dict]]], smooth: int = 5, baseline: str = "standard") -> dict:
    """summary.json's content from {method: {seed: per-round metrics}}: every method against ``baseline``'s run
    of the same seed (its efficiency, KL spikes and, over two or more seeds, its interval estimates). Curves are
    over the evaluated rounds (`evaluated_rounds`)."""
    summary = {"smooth": smooth, "levels": list(LEVELS), "baseline": baseline, "methods": {}}
    histories = {method: {seed: evaluated_rounds(history) for seed, history in by_seed.items()}
                 for method, by_seed in histories.items()}
    base_runs = histories.get(baseline)
    for method, by_seed in histories.items():
        entry = {"seeds": {}}
        for seed, history in by_seed.items():
            run = {"reward": [m["reward_mean"] for m in history],
                   "seconds": [m["time_round_s"] for m in history],
                   "kept_fraction": [m["kept_fraction"] for m in history],
                   "wall_time_s": sum(m["time_round_s"] for m in history)}
            run["final_reward"] = trailing_mean(run["reward"], smooth)[-1]
            if "kl" in history[0]:  # LM runs: a reward gained by drifting from the reference shows up here
                run["kl"] = [m["kl"] for m in history]
                run["final_kl"] = trailing_mean(run["kl"], smooth)[-1]
            for key in reported_rewards(history):  # e.g. the hidden rule behind a learned reward model
                curve = trailing_mean([m[key] for m in history], smooth)
                run[f"final_{key}"], run[f"peak_{key}"] = curve[-1], max(curve)  # over-optimised: peak > final
            if base_runs and seed in base_runs and "kl" in run and all("kl" in m for m in base_runs[seed]):
                run["kl_spikes"] = kl_spikes(run["kl"], [m["kl"] for m in base_runs[seed]])
            if base_runs and method != baseline and seed in base_runs:
                base = base_runs[seed]
                run["vs_baseline"] = efficiency([m["reward_mean"] for m in base], run["reward"],
                                                [m["time_round_s"] for m in base], run["seconds"], smooth)
            entry["seeds"][str(seed)] = run
        runs = list(entry["seeds"].values())
        entry["final_reward"] = mean_and_sem([r["final_reward"] for r in runs])
        reported = reported_rewards(next(iter(by_seed.values())))
        for key in ["final_kl", *(f"{end}_{k}" for k in reported for end in ("final", "peak"))]:
            if all(key in r for r in runs):
                entry[key] = mean_and_sem([r[key] for r in runs])
        if runs and all("kl_spikes" in r for r in runs):
            entry["kl_spikes"] = mean_and_sem([r["kl_spikes"] for r in runs])
        entry["mean_round_s"] = mean_and_sem([r["wall_time_s"] / len(r["reward"]) for r in runs])
        entry["mean_kept_fraction"] = mean_and_sem([sum(r["kept_fraction"]) / len(r["kept_fraction"]) for r in runs])
        if all("vs_baseline" in r for r in runs) and runs:
            entry["vs_baseline"] = {key: mean_and_sem([r["vs_baseline"][key] for r in runs])
                                    for key in runs[0]["vs_baseline"]}
        summary["methods"][method] = entry
    for method, entry in summary["methods"].items():  # once the baseline's runs are summarised too
        if "vs_baseline" in entry and len(entry["seeds"]) >= 2:  # intervals over seeds need two of them
            base = summary["methods"][baseline]["seeds"]
            entry["intervals"] = paired_statistics(*paired_values(entry["seeds"], base, smooth))
    return summary


def paired_values(runs: dict[str, dict], base: dict[str, dict], smooth: int
                  ) -> tuple[dict[str, list[float]], tuple[list[float], list[float]]]:
    """Per seed, a method's run against the baseline's run of the same seed: the statistics of
    `llm_iif.analysis.statistics.paired_statistics`, and the two final rewards."""
    seeds = [seed for seed in runs if seed in base]
    per_seed = {key: [runs[s]["vs_baseline"][key] for s in seeds] for key in
                ("rounds_to_baseline_final", "seconds_to_baseline_final", "rounds_to_baseline_peak",
                 "seconds_to_baseline_peak")}
    areas = []
    for s in seeds:  # the area above the baseline's first (smoothed) round; no ratio when it gained nothing
        start = trailing_mean(base[s]["reward"], smooth)[0]
        baseline_area = auc_above_start(trailing_mean(base[s]["reward"], smooth), start)
        areas.append(auc_above_start(trailing_mean(runs[s]["reward"], smooth), start) / baseline_area
                     if baseline_area > 0 else None)
    if all(area is not None for area in areas):
        per_seed["auc_ratio"] = areas
    per_seed["final_reward_difference"] = [runs[s]["final_reward"] - base[s]["final_reward"] for s in seeds]
    if all("final_kl" in runs[s] and "final_kl" in base[s] for s in seeds):
        per_seed["final_kl_difference"] = [runs[s]["final_kl"] - base[s]["final_kl"] for s in seeds]
    reported = [key for key in (runs[seeds[0]] if seeds else {}) if key.startswith(REPORTED_ENDS)]
    for key in reported:  # e.g. the hidden rule's final and peak, where over-optimisation shows
        if all(key in runs[s] and key in base[s] for s in seeds):
            per_seed[f"{key}_difference"] = [runs[s][key] - base[s][key] for s in seeds]
    return per_seed, ([runs[s]["final_reward"] for s in seeds], [base[s]["final_reward"] for s in seeds])

