"""`llm-iif report RUN_DIR`: one self-contained ``report.html`` for a training run or a `compare` run.

It opens offline in any browser: every figure is a PNG inlined as a data URI, the styles are inline, and
there is no script. It shows the curves over rounds (reward, KL, entropy, kept fraction, evaluation
metrics; one line per method and seed for a compare run), influence-score histograms at a few rounds, the
top and bottom samples of one round, the recipe and the environment the run trained in.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from llm_iif.core.errors import UserError
from llm_iif.core.fileio import atomic_write_text
from llm_iif.analysis.plots import pyplot

CURVES = (("reward_mean", "mean reward"), ("kl", "KL to the reference"), ("entropy", "entropy per token"),
          ("kept_fraction", "kept fraction"))




def find_runs(run_dir: Path) -> dict[str, list[Path]]:
    """{label: run directories}: ``{name: [run_dir]}`` for a training run, ``{method: [seed-S dirs]}`` for a
    compare run."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        return {run_dir.name: [run_dir]}
    runs = {}
    if run_dir.is_dir():
        for method in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            seeds = sorted(d for d in method.glob("seed-*") if (d / "metrics.jsonl").is_file())
            if seeds:
                runs[method.name] = seeds
    if not runs:
        raise UserError(f"{run_dir}: not a run directory (no metrics.jsonl, nor METHOD/seed-S/metrics.jsonl)")
    return runs


def write_report(run_dir: Path, round_index: int | None = None, top: int = 5) -> Path:
    """Write ``RUN_DIR/report.html`` and return its path. ``round_index`` picks the round whose samples are
    tabled (default: the last round with records); ``top`` is the number of rows at each end."""
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    metrics = {(label, d): _read_jsonl(d / "metrics.jsonl") for label, dirs in runs.items() for d in dirs}
    scored = _scored_run(runs)
    rounds = _record_rounds(scored)
    if round_index is None:
        round_index = rounds[-1] if rounds else None
    elif round_index not in rounds:
        raise UserError(f"--round: {scored} has no records for round {round_index} "
                        f"(rounds with records: {_span(rounds)})")
    first = next(iter(runs.values()))[0]
    sections = [
        f"<h1>llm_iif report: {html.escape(str(run_dir))}</h1>",
        _summary(run_dir, runs, metrics),
        "<h2>Curves over rounds</h2>",
        _image(_curve_figure(metrics)),
    ]
    if rounds:
        if any(math.isfinite(r["score"]) for r in _records(scored, round_index)):  # not for runs without IIF
            picked = sorted({rounds[0], rounds[len(rounds) // 2], rounds[-1], round_index})
            sections += [f"<h2>Influence scores ({html.escape(_relative(scored, run_dir))})</h2>",
                         _histograms(scored, picked)]
        sections += [f"<h2>Samples of round {round_index}: top and bottom {top}</h2>",
                     _sample_table(scored, round_index, top)]
    sections += ["<h2>Recipe</h2>", f"<pre>{html.escape((first / 'recipe.yaml').read_text())}</pre>",
                 "<h2>Environment</h2>", _environment_table(first)]
    path = run_dir / "report.html"
    atomic_write_text(path, _page("\n".join(sections)))
    return path


# ---------------------------------------------------------------------------------------------- sections

def _summary(run_dir: Path, runs: dict, metrics: dict) -> str:
    rows = []
    for (label, directory), history in metrics.items():
        last = history[-1]
        name = label if len(runs[label]) == 1 and directory == run_dir else f"{label} / {directory.name}"
        rows.append([name, len(history), f"{history[0]['reward_mean']:+.3f}", f"{last['reward_mean']:+.3f}",
                     f"{last['kl']:.2f}", f"{sum(m.get('kept_fraction', 1.0) for m in history) / len(history):.2f}"])
    table = _table(["run", "rounds", "reward, round 0", "reward, last", "KL, last", "mean kept"], rows)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return table
    methods = json.loads(summary_file.read_text())["methods"]
    compared = [[method, *(f"{entry['vs_standard'][key][0]:+.1f} ± {entry['vs_standard'][key][1]:.1f}"
                           for key in ("SE_ave", "SE_peak", "RT_peak"))]
                for method, entry in methods.items() if "vs_standard" in entry]
    if not compared:
        return table
    return table + "<p>Against standard PPO (% fewer rounds or seconds; mean ± s.e. over seeds):</p>" + _table(
        ["method", "SE_ave %", "SE_peak %", "RT_peak %"], compared)


def _curve_figure(metrics: dict) -> bytes:
    histories = list(metrics.values())
    keys = [(k, label) for k, label in CURVES if any(k in m for h in histories for m in h)]
    keys += [(k, k) for k in sorted({k for h in histories for m in h for k in m if k.startswith("eval/")})]
    plt = pyplot()
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = {}
    for (label, _), history in metrics.items():
        first_of_label = label not in colours  # one legend entry per method, however many seeds
        colour = colours.setdefault(label, f"C{len(colours)}")
        for ax, (key, _) in zip(axes.flat, keys):
            points = [(m["round"], m[key]) for m in history if key in m]
            if points:
                ax.plot(*zip(*points), color=colour, alpha=0.8, linewidth=1.2, label=label if first_of_label else None)
    for ax, (_, title) in zip(axes.flat, keys):
        ax.set_title(title)
        ax.set_xlabel("round")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _png(fig)


def _histograms(run: Path, rounds: list[int]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rounds), figsize=(3.6 * len(rounds), 3), squeeze=False)
    for ax, k in zip(axes.flat, rounds):
        records = [r for r in _records(run, k) if math.isfinite(r["score"])]
        # Shared bins, so kept and dropped bars line up.
        bins = np.histogram_bin_edges([r["score"] for r in records] or [0.0], bins=30)
        for kept, colour, name in ((True, "tab:blue", "kept"), (False, "tab:red", "dropped")):
            values = [r["score"] for r in records if r["kept"] == kept]
            if values:
                ax.hist(values, bins=bins, color=colour, alpha=0.6, label=f"{name} ({len(values)})")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"round {k}")
        ax.set_xlabel("influence score")
        ax.legend(fontsize=8)
    return _image(_png(fig))


def _sample_table(run: Path, k: int, top: int) -> str:
    records = _records(run, k)
    has_scores = any(math.isfinite(r["score"]) for r in records)
    key = "score" if has_scores else "reward"
    ranked = sorted((r for r in records if math.isfinite(r[key])), key=lambda r: r[key], reverse=True)
    chosen = ranked[:top] + ranked[max(top, len(ranked) - top):]
    rows = [[r["prompt"], r["response"], f"{r['reward']:+.3f}", f"{r['advantage']:+.3f}",
             f"{r['score']:+.3g}" if math.isfinite(r["score"]) else "–", "yes" if r["kept"] else "no"]
            for r in chosen]
    note = f"<p>Sorted by {'influence score' if has_scores else 'reward (this run was not scored)'}, highest first.</p>"
    return note + _table(["prompt", "response", "reward", "advantage", "score", "kept"], rows)


def _environment_table(run: Path) -> str:
    path = run / "environment.json"
    if not path.is_file():
        return "<p>Not recorded (a run from before environment.json existed).</p>"
    return _table(["", ""], [[name, value] for name, value in json.loads(path.read_text()).items()])


# ---------------------------------------------------------------------------------------------- helpers

def _scored_run(runs: dict) -> Path:
    """The run whose records the histograms and tables show: the first IIF run when there is one."""
    return runs.get("iif", next(iter(runs.values())))[0]


def _record_rounds(run: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run / "records").glob("round_*.parquet"))


def _records(run: Path, k: int) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(run / "records" / f"round_{k:04d}.parquet").to_pylist()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _span(rounds: list[int]) -> str:
    return f"{rounds[0]}-{rounds[-1]}" if rounds else "none"


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else path.name


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    pyplot().close(fig)
    return buffer.getvalue()


def _image(png: bytes) -> str:
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(body: str) -> str:
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f2f2f2}img{max-width:100%}"
             "pre{background:#f7f7f7;padding:1em;overflow-x:auto}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>llm_iif report</title>'
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")
