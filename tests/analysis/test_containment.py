"""Issue 36: nothing outside the output directory is written or deleted, every command checks its input before it
deletes or writes anything, and bad input is one line with exit code 2.

The probe's decoys are runs (recipe.yaml, metrics.jsonl, final/, records/) planted outside the output directory
and reached through recorded names (``../decoyA``), absolute paths, a symlinked method folder, a symlinked
``seed-0``, a symlinked task folder and recorded suite tasks. Every command runs with ``--overwrite`` on tiny
settings (a classic run takes about a second, a PPO or GRPO run a few) and must leave every decoy as it was.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import yaml

import llm_iif.analysis.suite as suite_module
from conftest import cli_in_process, tiny_recipe_dict
from test_grid import lm_run
from test_suite import FAST_CLASSIC, FROZENLAKE, REPO, write_suite

from llm_iif.analysis.grid import RunStopped
from llm_iif.analysis.plots import plot_reward_curves, save_figure
from llm_iif.analysis.report import write_report
from llm_iif.analysis.scorecard import scorecard_figure, scorecard_markdown
from llm_iif.analysis.summary import summarize
from llm_iif.core.errors import UserError
from llm_iif.core.fileio import read_jsonl
from llm_iif.runs.paths import GridPaths, RunPaths, SuitePaths, check_inside, check_name
from llm_iif.runs.outputs import delete_outputs

GRPO_RECIPE = REPO / "recipes" / "tiny-addition-grpo.yaml"
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "final/adapter_model.safetensors", "records/round_0000.parquet")
CLASSIC_SET = [f"{key}={value}" for key, value in {**FAST_CLASSIC, "run.rounds": 1}.items()]
FAST_TASK = {"recipe": str(FROZENLAKE), "methods": ["standard"], "set": FAST_CLASSIC}  # a second per run


def plant_run(root: Path) -> Path:
    """A run's files, as a decoy or as an earlier run."""
    for name in RUN_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{root.name}: {name}")
    return root


def plant_comparison(root: Path, methods: list[str], seeds: list[int] = (0,)) -> Path:
    """A comparison's files: comparison.json, summary.json and one run per method and seed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.json").write_text(json.dumps({"methods": methods, "seeds": list(seeds)}))
    (root / "summary.json").write_text("{}")
    for method in methods:
        for seed in seeds:
            plant_run(root / method / f"seed-{seed}")
    return root


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with its content, every symbolic link with its target, and every folder."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                files[str(path)] = f"-> {os.readlink(path)}"
            else:
                files[str(path)] = path.read_text() if path.is_file() else "folder"
    return files


def one_line(code: int, err: str, expected: str) -> None:
    assert code == 2 and expected in err and err.count("\n") == 1 and err.startswith("llm-iif: error: "), err


def tiny_recipe(tmp_path: Path, **run) -> Path:
    """conftest's tiny PPO recipe, one round, as a file."""
    raw = tiny_recipe_dict(tmp_path / "unused")
    raw["run"].update(rounds=1, report_to=[], **run)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def compare_command(kind: str, tmp_path: Path, out: Path, model_dir=None, methods: str = "standard",
                    seeds: str = "0", sets: tuple[str, ...] = ()) -> list:
    """A `compare` (``kind``: classic, ppo or grpo, on ``model_dir``) of one run by default, into ``out`` with
    --overwrite; ``sets`` come last."""
    common = ["--methods", methods, "--seeds", seeds, "--output-dir", out, "--overwrite"]
    if kind == "classic":
        command = ["classic", "compare", FROZENLAKE, *common, *[a for s in CLASSIC_SET for a in ("--set", s)]]
    elif kind == "ppo":
        command = ["compare", tiny_recipe(tmp_path), *common]
    else:  # one step of 16 completions of tests/grpo's random tiny model
        grpo = [f"model.name_or_path={model_dir}", "grpo.per_device_train_batch_size=16", "grpo.num_generations=4",
                "data.eval_size=16", "data.validation_size=16", "run.report_to=[]", "run.steps=1", "run.eval_every=1"]
        command = ["compare", GRPO_RECIPE, *common, *[a for s in grpo for a in ("--set", s)]]
    return [*command, *[a for s in sets for a in ("--set", s)]]


# ---------------------------------------------------------------------------------------------- the names

@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "..", ".", "", ".hidden", "a\\b", "a\nb", "$\\bad$",
                                  "<img src=x>", "x" * 101, 7, None, ["x"]])
def test_a_name_is_one_folder_and_nothing_else(name):
    with pytest.raises(UserError) as err:
        check_name(name, "tasks")
    assert str(err.value).startswith(f"tasks: {name!r} is not a name") and "\n" not in str(err.value)
    for good in ("standard", "iif-fresh", "kl-0.5", "dapo-refill-iif", "tiny_sentiment", "x" * 100):
        assert check_name(good, "tasks") == good


def test_nothing_is_written_or_deleted_through_a_link_or_out_of_the_tree(tmp_path):
    root, outside = tmp_path / "out", plant_run(tmp_path / "outside")
    (root / "iif").mkdir(parents=True)
    (root / "iif" / "seed-0").symlink_to(outside)
    (root / "standard").symlink_to(tmp_path)
    before = snapshot(outside)
    with pytest.raises(UserError, match=r"--output-dir: .*iif/seed-0 is a symbolic link \(to .*outside\)"):
        check_inside(root / "iif" / "seed-0" / "final", root, "--output-dir")
    with pytest.raises(UserError, match="lies outside"):
        check_inside(root / ".." / "outside", root, "--output-dir")
    for through_link in (root / "iif" / "seed-0" / "final", root / "standard" / "outside" / "recipe.yaml"):
        with pytest.raises(UserError, match="is a symbolic link"):
            delete_outputs([root / "iif", through_link], root)  # refused before anything is deleted
    assert (root / "iif").is_dir()
    with pytest.raises(UserError, match="lies outside"):
        delete_outputs([tmp_path / "outside" / "recipe.yaml"], root)
    grid = GridPaths(root)
    assert grid.run_outputs("iif", 0) == [root / "iif" / "seed-0"]  # the link, never what is behind it
    assert grid.run_outputs("standard", 0) == [root / "standard"]
    delete_outputs(grid.run_outputs("iif", 0) + grid.run_outputs("standard", 0), root)
    assert snapshot(outside) == before and not (root / "standard").exists() and not (root / "iif").exists()


# ------------------------------------------------------------------------------- decoys: compare --overwrite

def plant_decoys(tmp_path: Path, out: Path, record: str) -> list[Path]:
    """Decoy runs outside ``out`` and an earlier comparison in ``out`` that reaches them, recorded as ``record``:
    "names" (comparison.json names ../decoyA and /abs/decoyB), "summary" (the same in summary.json, beside a
    torn comparison.json) or "links" (comparison.json names iif and standard, symlinked method folders, and
    random, whose seed-0 is a symlink). Returns the decoys' folders."""
    decoy_a, decoy_b = plant_run(out.parent / "decoyA" / "seed-0"), plant_run(tmp_path / "decoyB" / "seed-0")
    decoy_c, decoy_d = plant_run(tmp_path / "decoyC" / "seed-0"), plant_run(tmp_path / "decoyD")
    decoy_e = plant_run(tmp_path / "decoyE" / "seed-0")
    out.mkdir(parents=True)
    (out / "standard").symlink_to(decoy_e.parent)  # where the new run goes: nothing is written through it
    (out / "iif").symlink_to(decoy_c.parent)
    (out / "random").mkdir()
    (out / "random" / "seed-0").symlink_to(decoy_d)
    names = ["../decoyA", str(decoy_b.parent), "iif", "random", "standard"]
    if record == "names":
        (out / "comparison.json").write_text(json.dumps({"methods": names, "seeds": [0]}))
    elif record == "summary":
        (out / "comparison.json").write_text('{"methods": ["stand')
        (out / "summary.json").write_text(json.dumps({"methods": {name: {"seeds": {"0": {}}} for name in names}}))
    else:
        (out / "comparison.json").write_text(json.dumps({"methods": ["iif", "random", "standard"], "seeds": [0]}))
    return [decoy_a.parent, decoy_b.parent, decoy_c.parent, decoy_d, decoy_e.parent]


@pytest.mark.parametrize("kind, record", [("classic", "names"), ("classic", "summary"), ("classic", "links"),
                                          ("ppo", "names"), ("ppo", "links"), ("grpo", "links")])
def test_compare_overwrite_leaves_every_decoy_intact(kind, record, tmp_path, capsys, request):
    if kind == "classic":
        pytest.importorskip("stable_baselines3", reason="needs the classic extra")
    model = request.getfixturevalue("random_adder_dir") if kind == "grpo" else None
    if kind == "ppo":
        request.getfixturevalue("tiny_model_dir")  # built once per session
    out = tmp_path / "work" / "compare"
    decoys = plant_decoys(tmp_path, out, record)
    before = snapshot(*decoys)
    code, err = cli_in_process(capsys, *compare_command(kind, tmp_path, out, model))
    assert code == 0, err
    assert snapshot(*decoys) == before
    assert json.loads((out / "comparison.json").read_text()) == {"methods": ["standard"], "seeds": [0]}
    assert RunPaths(out / "standard" / "seed-0").metrics.stat().st_size > 0  # the new run, not the planted one
    if record == "links":  # recorded: the links are removed, never what they point to
        assert not (out / "iif").exists() and not (out / "random").exists()


def test_train_overwrite_removes_symlinked_outputs_not_their_targets(tmp_path, capsys, tiny_model_dir):
    run = plant_run(tmp_path / "run")
    final, records = plant_run(tmp_path / "decoyF"), plant_run(tmp_path / "decoyR")
    for name, target in (("final", final), ("records", records)):
        (run / name).rename(tmp_path / f"old-{name}")
        (run / name).symlink_to(target)
    before = snapshot(final, records)
    code, err = cli_in_process(capsys, "train", tiny_recipe(tmp_path), "--output-dir", run, "--overwrite")
    assert code == 0, err
    assert snapshot(final, records) == before and (run / "final").is_dir() and not (run / "final").is_symlink()


# ---------------------------------------------------------------------------------- decoys: suite --overwrite

def classic_suite(tmp_path: Path, out: Path, **changes) -> Path:
    return write_suite(tmp_path, output_dir=str(out), **{"tasks": {"frozenlake": FAST_TASK}, **changes})


@pytest.mark.parametrize("record", ["names", "links"])
def test_suite_overwrite_leaves_every_decoy_intact(record, tmp_path, capsys):
    """suite.json records tasks ../../victimS and /abs/victimT ("names"), or the suite's own tasks, one of whose
    folders is a link to a victim and the other has a symlinked seed-0 ("links")."""
    pytest.importorskip("stable_baselines3", reason="needs the classic extra")
    out = tmp_path / "work" / "suite"
    victim_s = plant_comparison(tmp_path / "victimS", ["standard"])
    victim_t = plant_comparison(tmp_path / "victimT", ["standard"])
    decoy = plant_run(tmp_path / "decoy")
    out.mkdir(parents=True)
    (out / "finished.jsonl").write_text("")
    if record == "names":
        tasks = {"../../victimS": {}, str(victim_t): {}}
    else:
        tasks = {"frozenlake": {}, "acrobot": {}}
        plant_comparison(out / "frozenlake", ["standard"], [0, 1])
        (out / "frozenlake" / "standard" / "seed-1").rename(tmp_path / "old-seed-1")
        (out / "frozenlake" / "standard" / "seed-1").symlink_to(decoy)
        (out / "acrobot").symlink_to(victim_s)
    (out / "suite.json").write_text(json.dumps({"suite": "another.yaml", "tasks": tasks}))
    before = snapshot(victim_s, victim_t, decoy)
    suite = classic_suite(tmp_path, out)
    code, err = cli_in_process(capsys, "suite", suite, "--overwrite", "--no-progress")
    assert code == 0, err
    assert snapshot(victim_s, victim_t, decoy) == before
    assert (out / "scorecard.md").is_file() and not (out / "acrobot").exists()


@pytest.mark.parametrize("changes, expected", [
    ({"tasks": {"../../victimU": FAST_TASK}}, "tasks: '../../victimU' is not a name"),
    ({"custom_methods": {"../../x": {"iif.enabled": False}}}, "custom_methods: '../../x' is not a name"),
    ({"methods": ["standard", "../../x"]}, "methods: '../../x' is not a name"),
])
def test_a_suite_name_that_leaves_the_directory_is_refused(tmp_path, capsys, changes, expected):
    victim = plant_comparison(tmp_path / "victimU", ["standard"])
    before = snapshot(victim)
    out = tmp_path / "work" / "suite"
    code, err = cli_in_process(capsys, "suite", classic_suite(tmp_path, out, **changes), "--overwrite")
    one_line(code, err, expected)
    assert snapshot(victim) == before and not out.exists()


# ------------------------------------------------------------------------------------ validate, then delete

@pytest.mark.parametrize("kind, methods, seeds, sets, expected", [
    ("ppo", "standard", "-1", [], "--seeds: seed -1 is out of range"),
    ("ppo", "standard", "0,0", [], "--seeds: seed 0 is given twice"),
    ("ppo", "standard,standard", "0", [], "--methods: standard is given twice"),
    ("ppo", "standard,iif-batch", "0", ["iif.target=preference", "trusted.source=builtin:trusted-preferences"],
     "--methods (iif-batch): "),
    ("ppo", "standard", "0", ["model.name_or_path=MISSING"], "model.name_or_path"),
    ("classic", "standard", "0", ["env.id=NoSuchEnv-v0"], "env.id: cannot make 'NoSuchEnv-v0'"),
    ("grpo", "standard", "0", [], "model.name_or_path"),
])
def test_a_compare_that_fails_to_start_leaves_the_directory_as_it_was(kind, methods, seeds, sets, expected,
                                                                      tmp_path, capsys):
    """The earlier comparison is deleted only once every method's recipe has loaded and the first run has
    loaded its model and data."""
    if kind == "classic":
        pytest.importorskip("stable_baselines3", reason="needs the classic extra")
    out = plant_comparison(tmp_path / "compare", ["standard", "iif"])
    before = snapshot(out)
    missing = tmp_path / "no-model"
    sets = [item.replace("MISSING", str(missing)) for item in sets]
    code, err = cli_in_process(capsys, *compare_command(kind, tmp_path, out, missing, methods, seeds, sets))
    # a library may log a warning first; the error is the last line, and the only one
    assert code == 2 and expected in err and err.splitlines()[-1].startswith("llm-iif: error: "), err
    assert err.count("llm-iif: error") == 1 and "Traceback" not in err
    assert snapshot(out) == before


def test_a_suite_that_fails_to_start_leaves_the_directory_as_it_was(tmp_path, capsys):
    """Another suite's outputs are deleted, with --overwrite, only once the first run has loaded."""
    out = tmp_path / "suite"
    plant_comparison(out / "other", ["standard"])
    (out / "suite.json").write_text(json.dumps({"suite": "other.yaml", "tasks": {"other": {}}}))
    (out / "scorecard.md").write_text("# the other suite's scorecard\n")
    before = snapshot(out)
    tasks = {"t": {"recipe": str(tiny_recipe(tmp_path)), "methods": ["standard"],
                   "set": {"model.name_or_path": str(tmp_path / "no-model")}}}
    code, err = cli_in_process(capsys, "suite", write_suite(tmp_path, output_dir=str(out), tasks=tasks),
                               "--overwrite", "--no-progress")
    assert code == 2 and "model.name_or_path" in err and err.count("llm-iif: error") == 1, err
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------- parse, don't crash

@pytest.mark.parametrize("changes, expected", [
    ({"methods": ["standard", ["x"]]}, "suite.yaml: methods: ['x'] is not a name"),
    ({"output_dir": [1]}, "suite.yaml: output_dir: expected a directory, got [1]"),
    ({"seeds": [-1, 0]}, "suite.yaml: seeds: seed -1 is out of range"),
    ({"seeds": [0, True]}, "suite.yaml: seeds: expected a list of integer seeds"),
    ({"methods": ["standard", "standard"]}, "suite.yaml: methods: standard is given twice"),
    ({"tasks": {"t": {"recipe": [1]}}}, "tasks.t.recipe: expected a recipe path, got [1]"),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "methods": "standard"}}}, "tasks.t.methods: expected a list"),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "set": {"run.note": __import__("datetime").date(2024, 1, 2)}}}},
     "tasks.t.set.run.note: datetime.date(2024, 1, 2) is not a number, string, list or mapping"),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "set": {1: 2}}}}, "tasks.t.set: 1: expected a recipe key"),
    ({"tasks": {2024: FAST_TASK}}, "suite.yaml: tasks: 2024 is not a name"),
    ({"tasks": {"a\nb": FAST_TASK}}, "suite.yaml: tasks: 'a\\nb' is not a name"),
    ({"custom_methods": {"$\\bad$": {"iif.enabled": False}}}, "custom_methods: '$\\\\bad$' is not a name"),
])
def test_every_suite_key_is_type_checked(tmp_path, capsys, changes, expected):
    code, err = cli_in_process(capsys, "suite", write_suite(tmp_path, **changes))
    one_line(code, err, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tasks", [",", " , ", ""])
def test_tasks_without_a_name_is_an_error(tmp_path, capsys, tasks):
    code, err = cli_in_process(capsys, "suite", write_suite(tmp_path), "--tasks", tasks)
    one_line(code, err, f"--tasks {tasks!r}: expected task names, comma-separated (the suite has: frozenlake)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record", [{"methods": [1], "seeds": [0]}, {"methods": [None], "seeds": [0]},
                                    {"methods": ["standard"], "seeds": [1e400]}, {"methods": "standard", "seeds": 0},
                                    {"methods": ["../x"], "seeds": [0]}, {"methods": {"a": 1}}, [], "x"])
def test_a_tampered_comparison_json_is_refused_in_one_line(tmp_path, capsys, record):
    out = tmp_path / "compare"
    out.mkdir()
    (out / "comparison.json").write_text(json.dumps(record))
    code, err = cli_in_process(capsys, "compare", tiny_recipe(tmp_path), "--output-dir", out)
    one_line(code, err, f"--output-dir: {out} already holds a comparison (comparison.json); ")


def test_a_file_where_a_run_folder_goes_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "compare"
    out.mkdir()
    (out / "standard").write_text("my notes")
    code, err = cli_in_process(capsys, "compare", tiny_recipe(tmp_path), "--methods", "standard", "--seeds", "0",
                               "--output-dir", out, "--overwrite")
    one_line(code, err, f"--output-dir: {out / 'standard'} is a file, where the comparison puts the run folder "
                        "standard/seed-0")
    assert [p.name for p in out.iterdir()] == ["standard"]


def test_a_summary_json_edited_by_hand_is_one_line_in_the_report(tmp_path, capsys):
    grid = GridPaths(tmp_path)
    for seed in (0, 1):
        lm_run(grid.run("standard", seed))
    grid.summary.write_text("[]")
    code, err = cli_in_process(capsys, "report", tmp_path)
    one_line(code, err, f"{grid.summary}: not a comparison's summary (expected ")


# ------------------------------------------------------------------------- suites on made-up runs (no training)

def fake_runs(monkeypatch, stop_at: tuple[str, int] | None = None) -> list:
    """Replace the suite's trainers with one that writes a made-up LM run (`lm_run`) once ``ready`` is called,
    or raises `RunStopped` for the run ``stop_at``; returns the list of runs started."""
    started = []

    def train_one(method, seed, run, ready):
        ready()
        started.append((method, seed))
        if (method, seed) == stop_at:
            raise RunStopped("SIGINT", run)
        return lm_run(run)

    monkeypatch.setattr(suite_module, "_trainer", lambda task, build_ppo: train_one)
    return started


def ppo_suite(tmp_path: Path, methods=("standard", "iif")) -> Path:
    tasks = {"t": {"recipe": str(REPO / "recipes" / "tiny-sentiment.yaml"), "methods": list(methods)}}
    return write_suite(tmp_path, tasks=tasks)


def test_a_foreign_run_in_a_task_folder_is_not_the_comparisons(tmp_path, capsys, monkeypatch):
    """A run folder the comparison did not record (a user's own, with no reward_mean) is neither reported nor
    deleted; the report a stopped suite did not write is written on restart."""
    fake_runs(monkeypatch)
    suite = ppo_suite(tmp_path)
    foreign = tmp_path / "out" / "t" / "foreign-run" / "seed-0"
    foreign.mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text('{"round": 0}\n')
    code, err = cli_in_process(capsys, "suite", suite, "--no-progress")
    assert code == 0, err
    grid = SuitePaths(tmp_path / "out").task("t")
    assert "foreign-run" not in grid.report.read_text() and (foreign / "metrics.jsonl").is_file()
    grid.report.unlink()  # as if stopped between summary.json and report.html
    code, err = cli_in_process(capsys, "suite", suite, "--no-progress")
    assert code == 0 and grid.report.is_file(), err


def test_a_finished_jsonl_row_without_its_fields_means_the_run_is_made_again(tmp_path, capsys, monkeypatch):
    started = fake_runs(monkeypatch)
    suite = ppo_suite(tmp_path)
    assert cli_in_process(capsys, "suite", suite, "--no-progress")[0] == 0
    finished = SuitePaths(tmp_path / "out").finished
    rows = finished.read_text().splitlines()
    finished.write_text("\n".join(rows[:-1] + ['{"task": "t", "method": "iif", "seed": "1"}', "[1, 2]"]) + "\n")
    started.clear()
    code, err = cli_in_process(capsys, "suite", suite, "--no-progress")
    assert code == 0 and started == [("iif", 1)], err


def test_a_run_stopped_by_a_signal_stops_the_suite_with_exit_code_130(tmp_path, capsys, monkeypatch):
    started = fake_runs(monkeypatch, stop_at=("iif", 0))
    code, err = cli_in_process(capsys, "suite", ppo_suite(tmp_path), "--no-progress")
    assert code == 130 and err.count("\n") == 1, err
    assert err.startswith("llm-iif: suite stopped by SIGINT during ") and "run the same command again" in err
    assert started == [("standard", 0), ("iif", 0)]  # nothing after it
    rows = [json.loads(line) for line in SuitePaths(tmp_path / "out").finished.read_text().splitlines()]
    assert [(row["method"], row["seed"]) for row in rows] == [("standard", 0)]  # the stopped run is not finished


SIGNALLED = []


def interrupting_reward(prompts, responses):
    """A reward that sends SIGINT to this process the first time it is called: the signal arrives in the round
    being scored, here a run's last one."""
    if not SIGNALLED:
        SIGNALLED.append(True)
        os.kill(os.getpid(), signal.SIGINT)
    return [0.0] * len(responses)


def test_sigint_in_a_runs_last_round_stops_the_suite(tmp_path, capsys, tiny_model_dir):
    """SIGINT in a run's last round: the trainer finishes the round and reports the signal (stopped_by), and the
    suite stops there, as in any other round, without logging the run as finished."""
    SIGNALLED.clear()
    recipe = tiny_recipe(tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    raw["reward"] = {"name": "callable", "function": f"{__name__}:interrupting_reward"}
    recipe.write_text(yaml.safe_dump(raw))
    suite = write_suite(tmp_path, tasks={"t": {"recipe": str(recipe), "methods": ["standard"]}})
    code, err = cli_in_process(capsys, "suite", suite, "--no-progress")
    assert SIGNALLED and code == 130, err
    assert "llm-iif: suite stopped by SIGINT during " in err
    assert read_jsonl(SuitePaths(tmp_path / "out").finished)[0] == []  # seed 0 unfinished, seed 1 not started


# ------------------------------------------------------------------------------- labels and Markdown escaped

def test_a_dollar_name_reaches_matplotlib_as_text(tmp_path):
    """A folder or method named $\\bad$ would otherwise be parsed as mathtext, which fails the figure."""
    run = RunPaths(tmp_path / "$\\bad$")
    lm_run(run)
    assert "$\\bad$" in write_report(run.root).read_text()
    histories = {"standard": {s: lm_run(RunPaths(tmp_path / "grid" / "standard" / f"seed-{s}")) for s in (0, 1)}}
    histories["$\\bad$"] = histories["standard"]
    plot_reward_curves(summarize(histories), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    card = {"tasks": {"$\\bad$": {"methods": {"$x$": {"intervals": {"auc_ratio": {"iqm": [1.0, 0.9, 1.1]}}}}}}}
    save_figure(scorecard_figure(card), tmp_path / "card.png")
    assert (tmp_path / "card.png").stat().st_size > 0


def test_scorecard_markdown_escapes_html_in_names():
    evil = "<img src=x onerror=alert(1)>"
    stats = {"final_reward": [0.5, 0.1], "intervals": {}}
    card = {"suite": f"{evil}.yaml", "command": f"llm-iif suite `{evil}`", "date": "2026-01-01", "commit": "abc",
            "cpu_models": [evil], "versions": {"torch": "2"},
            "tasks": {evil: {"recipe": f"{evil}.yaml", "set": [f"run.note={evil}"], "seeds": [0, 1], "seconds": 60,
                             "standard_climb": 0.5, "methods": {"standard": stats, evil: stats},
                             "verdicts": {f"{evil} vs standard": "better"}, "pairs": {}},
                      f"{evil}|2": {"finished_runs": 1, "runs": 4}}}
    text = scorecard_markdown(card)
    outside_code = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text)  # code spans show HTML, never render it
    assert "<img" not in outside_code and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "| &lt;img src=x onerror=alert(1)&gt;\\|2 | – | 1 of 4 runs finished |" in text  # a | stays in its cell
    assert "`` llm-iif suite `<img src=x onerror=alert(1)>` ``" in text  # in code, HTML is shown, not rendered
