"""The methods × seeds grid, the comparison outputs and the figures of a run, on made-up runs (no training)."""

from __future__ import annotations

import json
import math

import pytest

from llm_iif.analysis.grid import CLASSIC_METHODS, LM_METHODS, run_grid, write_comparison
from llm_iif.analysis.plots import run_title, write_run_figures
from llm_iif.analysis.report import read_metrics, read_records, write_report
from llm_iif.core.errors import UserError
from llm_iif.core.fileio import write_parquet
from llm_iif.runs.paths import GridPaths, RunPaths


def history(rounds: int, seed: int = 0, lm: bool = True) -> list[dict]:
    """Per-round metrics shaped like a run's: an LM run's (with KL) or a classic run's."""
    rows = []
    for k in range(rounds):
        row = {"round": k, "reward_mean": 0.1 * k + 0.01 * seed, "kept_fraction": 0.5 + 0.1 * (k % 2),
               "time_round_s": 1.0}
        if lm:
            row.update(reward_std=0.2, kl=0.05 * k, entropy=2.0, influence_mean=0.01 * k,
                       influence_neg_fraction=0.5)
        rows.append(row)
    return rows


def lm_run(run: RunPaths, rounds: int = 3, influence_column: str = "influence", scored: bool = True,
           old_metric_names: bool = False) -> list[dict]:
    """Write the files `write_report` reads of an LM run into ``run``: metrics, records, recipe, environment.
    ``influence_column`` "score" and ``old_metric_names`` make a run from before the influence rename."""
    run.root.mkdir(parents=True, exist_ok=True)
    rows = history(rounds)
    renamed = {"influence_mean": "score_mean", "influence_neg_fraction": "score_neg_fraction"}
    run.metrics.write_text("".join(json.dumps({renamed.get(key, key) if old_metric_names else key: value
                                               for key, value in row.items()}) + "\n" for row in rows))
    for k in range(rounds):
        write_parquet(run.record(k), [
            {"prompt": f"prompt {i}", "response": f"response {i}", "reward": 0.1 * i, "advantage": 0.2 - 0.05 * i,
             influence_column: (i - 2.5) * 10.0 ** -k if scored else math.nan, "kept": i >= 2}
            for i in range(6)])
    run.recipe.write_text("model:\n  name_or_path: builtin:tiny-sentiment\n")
    run.environment.write_text(json.dumps({"python": "3.x"}))
    return rows


# ------------------------------------------------------------------------------------------------- the grid

def test_grid_rejects_an_unknown_method_before_training():
    calls = []
    with pytest.raises(UserError) as err:
        run_grid(LM_METHODS, ["standard", "bogus"], [0], "unused", lambda *call: calls.append(call))
    message = str(err.value)
    assert "\n" not in message and "--methods" in message and "'bogus'" in message
    assert all(name in message for name in LM_METHODS) and calls == []


def test_grid_runs_every_pair_seed_major_into_its_run_directory(tmp_path, capsys):
    calls = []

    def train_one(method, seed, run, ready):
        ready()
        calls.append((method, seed, run))
        return history(2, seed, lm=False)

    histories = run_grid(CLASSIC_METHODS, ["iif", "standard"], [3, 1], tmp_path, train_one)
    grid = GridPaths(tmp_path)
    assert calls == [("iif", 3, grid.run("iif", 3)), ("standard", 3, grid.run("standard", 3)),
                     ("iif", 1, grid.run("iif", 1)), ("standard", 1, grid.run("standard", 1))]
    assert list(histories) == ["iif", "standard"] and list(histories["iif"]) == [3, 1]
    assert histories["standard"][1] == history(2, 1, lm=False)
    assert f"== iif, seed 3 -> {grid.run('iif', 3).root}" in capsys.readouterr().out
    run_grid(CLASSIC_METHODS, ["iif"], [0], tmp_path / "quiet", train_one, main_process=False)
    assert capsys.readouterr().out == ""


def test_a_second_comparison_in_a_used_directory_is_refused_and_overwrite_replaces_it(tmp_path):
    def train_one(method, seed, run, ready):
        ready()
        run.root.mkdir(parents=True)
        run.metrics.write_text("{}\n")
        return history(1, seed, lm=False)

    run_grid(CLASSIC_METHODS, ["iif", "standard"], [0, 1], tmp_path, train_one)
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a comparison \(comparison.json, summary.json, "
                                        r"iif/seed-0/metrics.jsonl, iif/seed-1/metrics.jsonl, "
                                        r"standard/seed-0/metrics.jsonl, standard/seed-1/metrics.jsonl\); .* "
                                        r"--overwrite, which deletes exactly those"):
        run_grid(CLASSIC_METHODS, ["iif"], [5], tmp_path, train_one)
    run_grid(CLASSIC_METHODS, ["iif"], [5], tmp_path, train_one, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == \
        ["comparison.json", "iif", "iif/seed-5", "iif/seed-5/metrics.jsonl", "notes.txt"]


def test_overwrite_deletes_only_what_the_recorded_comparison_wrote(tmp_path):
    """Issue 24: folders that look like runs but are not this comparison's, and a user's files inside its run
    folders, survive --overwrite."""
    def train_one(method, seed, run, ready):
        ready()
        run.root.mkdir(parents=True, exist_ok=True)
        run.metrics.write_text("{}\n")
        run.recipe.write_text("run: {}\n")
        return history(1, seed, lm=False)

    run_grid(CLASSIC_METHODS, ["standard"], [0], tmp_path, train_one)
    (tmp_path / "mydata" / "seed-7").mkdir(parents=True)
    (tmp_path / "mydata" / "seed-7" / "important.txt").write_text("keep")
    (tmp_path / "standard" / "seed-0" / "notes.txt").write_text("keep too")
    run_grid(CLASSIC_METHODS, ["iif"], [1], tmp_path, train_one, overwrite=True)
    assert (tmp_path / "mydata" / "seed-7" / "important.txt").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "standard" / "seed-0").iterdir()) == ["notes.txt"]
    assert json.loads((tmp_path / "comparison.json").read_text()) == {"methods": ["iif"], "seeds": [1]}


def test_the_method_tables():
    assert list(CLASSIC_METHODS) == ["standard", "iif", "random"]
    assert list(LM_METHODS) == ["standard", "iif", "random", "iif-fresh", "iif-cached", "iif-batch", "iif-adam"]
    assert LM_METHODS["iif-adam"] == ["iif.enabled=true", "iif.precondition=adam"]
    assert LM_METHODS["random"] == ["iif.enabled=true", "iif.mode=matched-random"]
    assert LM_METHODS["iif-batch"] == ["iif.enabled=true", "iif.target_source=batch"]

    class IIF:
        mode, p = "neg-bottom", 0.6

    assert [CLASSIC_METHODS[m](IIF) for m in CLASSIC_METHODS] == [("none", 0.0), ("neg-bottom", 0.6),
                                                                  ("matched-random", 0.6)]


# ------------------------------------------------------------------------------------ comparison outputs

def test_classic_comparison_writes_the_summary_and_curves_only(tmp_path):
    histories = {m: {s: history(4, s, lm=False) for s in (0, 1)} for m in ("standard", "iif")}
    summary = write_comparison(tmp_path, histories, ylabel="test return", report=False)
    grid = GridPaths(tmp_path)
    written = json.loads(grid.summary.read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["methods"]["iif"]["vs_baseline"]["SE_ave"] == [0.0, 0.0]  # the same curves as standard
    assert grid.reward_curves.stat().st_size > 0
    assert not grid.influence.exists() and not grid.report.exists()  # classic runs keep no records


def test_lm_comparison_writes_influence_figure_and_report(tmp_path):
    grid = GridPaths(tmp_path)
    histories = {m: {s: lm_run(grid.run(m, s)) for s in (0, 1)} for m in ("standard", "iif")}
    write_comparison(tmp_path, histories)
    assert grid.influence.stat().st_size > 0 and grid.reward_curves.stat().st_size > 0
    page = grid.report.read_text()
    # the per-run curves, the seed means (reward_curves.png), the performance profile, the influence histograms
    assert "Influence scores (iif/seed-0)" in page and "SE_ave %" in page and page.count("<img") == 4
    assert "Mean over seeds, ± one standard error" in page and "Performance profile" in page
    assert "95% stratified bootstrap interval" in page and "P(final &gt; std)" in page
    assert "iif / seed-1" in page and "standard / seed-0" in page


def test_run_figures(tmp_path):
    class Recipe:
        class model:
            name_or_path = "builtin:tiny-sentiment"

        class reward:
            name = "vader"

    assert run_title(Recipe) == "builtin:tiny-sentiment · vader"
    write_run_figures(tmp_path, history(3), run_title(Recipe))
    assert RunPaths(tmp_path).reward_curve.stat().st_size > 0


# ------------------------------------------------------------------------------------------------ report

def test_report_reads_a_run_from_before_the_influence_rename(tmp_path):
    run = RunPaths(tmp_path)
    lm_run(run, influence_column="score", old_metric_names=True)
    assert read_metrics(run)[1]["influence_mean"] == pytest.approx(0.01)
    assert "score_mean" not in read_metrics(run)[1]
    records = read_records(run, 2)
    assert [r["influence"] for r in records] == pytest.approx([(i - 2.5) * 0.01 for i in range(6)])
    assert all("score" not in r for r in records)
    page = write_report(tmp_path).read_text()
    assert "Influence scores" in page and page.count("<img") == 2
    table = page[page.index("Samples of round 2"):page.index("<h2>Recipe")]
    assert "Sorted by influence, highest first" in table and "<th>influence</th>" in table
    assert table.index("response 5") < table.index("response 0")  # highest influence first
    assert "+0.025" in table


def test_report_of_an_unscored_run_sorts_by_reward(tmp_path):
    lm_run(RunPaths(tmp_path), scored=False)
    page = write_report(tmp_path, round_index=0, top=2).read_text()
    assert "Influence scores" not in page and page.count("<img") == 1
    assert "Sorted by reward (this run was not scored)" in page


def test_a_curve_evaluated_every_few_steps_counts_the_seconds_between_its_points():
    from llm_iif.analysis.summary import evaluated_rounds, summarize

    steps = [{"round": k, "time_round_s": 1.0, "kept_fraction": 0.5 if k % 2 else 1.0,
              **({"reward_mean": 0.1 * k, "kl": 0.0} if k % 3 == 2 else {})} for k in range(6)]
    points = evaluated_rounds(steps)
    assert [p["round"] for p in points] == [2, 5] and [p["time_round_s"] for p in points] == [3.0, 3.0]
    assert [p["kept_fraction"] for p in points] == pytest.approx([2.5 / 3, 2.0 / 3])
    assert evaluated_rounds(history(4)) == history(4)  # a reward every round: unchanged
    run = summarize({"standard": {0: steps}})["methods"]["standard"]["seeds"]["0"]
    assert run["reward"] == pytest.approx([0.2, 0.5]) and run["wall_time_s"] == 6.0


def test_a_reported_score_is_drawn_against_kl_when_the_runs_log_one(tmp_path):
    from llm_iif.analysis.plots import score_against_kl_figure

    for method, slope in (("standard", -1.0), ("iif", 1.0)):
        for seed in (0, 1):
            run = RunPaths(tmp_path / method / f"seed-{seed}")
            rows = lm_run(run)
            for row in rows:
                row["reward/hidden_rule"] = slope * row["kl"] + seed
            run.metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    page = write_report(tmp_path).read_text()
    assert "reward/hidden_rule against KL to the reference" in page
    runs = {method: [read_metrics(RunPaths(tmp_path / method / f"seed-{s}")) for s in (0, 1)]
            for method in ("standard", "iif")}
    (ax,) = score_against_kl_figure(runs, "reward/hidden_rule", smooth=1).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["iif"].get_xdata()) == pytest.approx([0.0, 0.05, 0.1])  # KL of rounds 0-2
    assert list(lines["iif"].get_ydata()) == pytest.approx([0.5, 0.55, 0.6])  # the mean over seeds 0 and 1
