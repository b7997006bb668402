"""Training against a flawed reward: the gold score each run would ship, by three rules.

A flaw task logs a hidden gold score, never trained on, under a metric whose name contains ``hidden``
(``reward/hidden_rule``, a GRPO reward function named ``hidden_...``). For one run's history, with every curve
its ``smooth``-round trailing mean:
- ``final``: the gold score of the last round;
- ``oracle_peak``: the best gold score of any round, which only someone who can see the gold score could pick;
- ``trusted_stop``: the gold score of the round with the best ``trusted/margin``, the policy's margin on the
  trusted triples, which a user can measure (`llm_iif.lm.trusted`).
Across a KL sweep, ``kl_by_trusted`` picks, seed by seed, the coefficient whose final trusted margin is best.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_iif.analysis.summary import trailing_mean
from llm_iif.core.errors import UserError

TRUSTED_MARGIN = "trusted/margin"
TRAINING_BATCH_REWARDS = "rewards/"
SMOOTH = 5


def gold_key(history: list[dict], where: str) -> str:
    """The one metric of ``history`` whose name contains ``hidden``; a `UserError` naming ``where`` when there is
    none (a flaw recipe without its hidden score function) or more than one. trl's means over the training batch
    (``rewards/<name>/mean``, ``/std``) are not the gold: a GRPO run's gold is its held-out ``eval/<name>``."""
    keys = sorted({key for metrics in history for key in metrics
                   if "hidden" in key and not key.startswith(TRAINING_BATCH_REWARDS)})
    if len(keys) != 1:
        found = f"found {', '.join(keys)}" if keys else "found none"
        raise UserError(f"{where}: expected one logged metric whose name contains 'hidden', the gold score that is "
                        f"never trained on ({found}); add it to reward.report (PPO) or as a reward function of "
                        "weight 0 (GRPO)")
    return keys[0]


@dataclass
class ShippedGold:
    """The gold score one run would ship by each rule, and its final KL to the reference (nats)."""
    final: float
    oracle_peak: float
    trusted_stop: float | None
    trusted_stop_round: int | None
    final_kl: float | None
    final_trusted_margin: float | None


def shipped_gold(history: list[dict], gold: str, smooth: int = SMOOTH) -> ShippedGold:
    """`ShippedGold` of one run over the rounds that log ``gold`` (GRPO logs it at evaluated steps only)."""
    rounds = [m for m in history if m.get(gold) is not None]
    curve = trailing_mean([m[gold] for m in rounds], smooth)
    kl = trailing_mean([m["kl"] for m in rounds], smooth) if all("kl" in m for m in rounds) else None
    if not all(TRUSTED_MARGIN in m for m in rounds):
        return ShippedGold(curve[-1], max(curve), None, None, kl[-1] if kl else None, None)
    margin = trailing_mean([m[TRUSTED_MARGIN] for m in rounds], smooth)
    best = max(range(len(margin)), key=margin.__getitem__)
    return ShippedGold(curve[-1], max(curve), curve[best], best, kl[-1] if kl else None, margin[-1])


def trusted_stop_values(by_seed: dict[int, ShippedGold], method: str) -> dict[int, float]:
    """Seed -> the trusted-stopped gold score of ``method``'s runs; a `UserError` when they logged no trusted
    margin (the recipe has no ``trusted`` section)."""
    missing = [seed for seed, shipped in by_seed.items() if shipped.trusted_stop is None]
    if missing:
        raise UserError(f"trusted-stop: the runs of {method} (seed {missing[0]}) logged no {TRUSTED_MARGIN}; expected "
                        "a recipe with a trusted section, whose triples every round is measured on")
    return {seed: shipped.trusted_stop for seed, shipped in by_seed.items()}


def kl_by_trusted(sweep: dict[str, dict[int, ShippedGold]]) -> dict[int, tuple[str, float]]:
    """Seed -> (the sweep's method with the best final trusted margin on that seed, its final gold score): the
    KL coefficient a user would pick with the trusted triples alone. ``sweep``: method -> seed -> `ShippedGold`."""
    seeds = set.intersection(*(set(runs) for runs in sweep.values()))
    picked = {}
    for seed in sorted(seeds):
        for method, runs in sweep.items():
            trusted_stop_values({seed: runs[seed]}, method)  # refuses runs without a trusted margin
        method = max(sweep, key=lambda name: sweep[name][seed].final_trusted_margin)
        picked[seed] = (method, sweep[method][seed].final)
    return picked


def frontier_margins(ours: list[tuple[float, float]], sweep: list[tuple[float, float]]) -> list[float]:
    """For each (√KL, gold) point of ``ours``, its gold minus the best gold any ``sweep`` point reached at no
    more √KL; rounds with no such sweep point are skipped."""
    margins = []
    for root_kl, score in ours:
        reachable = [s for k, s in sweep if k <= root_kl]
        if reachable:
            margins.append(score - max(reachable))
    return margins
