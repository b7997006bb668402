"""`llm-iif report RUN_DIR`: one self-contained ``report.html`` for a training run or a `compare` run.

It opens offline in any browser: every figure is a PNG inlined as a data URI, the styles are inline, and
there is no script. It shows the curves over rounds (reward, KL, entropy, kept fraction, evaluation
metrics; one line per method and seed for a compare run), influence-score histograms at a few rounds, the
LDS checks (``iif.lds_rounds``) as predicted against real changes, the top and bottom samples of one round,
the recipe and the environment the run trained in.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from llm_iif.analysis.plots import (Curve, Panel, curves_figure, figure_png, influence_figure, lds_figure,
                                    performance_profile_figure, score_against_kl_figure)
from llm_iif.analysis.statistics import interval_table
from llm_iif.analysis.summary import BUDGET_FRACTIONS, reported_rewards
from llm_iif.core.errors import UserError, first_line
from llm_iif.core.fileio import atomic_write_text, read_jsonl
from llm_iif.runs.paths import GridPaths, RunPaths

CURVES = (("reward_mean", "mean reward"), ("kl", "KL to the reference"), ("entropy", "entropy per token"),
          ("kept_fraction", "kept fraction"))

# Runs from before the rename of influence scores: the old metric names and records column.
OLD_METRIC_NAMES = {"score_mean": "influence_mean", "score_neg_fraction": "influence_neg_fraction"}
OLD_INFLUENCE_COLUMN = "score"


def find_runs(run_dir: Path) -> dict[str, list[RunPaths]]:
    """{label: runs}: ``{name: [the run]}`` for a training run, ``{method: [its seed runs]}`` for a compare
    run (the runs its comparison.json records: `GridPaths.runs`)."""
    run_dir = Path(run_dir)
    if RunPaths(run_dir).metrics.is_file():
        return {run_dir.name: [RunPaths(run_dir)]}
    runs = GridPaths(run_dir).runs()
    if not runs:
        raise UserError(f"{run_dir}: not a run directory (no {RunPaths(run_dir).metrics.name}, "
                        f"nor runs of a comparison such as {GridPaths(run_dir).run('METHOD', 0).metrics})")
    return runs


def read_metrics(run: RunPaths) -> list[dict]:
    """The per-round metrics of ``run``; an older run's influence metrics are renamed to today's names. A torn
    last line (the run was killed while writing it) is left out; null values (NaN or inf when logged) are left
    out of their row."""
    rows = [{OLD_METRIC_NAMES.get(key, key): value for key, value in row.items() if value is not None}
            for row in read_jsonl(run.metrics)[0]]
    if not rows:
        raise UserError(f"{run.metrics}: no complete line yet (the run stopped before its first round or step "
                        "finished); nothing to report")
    return rows


def read_records(run: RunPaths, k: int) -> list[dict]:
    """The per-sample records of round ``k`` of ``run``, each with its ``influence`` (NaN when the run did not
    score it; an older run's ``score`` column is read as the influence)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run.record(k)).to_pylist()
    for row in rows:
        if "influence" not in row and OLD_INFLUENCE_COLUMN in row:
            row["influence"] = row.pop(OLD_INFLUENCE_COLUMN)
    return rows


def picked_rounds(rounds: list[int], *extra: int) -> list[int]:
    """The first, middle and last of ``rounds`` and ``extra``, in order: the rounds whose histograms are drawn."""
    return sorted({rounds[0], rounds[len(rounds) // 2], rounds[-1], *extra})


def influence_by_round(run: RunPaths, rounds: list[int]) -> dict[int, tuple[list[float], list[bool]]]:
    """{round: (influence of each sample, whether it was kept)} of ``run``, as `influence_figure` takes it."""
    by_round = {}
    for k in rounds:
        records = read_records(run, k)
        by_round[k] = ([r["influence"] for r in records], [r["kept"] for r in records])
    return by_round


def has_influence(records: list[dict]) -> bool:
    """Whether any sample of ``records`` was scored (a run without IIF has NaN influences only)."""
    return any(math.isfinite(r["influence"]) for r in records)


def write_report(run_dir: Path, round_index: int | None = None, top: int = 5) -> Path:
    """Write ``RUN_DIR/report.html`` and return its path. ``round_index`` picks the round whose samples are
    tabled (default: the last round with records); ``top`` is the number of rows at each end."""
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    metrics = {(label, run): read_metrics(run) for label, group in runs.items() for run in group}
    shown = _shown_run(runs)
    rounds = shown.record_rounds()
    if round_index is None:
        round_index = rounds[-1] if rounds else None
    elif round_index not in rounds:
        raise UserError(f"--round: {shown.root} has no records for round {round_index} "
                        f"(rounds with records: {_span(rounds)})")
    first = next(iter(runs.values()))[0]
    sections = [
        f"<h1>llm_iif report: {html.escape(str(run_dir))}</h1>",
        _summary(run_dir, runs, metrics),
        "<h2>Curves over rounds</h2>",
        _image(figure_png(_curves(metrics))),
    ]
    if GridPaths(run_dir).reward_curves.is_file():  # a comparison: the seed means with their intervals
        sections += ["<h2>Mean over seeds, ± one standard error</h2>",
                     _image(GridPaths(run_dir).reward_curves.read_bytes())]
    by_label = {label: [h for (each, _), h in metrics.items() if each == label and h] for label in runs}
    for key in sorted({k for h in metrics.values() if h for k in reported_rewards(h)}):
        if any("kl" in m for h in metrics.values() for m in h):  # e.g. a learned reward's hidden rule
            sections += [f"<h2>{html.escape(key)} against KL to the reference</h2>",
                         "<p>The score the run reports but does not train on, against how far the policy has moved "
                         "from the reference: a curve that rises, peaks and falls as KL grows is reward "
                         "over-optimisation; the higher a curve lies, the more of the true objective a method buys "
                         "per nat.</p>",
                         _image(figure_png(score_against_kl_figure(by_label, key)))]
    finals = {label: [final for (each, _), history in metrics.items()
                      if each == label and (final := _final_reward(history)) is not None] for label in runs}
    if len(runs) > 1 and all(len(values) >= 2 for values in finals.values()):
        sections += ["<h2>Performance profile: final reward over seeds</h2>",
                     _image(figure_png(performance_profile_figure(finals)))]
    if rounds:
        records = read_records(shown, round_index)
        if has_influence(records):  # not for runs without IIF
            picked = picked_rounds(rounds, round_index)
            sections += [f"<h2>Influence scores ({html.escape(_relative(shown.root, run_dir))})</h2>",
                         _image(figure_png(influence_figure(influence_by_round(shown, picked))))]
        checked = shown.lds_rounds()
        if checked:
            sections += [f"<h2>Do the scores predict training? LDS checks "
                         f"({html.escape(_relative(shown.root, run_dir))})</h2>",
                         "<p>Each point is a random half of the round's batch: the round's update redone on it "
                         "alone, and the real change of the target against the change its summed scores "
                         "predict. LDS: Spearman correlation of the two (1: the scores rank the subsets as "
                         "training does; 0: no better than chance).</p>",
                         _image(figure_png(lds_figure({k: json.loads(shown.lds(k).read_text()) for k in checked})))]
        sections += [f"<h2>Samples of round {round_index}: top and bottom {top}</h2>",
                     _sample_table(records, top)]
    sections += ["<h2>Recipe</h2>", f"<pre>{html.escape(first.recipe.read_text())}</pre>",
                 "<h2>Environment</h2>", _environment_table(first)]
    path = RunPaths(run_dir).report
    atomic_write_text(path, _page("\n".join(sections)))
    return path


# ---------------------------------------------------------------------------------------------- sections

def _summary(run_dir: Path, runs: dict, metrics: dict) -> str:
    rows = []
    for (label, run), history in metrics.items():
        evaluated = [m for m in history if "reward_mean" in m] or [{}]  # GRPO: every run.eval_every steps
        name = label if len(runs[label]) == 1 and run.root == run_dir else f"{label} / {run.root.name}"
        if not run.final.is_dir():  # stopped by a signal (it has a checkpoint to resume) or killed
            name += " (incomplete: no final/)"
        torn = read_jsonl(run.metrics)[1]
        if torn:
            name += f" ({torn} torn metrics line skipped)"
        rows.append([name, len(history), _number(evaluated[0], "reward_mean", "+.3f"),
                     _number(evaluated[-1], "reward_mean", "+.3f"), _number(evaluated[-1], "kl", ".2f"),
                     f"{sum(m.get('kept_fraction', 1.0) for m in history) / max(len(history), 1):.2f}"])
    table = _table(["run", "rounds", "reward, round 0", "reward, last", "KL, last", "mean kept"], rows)
    summary_file = GridPaths(run_dir).summary
    if not summary_file.is_file():
        return table
    summary = read_summary(summary_file)
    versus = {method: entry["vs_baseline"] for method, entry in summary["methods"].items() if "vs_baseline" in entry}
    fractions = [key for key in BUDGET_FRACTIONS if all(key in vs for vs in versus.values())]  # older summaries
    compared = [[method, *(f"{vs[key][0]:+.1f} ± {vs[key][1]:.1f}" for key in ("SE_ave", "SE_peak", "RT_peak")),
                 *(f"{vs[key][0]:.2f} ± {vs[key][1]:.2f}" for key in fractions)] for method, vs in versus.items()]
    header, rows = interval_table(summary)
    intervals = ("<p>Against standard, seed by seed: the interquartile mean (IQM) over seeds with its 95% "
                 "stratified bootstrap interval (rliable). Ratios: 1 is standard; differences: 0 is standard; "
                 "P(final &gt; std): 0.5 is standard. ≈ marks an interval that covers that value: no measurable "
                 "difference.</p>" + _table(header, rows)) if rows else ""
    if not compared:
        return table + intervals
    return table + intervals + ("<p>Against standard PPO (mean ± s.e. over seeds): % fewer rounds or seconds, then the "
                    "fraction of standard's rounds and seconds needed to reach its final reward and its peak, "
                    "and the round time against standard's:</p>") + _table(
        ["method", "SE_ave %", "SE_peak %", "RT_peak %", *(BUDGET_FRACTIONS[key] for key in fractions)], compared)



def read_summary(path: Path) -> dict:
    """A comparison's summary.json; `UserError` naming it when it is not one (not JSON, or no mapping of methods
    to their statistics), e.g. edited by hand."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a comparison's summary ({first_line(err)}); delete it to report the runs "
                        "alone") from None
    methods = summary.get("methods") if isinstance(summary, dict) else None
    if not isinstance(methods, dict) or not all(isinstance(entry, dict) for entry in methods.values()):
        raise UserError(f"{path}: not a comparison's summary (expected {{\"methods\": {{METHOD: statistics}}}}); "
                        "delete it to report the runs alone")
    return summary


def _final_reward(history: list[dict], smooth: int = 5) -> float | None:
    """The mean of the last ``smooth`` evaluated rewards (summary.json's final reward); None before the first
    evaluation (a GRPO run stopped before its first ``run.eval_every`` steps)."""
    rewards = [m["reward_mean"] for m in history if "reward_mean" in m][-smooth:]
    return sum(rewards) / len(rewards) if rewards else None


def _number(metrics: dict, key: str, spec: str) -> str:
    return format(metrics[key], spec) if key in metrics else "–"


def _curves(metrics: dict):
    """One panel per logged curve (`CURVES`, every ``eval/`` metric and every reported ``reward/`` score), one
    line per run, a colour per label."""
    histories = list(metrics.values())
    keys = [(k, title) for k, title in CURVES if any(k in m for h in histories for m in h)]
    keys += [(k, k) for k in sorted({k for h in histories for m in h for k in m if k.startswith(("eval/", "reward/"))})]
    panels = [Panel([], title=title, legend=i == 0) for i, (_, title) in enumerate(keys)]
    colours = {}
    for (label, _), history in metrics.items():
        first_of_label = label not in colours  # one legend entry per label, however many seeds
        colour = colours.setdefault(label, f"C{len(colours)}")
        for panel, (key, _) in zip(panels, keys):
            points = [(m["round"], m[key]) for m in history if key in m]
            if points:
                rounds, values = zip(*points)
                panel.curves.append(Curve(rounds, values, label=label if first_of_label else None, colour=colour,
                                          alpha=0.8))
    return curves_figure(panels)


def _sample_table(records: list[dict], top: int) -> str:
    scored = has_influence(records)
    key = "influence" if scored else "reward"
    ranked = sorted((r for r in records if math.isfinite(r[key])), key=lambda r: r[key], reverse=True)
    chosen = ranked[:top] + ranked[max(top, len(ranked) - top):]
    rows = [[r["prompt"], r["response"], f"{r['reward']:+.3f}", f"{r['advantage']:+.3f}",
             f"{r['influence']:+.3g}" if math.isfinite(r["influence"]) else "–", "yes" if r["kept"] else "no"]
            for r in chosen]
    note = f"<p>Sorted by {'influence' if scored else 'reward (this run was not scored)'}, highest first.</p>"
    return note + _table(["prompt", "response", "reward", "advantage", "influence", "kept"], rows)


def _environment_table(run: RunPaths) -> str:
    path = run.environment
    if not path.is_file():
        return f"<p>Not recorded (a run from before {path.name} existed).</p>"
    return _table(["", ""], [[name, value] for name, value in json.loads(path.read_text()).items()])


# ---------------------------------------------------------------------------------------------- helpers

def _shown_run(runs: dict) -> RunPaths:
    """The run whose records the histograms and tables show: the first IIF run when there is one."""
    return runs.get("iif", next(iter(runs.values())))[0]


def _span(rounds: list[int]) -> str:
    return f"{rounds[0]}-{rounds[-1]}" if rounds else "none"


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else path.name


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
