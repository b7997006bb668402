"""Side-by-side runs of standard PPO, IIF and random filtering, and the paper's efficiency metrics.

``llm-iif compare RECIPE --methods standard,iif,random --seeds 0,1,2`` trains every (method, seed) pair with
the same recipe and seed into ``OUTPUT_DIR/METHOD/seed-S/`` and writes ``summary.json``,
``reward_curves.png`` and ``influence.png``.

The metrics follow the paper (Hu et al. 2025, §6). With m(v) the first round at which a run's reward curve
reaches level v, a method's reduction at v is 1 - m_method(v) / m_standard(v):
- ``SE_ave``: the mean reduction over the levels 20%, 30%, ..., 90% of standard's rise from its first round
  to its peak;
- ``SE_peak``: the reduction at standard's peak;
- ``RT_peak``: the same in cumulative wall time instead of rounds;
- ``rounds_to_standard_final``: m_method(standard's final reward) as a fraction of the run's rounds.
Each run also reports ``final_reward`` and ``final_kl`` (trailing means at the last round): a reward bought by
drifting from the reference model shows in the KL, not in the reward curve.
Curves are trailing means over ``smooth`` rounds, since one round's mean reward is noisy. A level a method
never reaches counts as reached one round after the budget (a bound that flatters the method), and
``unreached_levels`` says how often that happened. Each seed's method run is paired with the standard run
of the same seed; summary values are means and standard errors over seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llm_iif.outputs import pyplot, save_figure

LEVELS = tuple(round(0.1 * i, 1) for i in range(2, 10))  # 0.2 ... 0.9
METHODS = {
    "standard": ["iif.enabled=false"],
    "iif": ["iif.enabled=true"],
    # The paper's random baseline drops about half the batch at random, about what IIF drops there.
    "random": ["iif.enabled=true", "iif.mode=random", "iif.p=0.5"],
}


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    # Summed afresh at each position: a running sum drifts, and a level test like 1.0 >= 1.0 would then fail.
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def rounds_to_reach(curve: list[float], level: float) -> int | None:
    """Rounds run until ``curve`` first reaches ``level`` (1 for the first round), or None."""
    return next((i + 1 for i, value in enumerate(curve) if value >= level), None)


def efficiency(standard: list[float], method: list[float], standard_seconds: list[float],
               method_seconds: list[float], smooth: int = 5) -> dict:
    """The paper's SE_ave, SE_peak and RT_peak (in %) of ``method`` against ``standard``.

    standard, method: per-round mean rewards; *_seconds: per-round wall times, for RT_peak.
    """
    std, meth = trailing_mean(standard, smooth), trailing_mean(method, smooth)
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

    se_ave = sum(reduction(start + f * (peak - start)) for f in LEVELS) / len(LEVELS)
    se_peak = reduction(peak)
    m_std, m_meth = rounds(std, peak), rounds(meth, peak)
    seconds_std = sum(standard_seconds[:m_std])
    # An unreached peak costs the whole run plus one more mean round.
    extra_round = sum(method_seconds) / len(method_seconds) if m_meth > len(method_seconds) else 0.0
    seconds_meth = sum(method_seconds[:m_meth]) + extra_round
    final = std[-1]
    return {"SE_ave": se_ave, "SE_peak": se_peak, "RT_peak": 100.0 * (1.0 - seconds_meth / seconds_std),
            "rounds_to_standard_final": rounds(meth, final) / len(meth), "unreached_levels": unreached}


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def reported_rewards(history: list[dict]) -> list[str]:
    """The ``reward/NAME`` metrics (`reward.report` scores) a run logged."""
    return [key for key in history[0] if key.startswith("reward/")]


def summarize(histories: dict[str, dict[int, list[dict]]], smooth: int = 5) -> dict:
    """summary.json's content from {method: {seed: per-round metrics}}."""
    summary = {"smooth": smooth, "levels": list(LEVELS), "methods": {}}
    standard = histories.get("standard")
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
                run[f"final_{key}"] = trailing_mean([m[key] for m in history], smooth)[-1]
            if standard and method != "standard" and seed in standard:
                base = standard[seed]
                run["vs_standard"] = efficiency([m["reward_mean"] for m in base], run["reward"],
                                                [m["time_round_s"] for m in base], run["seconds"], smooth)
            entry["seeds"][str(seed)] = run
        runs = list(entry["seeds"].values())
        entry["final_reward"] = mean_and_sem([r["final_reward"] for r in runs])
        for key in ["final_kl", *(f"final_{k}" for k in reported_rewards(next(iter(by_seed.values()))))]:
            if all(key in r for r in runs):
                entry[key] = mean_and_sem([r[key] for r in runs])
        entry["mean_round_s"] = mean_and_sem([r["wall_time_s"] / len(r["reward"]) for r in runs])
        entry["mean_kept_fraction"] = mean_and_sem([sum(r["kept_fraction"]) / len(r["kept_fraction"]) for r in runs])
        if all("vs_standard" in r for r in runs) and runs:
            entry["vs_standard"] = {key: mean_and_sem([r["vs_standard"][key] for r in runs])
                                    for key in runs[0]["vs_standard"]}
        summary["methods"][method] = entry
    return summary


def run_compare(recipe_path: str, overrides: list[str], methods: list[str], seeds: list[int], output_dir: Path,
                accelerator) -> dict:
    """Train every (method, seed) pair in turn and write the comparison outputs; returns the summary."""
    from llm_iif.config import load_recipe
    from llm_iif.errors import UserError
    from llm_iif.outputs import atomic_write_text
    from llm_iif.trainer import PPOTrainer

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method '{unknown[0]}' (expected some of: {', '.join(METHODS)})")
    histories: dict[str, dict[int, list[dict]]] = {m: {} for m in methods}
    for seed in seeds:
        for method in methods:
            run_dir = output_dir / method / f"seed-{seed}"
            recipe = load_recipe(recipe_path, [*overrides, *METHODS[method], f"run.seed={seed}",
                                               f"run.output_dir={run_dir}"])
            if accelerator.is_main_process:
                print(f"== {method}, seed {seed} -> {run_dir}", flush=True)
            histories[method][seed] = PPOTrainer(recipe, accelerator).train()
            accelerator.free_memory()
    summary = summarize(histories)
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
        plot_reward_curves(summary, output_dir / "reward_curves.png")
        if "iif" in methods:
            plot_influence(output_dir / "iif", seeds, output_dir / "influence.png")
        from llm_iif.report import write_report

        write_report(output_dir)
    return summary


def plot_reward_curves(summary: dict, path: Path, ylabel: str = "mean reward") -> None:
    """Mean reward (and KL, when the runs logged it) per round over seeds with ± one-standard-error bands,
    one line per method."""
    plt = pyplot()
    with_kl = all("final_kl" in entry for entry in summary["methods"].values())
    fig, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(11 if with_kl else 7, 4), squeeze=False)
    ax_reward, ax_kl = axes[0][0], axes[0][-1]
    panels = ((ax_reward, "reward"), (ax_kl, "kl")) if with_kl else ((ax_reward, "reward"),)
    for method, entry in summary["methods"].items():
        for ax, key in panels:
            curves = [run[key] for run in entry["seeds"].values()]
            stats = [mean_and_sem([c[i] for c in curves]) for i in range(min(map(len, curves)))]
            rounds = range(len(stats))
            ax.plot(rounds, [m for m, _ in stats], label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(rounds, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax_reward.set_ylabel(ylabel)
    ax_reward.legend(loc="lower right")
    if with_kl:
        ax_kl.set_ylabel("KL to the reference (nats per response)")
        ax_kl.set_yscale("symlog", linthresh=1.0)  # spikes of tens of nats beside a baseline near 1
    for ax, _ in panels:
        ax.set_xlabel("round")
    save_figure(fig, path)


def plot_influence(iif_dir: Path, seeds: list[int], path: Path) -> None:
    """Influence-score histograms of the first seed at a few rounds, and the kept fraction per round."""
    import pyarrow.parquet as pq

    plt = pyplot()
    records = sorted((iif_dir / f"seed-{seeds[0]}" / "records").glob("round_*.parquet"))
    picked = sorted({0, len(records) // 2, len(records) - 1})
    scores = {i: pq.read_table(records[i], columns=["score"]).column("score").to_pylist() for i in picked}
    fig, (ax_hist, ax_kept) = plt.subplots(1, 2, figsize=(11, 4))
    # Score scales change by orders of magnitude over training; dividing by the round's largest |score|
    # (as the paper does for its figures) puts the rounds on one axis.
    for index, values in scores.items():
        largest = max(abs(v) for v in values) or 1.0
        ax_hist.hist([v / largest for v in values], bins=40, range=(-1, 1), alpha=0.5, label=f"round {index}")
    ax_hist.axvline(0.0, color="black", linewidth=0.8)
    ax_hist.set_xlabel(f"influence score / the round's largest |score| (seed {seeds[0]})")
    ax_hist.set_ylabel("samples")
    ax_hist.legend()
    for seed in seeds:
        rows = [json.loads(line) for line in (iif_dir / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
        ax_kept.plot([r["round"] for r in rows], [r["kept_fraction"] for r in rows], label=f"seed {seed}")
    ax_kept.set_xlabel("round")
    ax_kept.set_ylabel("kept fraction")
    ax_kept.set_ylim(0, 1.05)
    ax_kept.legend()
    save_figure(fig, path)
