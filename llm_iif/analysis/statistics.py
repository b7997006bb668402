"""Interval estimates for a methods × seeds comparison, the way rliable reports RL results (Agarwal et al.,
NeurIPS 2021): interquartile means (IQM) and means over seeds with 95% stratified bootstrap confidence intervals,
and the probability of improvement over the baseline. The bootstraps are rliable's.

Each method is compared with the baseline (standard, unless told otherwise) seed by seed, against the
baseline's run of the same seed, so every statistic is a paired one:

- ratios, where "1" is the baseline: rounds and seconds to the baseline's final reward and to its peak
  (`llm_iif.analysis.summary.efficiency`), and the area under the reward curve above the baseline's first round;
- differences, where "0" is the baseline: final reward and final KL (rewards can be negative, so no ratio);
- P(method's final reward > baseline's), over pairs of seeds, where "0.5" is the baseline.

A statistic whose interval covers its null value is reported as "no measurable difference".
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from llm_iif.core.errors import UserError

CONFIDENCE = 0.95
BOOTSTRAP_REPS = 2000
# The paired statistics: name -> (what it compares, null value, True when lower means the method is better).
RATIOS = {"rounds_to_baseline_final": "rounds to the baseline's final reward",
          "seconds_to_baseline_final": "seconds to the baseline's final reward",
          "rounds_to_baseline_peak": "rounds to the baseline's peak",
          "seconds_to_baseline_peak": "seconds to the baseline's peak",
          "auc_ratio": "area under the reward curve"}
DIFFERENCES = {"final_reward_difference": "final reward", "final_kl_difference": "final KL"}
LOWER_IS_BETTER = {"rounds_to_baseline_final", "seconds_to_baseline_final", "rounds_to_baseline_peak",
                   "seconds_to_baseline_peak", "final_kl_difference"}
NO_DIFFERENCE = "no measurable difference"


def interval_estimates(values: list[float], seed: int = 0) -> dict:
    """{"iqm": [point, low, high], "mean": [point, low, high]} of per-seed ``values`` [n ≥ 2], with rliable's
    percentile bootstrap over seeds."""
    return interval_estimates_by_statistic({"x": values}, seed)["x"]


def interval_estimates_by_statistic(per_seed: dict[str, list[float]], seed: int = 0) -> dict[str, dict]:
    """`interval_estimates` of several statistics over the same seeds in one rliable call: each statistic is a
    task of rliable's stratified bootstrap, so its seeds are resampled on their own, as in separate calls."""
    from rliable import library as rly

    names = list(per_seed)
    scores = np.asarray([per_seed[name] for name in names], dtype=float).T  # [seeds, statistics]
    _require_seeds(len(scores))

    def iqm_and_mean(s: np.ndarray) -> np.ndarray:  # [2 × statistics]: every IQM, then every mean
        return np.concatenate([interquartile_means(s), s.mean(axis=0)])

    with rliable_seeded(seed):
        points, intervals = rly.get_interval_estimates(
            {"x": scores}, iqm_and_mean, reps=BOOTSTRAP_REPS, confidence_interval_size=CONFIDENCE,
            random_state=np.random.RandomState(seed))
    point, (low, high), k = points["x"], intervals["x"], len(names)
    return {name: {"iqm": [float(point[j]), float(low[j]), float(high[j])],
                   "mean": [float(point[k + j]), float(low[k + j]), float(high[k + j])]}
            for j, name in enumerate(names)}


@contextmanager
def rliable_seeded(seed: int):
    """Make rliable's bootstrap reproducible: its resampling draws from NumPy's global generator, ignoring the
    ``random_state`` it is given (rliable 1.2.0, `StratifiedBootstrap.update_indices`), so that generator is
    seeded for the call and restored after it. Also silences arch's notice that RandomState will give way to
    Generator."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        np.random.set_state(state)


def interquartile_means(scores: np.ndarray) -> np.ndarray:
    """The IQM of every column of ``scores`` [seeds, statistics]: rliable's ``aggregate_iqm`` (scipy's
    ``trim_mean`` cutting 25% from each end) without scipy's per-call checks, which cost more than the sum
    itself when the bootstrap calls it thousands of times."""
    cut = int(0.25 * len(scores))
    return np.sort(scores, axis=0)[cut:len(scores) - cut].mean(axis=0)


def probability_of_improvement(method: list[float], baseline: list[float], seed: int = 0) -> list[float]:
    """[point, low, high] of P(X > Y) + ½ P(X = Y), X a method's and Y the baseline's per-seed score (the
    Mann-Whitney estimate of rliable's ``probability_of_improvement``; exactly 0.5 for identical samples), with
    rliable's 95% stratified bootstrap interval over seeds."""
    from rliable import library as rly

    x = np.asarray(method, dtype=float).reshape(-1, 1)
    y = np.asarray(baseline, dtype=float).reshape(-1, 1)
    _require_seeds(min(len(x), len(y)))
    with rliable_seeded(seed):
        points, intervals = rly.get_interval_estimates(
            {"x,y": [x, y]}, lambda a, b: np.array([improvement_probability(a[:, 0], b[:, 0])]),
            reps=BOOTSTRAP_REPS, confidence_interval_size=CONFIDENCE, random_state=np.random.RandomState(seed))
    return [float(points["x,y"][0]), float(intervals["x,y"][0][0]), float(intervals["x,y"][1][0])]


def improvement_probability(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + ½ P(X = Y) over all pairs of ``x`` [n] and ``y`` [m]: the Mann-Whitney U statistic over n·m,
    as rliable's ``metrics.probability_of_improvement`` computes it for one task, without scipy's test around it
    (which the bootstrap would run thousands of times)."""
    greater = (x[:, None] > y[None, :]).sum()
    ties = (x[:, None] == y[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(x) * len(y)))


def verdict(estimate: list[float], null: float, lower_is_better: bool = False) -> str:
    """"better", "worse" or "no measurable difference": whether [point, low, high] excludes ``null``."""
    _, low, high = estimate
    if low <= null <= high:
        return NO_DIFFERENCE
    above = low > null
    return "better" if above != lower_is_better else "worse"


def paired_statistics(per_seed: dict[str, list[float]], final_rewards: tuple[list[float], list[float]]) -> dict:
    """Every paired statistic of one method against the baseline.

    per_seed: statistic name (a key of `RATIOS` or `DIFFERENCES`) -> one value per seed, seeds in order;
    final_rewards: (method's, baseline's) final reward per seed.
    Returns {name: {"iqm": [...], "mean": [...], "verdict": ...}, "probability_of_improvement": {...}}.
    """
    out = {}
    for name, estimates in interval_estimates_by_statistic(per_seed).items():
        null = 1.0 if name in RATIOS else 0.0
        out[name] = {**estimates, "null": null,
                     "verdict": verdict(estimates["iqm"], null, name in LOWER_IS_BETTER)}
    improvement = probability_of_improvement(*final_rewards)
    out["probability_of_improvement"] = {"estimate": improvement, "null": 0.5,
                                         "verdict": verdict(improvement, 0.5)}
    return out


def auc_above_start(curve: list[float], start: float) -> float:
    """Σ_k (r_k − start): the area of a per-round reward curve above the baseline's first-round reward."""
    return float(sum(value - start for value in curve))


def _require_seeds(n: int) -> None:
    if n < 2:
        raise UserError(f"--seeds: {n} seed; intervals over seeds need at least 2")


# Column headers of the interval tables (printed and in report.html), in order.
INTERVAL_COLUMNS = {"rounds_to_baseline_final": "rounds→final", "seconds_to_baseline_final": "s→final",
                    "rounds_to_baseline_peak": "rounds→peak", "auc_ratio": "AUC ×",
                    "final_reward_difference": "Δ final reward", "final_kl_difference": "Δ final KL",
                    "probability_of_improvement": "P(final > std)"}


def estimate_text(estimate: list[float]) -> str:
    """``0.57 [0.50, 0.63]``: a point estimate and its interval."""
    point, low, high = estimate
    return f"{point:.2f} [{low:.2f}, {high:.2f}]"


def interval_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of every method's IQM (P(improve): its estimate) with its 95% interval against standard;
    a cell is marked "≈" where the interval covers the null value. Empty when no method has intervals."""
    methods = {m: entry["intervals"] for m, entry in summary["methods"].items() if "intervals" in entry}
    names = {**INTERVAL_COLUMNS, **reported_columns(methods)}
    columns = [key for key in names if any(key in stats for stats in methods.values())]
    rows = []
    for method, stats in methods.items():
        row = [method]
        for key in columns:
            if key not in stats:
                row.append("–")
                continue
            estimate = stats[key].get("iqm") or stats[key]["estimate"]
            row.append(estimate_text(estimate) + (" ≈" if stats[key]["verdict"] == NO_DIFFERENCE else ""))
        rows.append(row)
    return ["method", *(names[key] for key in columns)], rows


# Per-run statistics of a reported reward (``reward/NAME``, never trained on) that are compared seed by seed.
REPORTED_ENDS = ("final_reward/", "peak_reward/")


def reported_label(key: str) -> str:
    """``final_reward/hidden_rule`` (or its ``_difference``) -> ``final hidden_rule``."""
    end, name = key.removesuffix("_difference").split("/", 1)
    return f"{end.removesuffix('_reward')} {name}"


def reported_columns(methods: dict[str, dict]) -> dict[str, str]:
    """Column headers of the reported rewards' differences (``final_reward/hidden_rule_difference`` ->
    ``Δ final hidden_rule``), in the order first seen."""
    keys = dict.fromkeys(key for stats in methods.values() for key in stats
                         if key.startswith(REPORTED_ENDS) and key.endswith("_difference"))
    return {key: f"Δ {reported_label(key)}" for key in keys}
