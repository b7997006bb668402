"""The gold score a run would ship (llm_iif.analysis.flaws): final, oracle peak and trusted-stop; the KL
coefficient chosen by the trusted triples; the frontier; and the one-line refusals of a flaw without a gold
score and a trusted-stop without trusted triples."""

import pytest

from llm_iif.analysis.flaws import (frontier_margins, gold_key, kl_by_trusted, shipped_gold,
                                    trusted_stop_values)
from llm_iif.core.errors import UserError


def history(gold: list[float], margin: list[float] | None = None, kl: float = 1.0) -> list[dict]:
    rounds = []
    for k, value in enumerate(gold):
        metrics = {"round": k, "reward/hidden_rule": value, "kl": kl * k}
        if margin is not None:
            metrics["trusted/margin"] = margin[k]
        rounds.append(metrics)
    return rounds


def test_the_three_rules_pick_the_last_the_best_and_the_trusted_round():
    gold = [0.0, 1.0, 3.0, 2.0, 1.0]
    shipped = shipped_gold(history(gold, margin=[0.0, 5.0, 1.0, 0.0, 0.0]), "reward/hidden_rule", smooth=1)
    assert (shipped.final, shipped.oracle_peak) == (1.0, 3.0)
    assert shipped.trusted_stop_round == 1 and shipped.trusted_stop == 1.0  # the margin's best round, not gold's
    assert shipped.final_kl == 4.0 and shipped.final_trusted_margin == 0.0
    smoothed = shipped_gold(history(gold), "reward/hidden_rule", smooth=2)
    assert smoothed.final == 1.5 and smoothed.oracle_peak == 2.5 and smoothed.trusted_stop is None


def test_a_flaw_without_its_gold_score_and_a_trusted_stop_without_triples_are_refused():
    with pytest.raises(UserError, match="expected one logged metric whose name contains 'hidden'.*found none"):
        gold_key([{"reward_mean": 1.0}], "runs/x")
    assert gold_key(history([1.0]), "runs/x") == "reward/hidden_rule"
    grpo_step = {"eval/hidden_exact_match": 0.5, "rewards/hidden_exact_match/mean": 0.4,
                 "rewards/hidden_exact_match/std": 0.1}  # trl's training-batch means are not the gold
    assert gold_key([grpo_step], "runs/x") == "eval/hidden_exact_match"
    runs = {0: shipped_gold(history([1.0, 2.0]), "reward/hidden_rule")}
    with pytest.raises(UserError, match="trusted-stop: the runs of standard \\(seed 0\\) logged no trusted/margin"):
        trusted_stop_values(runs, "standard")


def test_kl_by_trusted_picks_per_seed_by_the_trusted_margin_not_the_gold():
    sweep = {"kl-0.2": {0: shipped_gold(history([1.0, 1.0], [0.0, 2.0]), "reward/hidden_rule", 1),
                        1: shipped_gold(history([3.0, 3.0], [0.0, 0.5]), "reward/hidden_rule", 1)},
             "kl-1": {0: shipped_gold(history([2.0, 2.0], [0.0, 1.0]), "reward/hidden_rule", 1),
                      1: shipped_gold(history([0.5, 0.5], [0.0, 0.9]), "reward/hidden_rule", 1)}}
    assert kl_by_trusted(sweep) == {0: ("kl-0.2", 1.0), 1: ("kl-1", 0.5)}


def test_frontier_margins_compare_with_the_best_reached_at_no_more_kl():
    sweep = [(0.0, 0.0), (1.0, 1.0), (2.0, 1.5)]
    assert frontier_margins([(1.5, 1.2), (2.5, 1.4), (-1.0, 9.0)], sweep) == pytest.approx([0.2, -0.1])
