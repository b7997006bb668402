"""Every figure llm_iif draws, as PNG files or as PNG bytes for report.html.

Two drawing functions serve every curve and every influence histogram:

- `curves_figure`: panels of lines over rounds, each line with an optional shaded band (± one std within a
  round, ± one standard error over seeds), e.g. reward and KL;
- `influence_figure`: one influence histogram per round, kept samples beside dropped ones, with an optional
  panel of curves beside them (e.g. the kept fraction per round).

The ``plot_*`` functions build a figure from run data and write it as a PNG with `save_figure`; report.html
inlines figures with `figure_png`. matplotlib is imported only when a figure is drawn (`pyplot`). Every text
that comes from data (method, task and folder names, a model's name) reaches matplotlib through `plain`, so
that a ``$`` in it is a dollar sign, not mathtext.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llm_iif.analysis.summary import mean_and_sem, score_against_kl
from llm_iif.core.fileio import atomic_path
from llm_iif.runs.paths import RunPaths

PANEL_SIZE = (5.0, 3.6)  # inches per panel


@dataclass
class Curve:
    """One line of a panel: ``y`` over ``x``, shaded between y − band and y + band when ``band`` is given."""
    x: Sequence[float]
    y: Sequence[float]
    band: Sequence[float] | None = None
    label: str | None = None          # its legend entry; None for none
    band_label: str | None = None     # the band's legend entry
    colour: str | None = None         # None: the next colour of the cycle
    alpha: float = 1.0


@dataclass
class Panel:
    """One axes of curves over rounds."""
    curves: list[Curve]
    ylabel: str = ""
    title: str = ""
    xlabel: str = "round"
    symlog: bool = False              # a log scale above 1, e.g. for KL spikes of tens of nats beside ~1
    ylim: tuple[float, float] | None = None
    legend: bool = False              # a legend of its labelled curves


# ------------------------------------------------------------------------------------------ the figures

def curves_figure(panels: list[Panel], title: str = "", columns: int = 3):
    """A figure of ``panels`` (at most ``columns`` per row), each drawn with its curves and bands."""
    plt = pyplot()
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(plain(title))
    return fig


def score_against_kl_figure(by_label: dict[str, list[list[dict]]], key: str, smooth: int = 5):
    """A reported score against KL(π‖π_ref), one curve per label (method) through its rounds, each point the
    mean over the label's runs (seeds) of ``key`` and ``kl`` in that round, each run's values first averaged
    over its last ``smooth`` rounds: how much of the true objective each method buys per nat of divergence from
    the reference (Gao, Schulman and Hilton, ICML 2023)."""
    curves = [Curve(kl, score, label=label) for label, histories in by_label.items()
              for kl, score in [score_against_kl(histories, key, smooth)] if kl]
    return curves_figure([Panel(curves, ylabel=key, xlabel=f"KL to the reference (nats; {smooth}-round means)",
                                legend=True, title=f"{key} against KL, mean over seeds")], columns=1)


def performance_profile_figure(finals: dict[str, Sequence[float]], xlabel: str = "final reward"):
    """rliable's performance profile of a comparison: for each method, the fraction of its seeds whose final
    reward exceeds τ, over τ, with 95% stratified bootstrap bands. ``finals``: method -> one value per seed."""
    from rliable import library as rly

    plt = pyplot()
    everything = [v for values in finals.values() for v in values]
    taus = np.linspace(min(everything), max(everything), 81)
    scores = {method: np.asarray(values, dtype=float).reshape(-1, 1) for method, values in finals.items()}
    profiles, intervals = rly.create_performance_profile(scores, taus, reps=1000)
    fig, ax = plt.subplots(figsize=PANEL_SIZE)
    for i, method in enumerate(finals):
        ax.plot(taus, profiles[method], label=plain(method), color=f"C{i}")
        ax.fill_between(taus, intervals[method][0], intervals[method][1], color=f"C{i}", alpha=0.2)
    ax.set(xlabel=f"τ ({xlabel})", ylabel="fraction of seeds with a value > τ",
           title="Performance profile (95% bootstrap bands)")
    ax.legend()
    fig.tight_layout()
    return fig


def interval_figure(panels: list[tuple[str, list[tuple[str, Sequence[float]]], float]]):
    """Side-by-side panels of point estimates with their intervals, one row per label, as rliable draws
    aggregate metrics. ``panels``: (title, [(label, [point, low, high])], the null value drawn as a line)."""
    plt = pyplot()
    height = max(len(rows) for _, rows, _ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_SIZE[0] * len(panels), 1.0 + 0.32 * height),
                             squeeze=False, sharey=True)
    labels = list(dict.fromkeys(label for _, rows, _ in panels for label, _ in rows))
    for ax, (title, rows, null) in zip(axes.flat, panels):
        for label, (point, low, high) in rows:
            y = labels.index(label)
            colour = "C1" if low <= null <= high else "C0"  # orange: no measurable difference
            ax.plot([low, high], [y, y], color=colour, linewidth=4, alpha=0.5)
            ax.plot([point], [y], "|", color=colour, markersize=12)
        ax.axvline(null, color="k", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(labels)), [plain(label) for label in labels])
        ax.invert_yaxis()
        ax.set(title=title)
    fig.suptitle("IQM over seeds, 95% stratified bootstrap intervals (orange: covers the baseline's value)")
    return fig


def influence_figure(by_round: dict[int, tuple[Sequence[float], Sequence[bool]]], note: str = "",
                     beside: Panel | None = None):
    """One histogram panel per round of ``by_round`` {round: (influence of each sample, whether it was kept)},
    kept and dropped samples in shared bins (NaN influences, of unscored samples, are left out); ``beside``
    adds a panel of curves after them. ``note`` goes under the histograms' x axis."""
    plt = pyplot()
    count = len(by_round) + (beside is not None)
    fig, axes = plt.subplots(1, count, figsize=(0.8 * PANEL_SIZE[0] * count, 0.9 * PANEL_SIZE[1]), squeeze=False)
    for ax, (k, (influence, kept)) in zip(axes.flat, by_round.items()):
        pairs = [(value, keep) for value, keep in zip(influence, kept) if math.isfinite(value)]
        bins = np.histogram_bin_edges([value for value, _ in pairs] or [0.0], bins=30)  # kept and dropped bars line up
        for wanted, colour, name in ((True, "tab:blue", "kept"), (False, "tab:red", "dropped")):
            values = [value for value, keep in pairs if keep == wanted]
            if values:
                ax.hist(values, bins=bins, color=colour, alpha=0.6, label=f"{name} ({len(values)})")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"round {k}")
        ax.set_xlabel(plain(f"influence{f' ({note})' if note else ''}"))
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    if beside is not None:
        _draw_panel(axes.flat[count - 1], beside)
    return fig


def lds_figure(by_round: dict[int, dict]):
    """One panel per checked round of ``by_round`` {round: lds/round_XXXX.json}: each subset's real change of the
    target against its predicted change (summed scores, z-scored per kind so that kinds share an axis), one
    colour per kind of score, its LDS in the legend."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_round), figsize=(0.8 * PANEL_SIZE[0] * len(by_round), 0.9 * PANEL_SIZE[1]),
                             squeeze=False)
    colours = {"plain": "tab:blue", "preconditioned": "tab:orange", "random": "tab:gray"}
    for ax, (k, check) in zip(axes.flat, by_round.items()):
        for kind, predicted in check["predicted"].items():
            predicted = np.asarray(predicted)
            z = (predicted - predicted.mean()) / (predicted.std() or 1.0)
            ax.scatter(z, check["actual"], s=12, alpha=0.7, color=colours.get(kind),
                       label=f"{kind}: LDS {check[f'lds_{kind}']:+.2f}")
        ax.set_title(f"round {k}")
        ax.set_xlabel("predicted change (summed scores, z-scored)")
        ax.set_ylabel("real change of the target")
        ax.legend(fontsize=8)
    return fig


def diagnosis_figure(influence: np.ndarray, gae: np.ndarray, monte_carlo: np.ndarray, edge_fraction: float,
                     title: str):
    """Fig. 3c (|Ā − Â| by influence rank, sign mismatches in red) and Fig. 3d (Ā·Â by rank); the top and
    bottom ``edge_fraction`` of the records are shaded."""
    plt = pyplot()
    valid = np.isfinite(monte_carlo)
    order = np.argsort(-influence[valid], kind="stable")
    gae, monte_carlo = gae[valid][order], monte_carlo[valid][order]
    rank = np.arange(1, len(order) + 1)
    mismatch = gae * monte_carlo < 0
    edge = max(1, int(edge_fraction * len(order)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, label in ((axes[0], np.abs(monte_carlo - gae), "|Ā − Â|"), (axes[1], gae * monte_carlo, "Ā · Â")):
        ax.axvspan(1, edge, color="tab:green", alpha=0.12, label=f"top {edge_fraction:.0%}")
        ax.axvspan(len(order) - edge, len(order), color="tab:red", alpha=0.12, label=f"bottom {edge_fraction:.0%}")
        ax.scatter(rank[~mismatch], values[~mismatch], s=4, color="tab:gray", label="same sign")
        ax.scatter(rank[mismatch], values[mismatch], s=4, color="tab:red", label="sign mismatch")
        ax.set_xlabel("record rank by influence (most helpful first)")
        ax.set_ylabel(label)
    axes[1].axhline(0.0, color="black", lw=0.6)
    axes[0].legend(fontsize=8)
    fig.suptitle(plain(title))
    return fig


def intervention_figure(summary: dict):
    """Boxplots of Δ test return per round over seeds, influence-guided drop beside random drop (Fig. 5/11),
    from intervention.json's content."""
    plt = pyplot()
    rounds = summary["rounds"]
    deltas = {kind: [[row[f"delta_{kind}"] for rows in summary["seeds"].values() for row in rows if row["round"] == k]
                     for k in rounds] for kind in ("influence", "random")}
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rounds) + 2), 4))
    positions = np.arange(len(rounds))
    for offset, (kind, colour) in zip((-0.18, 0.18), (("influence", "tab:blue"), ("random", "tab:orange"))):
        box = ax.boxplot(deltas[kind], positions=positions + offset, widths=0.3, patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
        dropped = "negative-influence" if kind == "influence" else "random"
        ax.plot([], [], color=colour, lw=6, alpha=0.6, label=f"drop {dropped} records")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xticks(positions, [str(k) for k in rounds])
    ax.set_xlabel("round k")
    ax.set_ylabel("Δ test return vs. updating on all records")
    ax.set_title(plain(summary["env"]))
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ PNG writers

def write_run_figures(run_dir: Path, history: list[dict], title: str) -> None:
    """The figures of one LM training run from its per-round metrics: RUN_DIR/reward_curve.png, titled
    ``title`` (see `run_title`)."""
    plot_reward_curve(history, RunPaths(run_dir).reward_curve, title)


def run_title(recipe) -> str:
    """The title of an LM run's figures: its model and reward."""
    return f"{recipe.model.name_or_path} · {recipe.reward.name}"


def plot_reward_curve(history: list[dict], path: Path, title: str) -> None:
    """One run's reward_curve.png: mean reward (± one std within the round) and KL to the reference per round,
    from its per-round metrics."""
    evaluated = [m for m in history if "reward_mean" in m]  # a GRPO run evaluates every run.eval_every steps
    rounds = [m["round"] for m in evaluated]
    reward = Panel([Curve(rounds, [m["reward_mean"] for m in evaluated], [m["reward_std"] for m in evaluated],
                          label="mean reward", band_label="± 1 std")], ylabel="reward", legend=True)
    kl = Panel([Curve(rounds, [m["kl"] for m in evaluated], colour="tab:red")], ylabel="KL(π ‖ π_ref) per response")
    save_figure(curves_figure([reward, kl], title=title), path)


def plot_reward_curves(summary: dict, path: Path, ylabel: str = "mean reward") -> None:
    """A comparison's reward_curves.png: per method, the mean reward (and KL, when every run logged it) per
    round over seeds with ± one-standard-error bands, from summary.json's content."""
    methods = summary["methods"]
    with_kl = all("final_kl" in entry for entry in methods.values())
    panels = [Panel([seed_mean_curve(f"{method} ({len(entry['seeds'])} seeds)",
                                     [run["reward"] for run in entry["seeds"].values()])
                     for method, entry in methods.items()], ylabel=ylabel, legend=True)]
    if with_kl:
        panels.append(Panel([seed_mean_curve(method, [run["kl"] for run in entry["seeds"].values()])
                             for method, entry in methods.items()],
                            ylabel="KL to the reference (nats per response)", symlog=True))
    save_figure(curves_figure(panels), path)


def plot_influence(by_round: dict[int, tuple[Sequence[float], Sequence[bool]]],
                   kept_fractions: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path, note: str = "") -> None:
    """A comparison's influence.png: influence histograms of one IIF run at a few rounds (see
    `influence_figure`) beside the kept fraction per round of each of ``kept_fractions`` {label: (rounds,
    kept fractions)}."""
    kept = Panel([Curve(rounds, values, label=label) for label, (rounds, values) in kept_fractions.items()],
                 ylabel="kept fraction", ylim=(0, 1.05), legend=True)
    save_figure(influence_figure(by_round, note=note, beside=kept), path)


def plot_diagnosis(influence: np.ndarray, gae: np.ndarray, monte_carlo: np.ndarray, edge_fraction: float,
                   path: Path, title: str) -> None:
    """diagnosis.png; see `diagnosis_figure`."""
    save_figure(diagnosis_figure(influence, gae, monte_carlo, edge_fraction, title), path)


def plot_intervention(summary: dict, path: Path) -> None:
    """intervention.png; see `intervention_figure`."""
    save_figure(intervention_figure(summary), path)


# ------------------------------------------------------------------------------------------ helpers

def seed_mean_curve(label: str, curves: list[list[float]]) -> Curve:
    """The mean of ``curves`` (one per seed) per round with a ± one-standard-error band, over the rounds every
    seed reached."""
    stats = [mean_and_sem([c[i] for c in curves]) for i in range(min(map(len, curves)))]
    return Curve(range(len(stats)), [m for m, _ in stats], [s for _, s in stats], label=label)


def plain(text: str | None) -> str | None:
    """``text`` as matplotlib draws it literally: each ``$`` escaped, so that no part of it is parsed as mathtext
    (a name like ``$\\bad$`` would fail the figure)."""
    return None if text is None else text.replace("$", r"\$")


def _draw_panel(ax, panel: Panel) -> None:
    for curve in panel.curves:
        line, = ax.plot(curve.x, curve.y, color=curve.colour, alpha=curve.alpha, label=plain(curve.label))
        if curve.band is not None:
            ax.fill_between(curve.x, [y - b for y, b in zip(curve.y, curve.band)],
                            [y + b for y, b in zip(curve.y, curve.band)], color=line.get_color(), alpha=0.2,
                            label=plain(curve.band_label))
    if panel.symlog:
        ax.set_yscale("symlog", linthresh=1.0)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_xlabel(plain(panel.xlabel))
    ax.set_ylabel(plain(panel.ylabel))
    ax.set_title(plain(panel.title))
    if panel.legend and any(c.label or c.band_label for c in panel.curves):
        ax.legend(fontsize=8)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    pyplot().close(fig)


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes (for inlining in report.html); closes it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    pyplot().close(fig)
    return buffer.getvalue()
