"""Interval estimates of comparisons (`llm_iif.analysis.statistics`) against scipy and known cases."""

import numpy as np
import pytest
from scipy import stats

from llm_iif.analysis.statistics import (NO_DIFFERENCE, improvement_probability, interval_estimates,
                                         interval_table, probability_of_improvement, verdict)
from llm_iif.analysis.summary import summarize
from llm_iif.core.errors import UserError

SAMPLE = [0.62, 0.55, 0.71, 0.48, 0.66, 0.59, 0.90, 0.51, 0.63, 0.57]


def test_the_iqm_interval_matches_scipys_percentile_bootstrap():
    ours = interval_estimates(SAMPLE)
    iqm = stats.trim_mean(SAMPLE, 0.25)
    scipy_interval = stats.bootstrap((np.array(SAMPLE),), lambda x, axis: stats.trim_mean(x, 0.25, axis=axis),
                                     n_resamples=20000, method="percentile", confidence_level=0.95,
                                     random_state=np.random.default_rng(1)).confidence_interval
    assert ours["iqm"][0] == pytest.approx(iqm)
    # Two bootstraps of 2,000 and 20,000 resamples: the same interval to within resampling noise.
    assert ours["iqm"][1] == pytest.approx(scipy_interval.low, abs=0.015)
    assert ours["iqm"][2] == pytest.approx(scipy_interval.high, abs=0.015)
    assert ours["mean"][0] == pytest.approx(np.mean(SAMPLE))
    assert ours["mean"][1] < ours["mean"][0] < ours["mean"][2]


def test_intervals_are_the_same_every_time():
    """rliable resamples from NumPy's global generator whatever random_state it is given; ours seeds it."""
    np.random.seed(123)
    first = interval_estimates(SAMPLE), probability_of_improvement(SAMPLE[:5], SAMPLE[5:])
    after = np.random.random()
    np.random.seed(123)
    np.random.random(size=7)  # another state: the results must not depend on it
    assert (interval_estimates(SAMPLE), probability_of_improvement(SAMPLE[:5], SAMPLE[5:])) == first
    np.random.seed(123)
    interval_estimates(SAMPLE)
    probability_of_improvement(SAMPLE[:5], SAMPLE[5:])
    assert np.random.random() == after  # and the caller's global state is left as it was


def test_probability_of_improvement_known_cases():
    assert probability_of_improvement(SAMPLE, SAMPLE)[0] == 0.5
    better = probability_of_improvement([v + 1.0 for v in SAMPLE], SAMPLE)
    assert better == [1.0, 1.0, 1.0]
    # Mann-Whitney: 3 of the 4 pairs favour x, so 0.75.
    assert probability_of_improvement([2.0, 4.0], [1.0, 3.0])[0] == pytest.approx(0.75)


def test_the_improvement_probability_is_rliables():
    from rliable import metrics

    rng = np.random.default_rng(0)
    for n, m in ((5, 5), (10, 7), (3, 12)):
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, m).astype(float)  # with ties
        assert improvement_probability(x, y) == pytest.approx(
            metrics.probability_of_improvement(x.reshape(-1, 1), y.reshape(-1, 1)))


def test_verdicts():
    assert verdict([0.6, 0.5, 0.7], 1.0, lower_is_better=True) == "better"
    assert verdict([1.4, 1.1, 1.7], 1.0, lower_is_better=True) == "worse"
    assert verdict([0.9, 0.7, 1.1], 1.0) == NO_DIFFERENCE
    assert verdict([0.8, 0.6, 0.95], 0.5) == "better"


def test_one_seed_is_a_one_line_error():
    with pytest.raises(UserError, match="^--seeds: 1 seed; intervals over seeds need at least 2$"):
        interval_estimates([0.5])


def curve(seed: int, slope: float) -> list[dict]:
    noise = np.random.default_rng(seed).normal(0, 0.02, 30)
    return [{"reward_mean": slope * k + float(noise[k]), "time_round_s": 1.0, "kept_fraction": 1.0, "kl": 0.1}
            for k in range(30)]


def test_a_comparison_reports_intervals_and_verdicts():
    histories = {"standard": {s: curve(s, 0.01) for s in range(4)},
                 "same": {s: curve(s, 0.01) for s in range(4)},          # standard's runs again
                 "faster": {s: curve(s + 50, 0.03) for s in range(4)}}
    summary = summarize(histories)
    same, faster = summary["methods"]["same"]["intervals"], summary["methods"]["faster"]["intervals"]
    assert "intervals" not in summary["methods"]["standard"]
    assert all(entry["verdict"] == NO_DIFFERENCE for entry in same.values())
    assert same["probability_of_improvement"]["estimate"][0] == 0.5
    for key in ("rounds_to_baseline_final", "rounds_to_baseline_peak", "auc_ratio", "final_reward_difference",
                "probability_of_improvement"):
        assert faster[key]["verdict"] == "better", key
    assert faster["rounds_to_baseline_final"]["iqm"][2] < 1.0
    header, rows = interval_table(summary)
    assert header[0] == "method" and "P(final > std)" in header and [row[0] for row in rows] == ["same", "faster"]
    assert rows[0][1].endswith(" ≈") and not rows[1][1].endswith(" ≈")


def test_kl_spikes_count_rounds_above_three_times_standards_median():
    from llm_iif.analysis.summary import kl_spikes

    assert kl_spikes([1.0, 3.5, 2.9, 10.0], [1.0, 1.0, 2.0]) == 2  # threshold 3 × 1.0
    histories = {"standard": {s: curve(s, 0.01) for s in range(2)}, "iif": {s: curve(s, 0.01) for s in range(2)}}
    for round_ in histories["iif"][0][5:7]:
        round_["kl"] = 1.0  # 10 × standard's 0.1
    summary = summarize(histories)
    assert summary["methods"]["iif"]["seeds"]["0"]["kl_spikes"] == 2
    assert summary["methods"]["iif"]["kl_spikes"][0] == 1.0 and summary["methods"]["standard"]["kl_spikes"][0] == 0


def test_a_reported_rewards_peak_and_final_are_compared_seed_by_seed():
    """Over-optimisation shows in the reported (never trained on) reward: standard's hidden score peaks and falls,
    the method's keeps its level; both ends get paired intervals and their own table columns."""
    rise_and_fall = [0.0, 1.0, 2.0, 1.0, 0.0, 0.0]
    rise_and_stay = [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]

    def runs(hidden, offset):
        return {seed: [{"round": k, "reward_mean": 0.1 * k, "kl": 0.0, "time_round_s": 1.0, "kept_fraction": 1.0,
                        "reward/hidden_rule": h + 0.01 * seed + offset} for k, h in enumerate(hidden)]
                for seed in range(4)}

    summary = summarize({"standard": runs(rise_and_fall, 0.0), "iif": runs(rise_and_stay, 0.0)}, smooth=1)
    iif = summary["methods"]["iif"]
    assert iif["peak_reward/hidden_rule"][0] == pytest.approx(2.015)  # the mean over seeds 0-3
    assert summary["methods"]["standard"]["final_reward/hidden_rule"][0] == pytest.approx(0.015)
    assert iif["intervals"]["final_reward/hidden_rule_difference"]["iqm"] == pytest.approx([2.0, 2.0, 2.0])
    assert iif["intervals"]["peak_reward/hidden_rule_difference"]["iqm"] == pytest.approx([0.0, 0.0, 0.0])
    header, _ = interval_table(summary)
    assert {"Δ final hidden_rule", "Δ peak hidden_rule"} <= set(header)
