"""A suite's scorecard: per task, every method against standard, and IIF (alone or after DAPO) against the
baselines it must beat (`PAIRS`), with interval estimates over seeds, one-line verdicts, and whether standard's
curve climbs long enough for the ratios to mean something. Written as scorecard.md, scorecard.json and
scorecard.png.

The verdict reads the area under the reward curve (`llm_iif.analysis.statistics`, "AUC ×"): the IQM over seeds
of a method's area above the baseline's first round, as a ratio of the baseline's, with its 95% stratified
bootstrap interval. It counts both how fast a curve rises and how high it ends, so one statistic decides and
the others are shown beside it.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from llm_iif.analysis.plots import interval_figure, save_figure
from llm_iif.analysis.statistics import REPORTED_ENDS, estimate_text, interval_table, reported_label, verdict
from llm_iif.analysis.summary import evaluated_rounds, rounds_to_reach, summarize, trailing_mean
from llm_iif.core.errors import UserError
from llm_iif.core.fileio import atomic_write_text
from llm_iif.core.machine import package_versions
from llm_iif.runs.paths import SuitePaths

if TYPE_CHECKING:
    from llm_iif.analysis.suite import Suite, SuiteTask

VERSIONS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "stable-baselines3", "gymnasium",
            "rliable")
# Standard's curve should reach 90% of its gain no earlier than this far into the run; sooner, the ratios to its
# final reward measure noise on a plateau.
CLIMB_LEVEL, CLIMB_MIN = 0.9, 0.4
VERDICT_STATISTIC = "auc_ratio"
# (method, baseline) pairs compared when a task ran both: IIF alone, and IIF after DAPO with refill, against the
# size-matched random filter and DAPO with refill.
PAIRS = (("iif", "random"), ("iif", "dapo-refill"), ("dapo-refill-iif", "dapo-refill"), ("dapo-refill-iif", "random"))
IIF_METHODS = ("iif", "dapo-refill-iif")


def write_scorecard(paths: SuitePaths, suite: Suite, finished: dict, command: str) -> dict:
    """Write scorecard.json, scorecard.md and scorecard.png for the tasks of ``suite`` whose runs have all
    finished (``finished``: {(task, method, seed): finished.jsonl row}); returns the scorecard."""
    card = {"suite": str(suite.path), "command": command, **provenance(finished), "tasks": {}}
    for task in suite.tasks:
        rows = [finished.get((task.name, method, seed)) for method, seed in task.runs()]
        if None in rows:
            card["tasks"][task.name] = {"finished_runs": len(rows) - rows.count(None), "runs": len(rows)}
            continue
        check_same_cpu(task, finished)
        summary = json.loads(paths.task(task.name).summary.read_text())  # the task's comparison, against standard
        card["tasks"][task.name] = task_scorecard(task, task_histories(task, paths), summary,
                                                  sum(row["seconds"] for row in rows))
    atomic_write_text(paths.scorecard_json, json.dumps(card, indent=2))
    atomic_write_text(paths.scorecard_markdown, scorecard_markdown(card))
    figure = scorecard_figure(card)
    if figure is not None:
        save_figure(figure, paths.scorecard_figure)
    return card


def task_histories(task: SuiteTask, paths: SuitePaths) -> dict[str, dict[int, list[dict]]]:
    """{method: {seed: per-round metrics}} of a task's runs, read back from their metrics files."""
    grid = paths.task(task.name)
    return {method: {seed: grid.run(method, seed).logged_history() for seed in task.seeds}
            for method in task.methods}


def check_same_cpu(task: SuiteTask, finished: dict) -> None:
    """`UserError` when a method's run of some seed was made on another CPU model than standard's run of that
    seed: runs on different models take different trajectories, so pairing them would measure the machines."""
    for method, seed in task.runs():
        ran_on = finished[(task.name, method, seed)]["cpu_model"]
        baseline = finished[(task.name, "standard", seed)]["cpu_model"]
        if ran_on != baseline:
            raise UserError(f"scorecard: {task.name} {method} seed {seed} ran on '{ran_on}' and standard seed {seed} "
                            f"on '{baseline}'; runs on different CPU models take different trajectories and are "
                            "not paired (delete one's line from finished.jsonl to run it again)")


def task_scorecard(task: SuiteTask, histories: dict[str, dict[int, list[dict]]], summary: dict,
                   seconds: float) -> dict:
    """One task's scorecard entry: each method's final reward and KL spikes, its interval estimates against
    standard (from ``summary``, `summarize` of ``histories``) and those of every pair of `PAIRS` that ran; the
    verdicts ("iif vs standard", "iif vs random", ...); standard's climb."""
    entry = {"recipe": str(task.recipe), "set": task.overrides, "seeds": task.seeds, "seconds": seconds,
             "standard_climb": standard_climb(histories["standard"], summary["smooth"]),
             "methods": {method: {key: value for key, value in stats.items()
                                  if key in ("final_reward", "final_kl", "kl_spikes", "intervals")
                                  or key.startswith(REPORTED_ENDS)}  # e.g. a learned reward's hidden rule
                         for method, stats in summary["methods"].items()}}
    entry["pairs"] = {f"{method} vs {baseline}": summarize({baseline: histories[baseline], method: histories[method]},
                                                           baseline=baseline)["methods"][method]["intervals"]
                      for method, baseline in PAIRS if method in histories and baseline in histories}
    entry["verdicts"] = {f"{method} vs standard": verdict_text(summary["methods"][method]["intervals"])
                         for method in IIF_METHODS if method in histories}
    entry["verdicts"].update({pair: verdict_text(intervals) for pair, intervals in entry["pairs"].items()})
    return entry


def standard_climb(runs: dict[int, list[dict]], smooth: int) -> float | None:
    """How far into the run (0-1) the seed-mean of standard's smoothed reward curves (over its evaluated rounds)
    first reaches `CLIMB_LEVEL` of its gain from first to last point; None when it ends no higher than it
    starts."""
    curves = [trailing_mean([m["reward_mean"] for m in evaluated_rounds(history)], smooth)
              for history in runs.values()]
    curve = [sum(values) / len(values) for values in zip(*curves)]
    gain = curve[-1] - curve[0]
    if gain <= 0:
        return None
    return rounds_to_reach(curve, curve[0] + CLIMB_LEVEL * gain) / len(curve)


def verdict_text(intervals: dict) -> str:
    """"better", "worse" or "no measurable difference", by the area under the curve, with its estimate."""
    if VERDICT_STATISTIC not in intervals:
        return "no verdict: the baseline's curve did not rise above its first round"
    iqm = intervals[VERDICT_STATISTIC]["iqm"]
    return f"{verdict(iqm, 1.0)} (AUC × {estimate_text(iqm)})"


def provenance(finished: dict) -> dict:
    """The date, commit, CPU models and package versions a scorecard is stated with."""
    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {"date": datetime.now(timezone.utc).date().isoformat(), "commit": commit,
            "cpu_models": sorted({row["cpu_model"] for row in finished.values()}),
            "versions": package_versions(VERSIONS)}


def scorecard_markdown(card: dict) -> str:
    """scorecard.md: the header, a verdict table over tasks, then one interval table per task. Names, paths and
    versions are escaped (`_text`, `_code`): a task or method named like HTML stays text."""
    finished = {name: task for name, task in card["tasks"].items() if "methods" in task}
    lines = [f"# Scorecard: {_code(card['suite'])}", "",
             f"- **date** {_text(card['date'])} · **commit** {_text(card['commit'])} · **hardware** "
             f"{_text(', '.join(card['cpu_models']) or 'no run yet')}",
             "- **versions** " + _text(", ".join(f"{p} {v}" for p, v in card["versions"].items())),
             f"- **reproduce** {_code(card['command'])}",
             f"- **running time** {sum(t['seconds'] for t in finished.values()) / 60:.1f} min of runs: "
             + ", ".join(f"{_text(name)} {task['seconds'] / 60:.1f} min" for name, task in finished.items()), "",
             "Each method is paired with standard's run of the same seed. Cells are IQMs over seeds with 95% "
             "stratified bootstrap intervals (rliable); ratios are 1 and differences 0 for standard, and ≈ marks an "
             "interval that covers that value (no measurable difference). The verdict reads the area under the "
             "reward curve (AUC ×).", "",
             "| task | seeds | IIF against standard | IIF against size-matched random | standard reaches 90% of its "
             "gain at |", "|---|---|---|---|---|"]
    for name, task in card["tasks"].items():
        if name not in finished:
            lines.append(f"| {_text(name)} | – | {task['finished_runs']} of {task['runs']} runs finished | | |")
            continue
        verdicts = task.get("verdicts", {})
        climb = task["standard_climb"]
        climb_text = ("never (no gain)" if climb is None else f"{climb:.0%} of the run"
                      + (" (a plateau: below 40%)" if climb < CLIMB_MIN else ""))
        lines.append(f"| {_text(name)} | {len(task['seeds'])} | {verdicts.get('iif vs standard', '–')} | "
                     f"{verdicts.get('iif vs random', '–')} | {climb_text} |")
    others = [f"- {_text(name)}, {_text(pair)}: {text}" for name, task in finished.items()
              for pair, text in task.get("verdicts", {}).items() if pair not in ("iif vs standard", "iif vs random")]
    if others:
        lines += ["", "Further verdicts:", "", *others]
    for name, task in finished.items():
        lines += ["", f"## {_text(name)}", "", _code(os.path.normpath(task["recipe"]))
                  + (f" with {_text(', '.join(task['set']))}" if task["set"] else "") + f", seeds {task['seeds']}",
                  ""]
        header, rows = interval_table({"methods": task["methods"]})
        reported = sorted({key for stats in task["methods"].values() for key in stats if key.startswith(REPORTED_ENDS)})
        extra = ["final reward (mean ± SE)",
                 *(_text(f"{reported_label(key)} (not trained on)") for key in reported), "KL spikes"]
        lines += ["| " + " | ".join([header[0], *extra, *header[1:]]) + " |",
                  "|" + "---|" * (len(header) + len(extra))]
        for method, stats in task["methods"].items():
            row = next((r for r in rows if r[0] == method), [method] + ["–"] * (len(header) - 1))
            spikes = stats.get("kl_spikes")
            lines.append("| " + " | ".join([_text(method), "{:+.3f} ± {:.3f}".format(*stats["final_reward"]),
                                            *("{:+.3f} ± {:.3f}".format(*stats[key]) if key in stats else "–"
                                              for key in reported),
                                            f"{spikes[0]:.1f}" if spikes else "–", *row[1:]]) + " |")
        if task.get("pairs"):
            header, rows = interval_table({"methods": {pair: {"intervals": intervals}
                                                       for pair, intervals in task["pairs"].items()}})
            lines += ["", "IIF against the other baselines (1 or 0 = the baseline after \"vs\"; P: the method's final "
                      "above the baseline's):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join([_text(row[0]), *row[1:]]) + " |" for row in rows)]
    return "\n".join(lines) + "\n"


def _text(text: str) -> str:
    """``text`` as literal Markdown text on one line, also in a table cell: HTML escaped, and the characters
    that would start a link, emphasis, code or a new cell backslash-escaped."""
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return re.sub(r"([\\`*\[\]|])", r"\\\1", text)


def _code(text: str) -> str:
    """``text`` as a Markdown code span on one line (HTML in it is shown, never rendered), fenced with more
    backticks than any run of them in ``text``."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (1 + max(map(len, re.findall("`+", text)), default=0))
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def scorecard_figure(card: dict):
    """Per finished task, the AUC ratio and rounds to the baseline's final of each method against standard, and
    of each pair of `PAIRS`, as intervals; None before any task has finished."""
    panels = {"area under the curve (× baseline's)": "auc_ratio",
              "rounds to the baseline's final reward (× its run)": "rounds_to_baseline_final"}
    rows: dict[str, list[tuple[str, list[float]]]] = {title: [] for title in panels}
    for name, task in card["tasks"].items():
        if "methods" not in task:
            continue
        compared = {f"{method} vs standard": stats["intervals"] for method, stats in task["methods"].items()
                    if "intervals" in stats}
        compared.update(task.get("pairs", {}))
        for label, intervals in compared.items():
            for title, key in panels.items():
                if key in intervals:
                    rows[title].append((f"{name}: {label}", intervals[key]["iqm"]))
    if not any(rows.values()):
        return None
    return interval_figure([(title, values, 1.0) for title, values in rows.items()])
