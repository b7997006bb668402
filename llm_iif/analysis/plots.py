"""Every figure llm_iif draws, as PNG files or as figures for report.html."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llm_iif.analysis.summary import mean_and_sem
from llm_iif.core.fileio import publish


def plot_reward_curve(history: list[dict], path: Path, title: str) -> None:
    """Mean reward (± one std) and KL to the reference per round, as a PNG."""
    plt = pyplot()
    rounds = [m["round"] for m in history]
    mean = [m["reward_mean"] for m in history]
    std = [m["reward_std"] for m in history]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_reward.plot(rounds, mean, label="mean reward")
    ax_reward.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                           alpha=0.2, label="± 1 std")
    ax_reward.set_xlabel("round")
    ax_reward.set_ylabel("reward")
    ax_reward.legend(loc="lower right")
    ax_kl.plot(rounds, [m["kl"] for m in history], color="tab:red")
    ax_kl.set_xlabel("round")
    ax_kl.set_ylabel("KL(π ‖ π_ref) per response")
    fig.suptitle(title)
    save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    path = Path(path)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    publish(tmp, path)


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

