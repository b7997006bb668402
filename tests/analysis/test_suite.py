"""`llm-iif suite`: the suite file's checks, the directory claim, the scorecard, and a restart that skips what
finished (on a classic recipe of a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llm_iif.analysis.scorecard import check_same_cpu, scorecard_markdown, standard_climb, task_scorecard
from llm_iif.analysis.suite import claim_suite_directory, load_suite, run_suite, start_suite
from llm_iif.analysis.summary import summarize
from llm_iif.recipes import GRPORecipe
from llm_iif.core.errors import UserError
from llm_iif.core.machine import cpu_model
from llm_iif.runs.paths import SuitePaths
from llm_iif.training import build_trainer
from conftest import cli_in_process

REPO = Path(__file__).resolve().parents[2]
FROZENLAKE = REPO / "recipes" / "classic" / "frozenlake.yaml"
# A classic task of about a second per run: 64 steps per round, 2 rounds, 10 evaluation episodes.
FAST_CLASSIC = {"ppo.n_steps": 64, "ppo.batch_size": 32, "ppo.n_epochs": 1, "run.rounds": 2, "run.eval_episodes": 10}


def write_suite(tmp_path: Path, **changes) -> Path:
    suite = {"output_dir": str(tmp_path / "out"), "seeds": [0, 1],
             "tasks": {"frozenlake": {"recipe": str(FROZENLAKE), "methods": ["standard", "iif"], "set": FAST_CLASSIC}}}
    suite.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def curve_history(rewards: list[float], kl: float | None = None) -> list[dict]:
    return [{"round": k, "reward_mean": r, "kept_fraction": 1.0, "time_round_s": 1.0,
             **({"kl": kl} if kl is not None else {})} for k, r in enumerate(rewards)]


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("changes, expected", [
    ({"tasks": {"t": {"recipe": "missing.yaml"}}}, "tasks.t.recipe: "),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "methods": ["standard", "iif-cached"]}}},
     "tasks.t.methods: unknown method 'iif-cached' for a classic PPO (Stable-Baselines3) recipe"),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "methods": ["iif", "random"]}}}, "lacks standard"),
    ({"seeds": [3]}, "seeds: 1 seed; the scorecard's intervals over seeds need at least 2"),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "seeds": [0, 0]}}}, "tasks.t.seeds: seed 0 is given twice"),
    ({"tasks": {"t": {"recipe": str(FROZENLAKE), "set": {"ppo.n_stepz": 64}}}}, "tasks.t (standard): "),
    ({"task": {}}, "unknown key 'task'"),
    ({"custom_methods": {"iif": {"iif.p": 0.5}}}, "custom_methods.iif: a built-in method's name; choose another"),
    ({"custom_methods": {"kl": 0.5}}, "custom_methods: expected a mapping of method names to overrides"),
])
def test_a_bad_suite_file_is_one_line_naming_the_key(tmp_path, capsys, changes, expected):
    code, err = cli_in_process(capsys, "suite", write_suite(tmp_path, **changes))
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_custom_methods_are_checked_and_recorded_with_their_overrides(tmp_path):
    sentiment = REPO / "recipes" / "tiny-sentiment.yaml"
    custom = {"kl-1": {"iif.enabled": False, "ppo.adaptive_kl": False, "ppo.init_kl_coef": 1.0},
              "bad": {"ppo.init_kl_coeff": 1.0}}
    tasks = {"t": {"recipe": str(sentiment), "methods": ["standard", "kl-1"]}}
    suite = load_suite(write_suite(tmp_path, custom_methods=custom, tasks=tasks))
    (task,) = suite.tasks
    assert task.method_table()["kl-1"] == ["iif.enabled=false", "ppo.adaptive_kl=false", "ppo.init_kl_coef=1.0"]
    assert task.method_table()["iif"] == ["iif.enabled=true"]  # the built-in methods stay
    assert task.record()["custom_methods"] == {"kl-1": task.method_table()["kl-1"]}  # a changed one is noticed
    with pytest.raises(UserError, match=r"tasks.t \(bad\): .*ppo.init_kl_coeff"):
        load_suite(write_suite(tmp_path, custom_methods=custom, tasks={"t": {**tasks["t"], "methods": ["standard", "bad"]}}))


def test_a_tasks_own_custom_methods_add_to_the_suites_and_stay_its_own(tmp_path):
    sentiment = str(REPO / "recipes" / "tiny-sentiment.yaml")
    custom = {"kl-1": {"iif.enabled": False, "ppo.init_kl_coef": 1.0}}
    tasks = {"a": {"recipe": sentiment, "methods": ["standard", "kl-1", "mine"],
                   "custom_methods": {"mine": {"ppo.init_kl_coef": 0.3}, "kl-1": {"ppo.init_kl_coef": 2.0}}},
             "b": {"recipe": sentiment, "methods": ["standard", "kl-1"]}}
    a, b = load_suite(write_suite(tmp_path, custom_methods=custom, tasks=tasks)).tasks
    assert a.method_table()["mine"] == ["ppo.init_kl_coef=0.3"]
    assert a.method_table()["kl-1"] == ["ppo.init_kl_coef=2.0"]  # the task's replaces the suite's
    assert b.method_table()["kl-1"] == ["iif.enabled=false", "ppo.init_kl_coef=1.0"] and "mine" not in b.method_table()
    with pytest.raises(UserError, match="tasks.b.methods: unknown method 'mine'"):
        load_suite(write_suite(tmp_path, tasks={**tasks, "b": {"recipe": sentiment, "methods": ["standard", "mine"]}}))


def test_unknown_task_and_missing_file(tmp_path, capsys):
    code, err = cli_in_process(capsys, "suite", write_suite(tmp_path), "--tasks", "frozenlake,acrobot")
    assert code == 2 and "--tasks: unknown task 'acrobot' (the suite has: frozenlake)" in err
    code, err = cli_in_process(capsys, "suite", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: suite file not found" in err


def test_a_directory_of_another_suite_or_another_cpu_is_refused(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    paths = SuitePaths(suite.output_dir)
    assert claim_suite_directory(suite, paths, overwrite=False) == ([], {})  # a new suite
    start_suite(suite, paths, [])
    other = load_suite(write_suite(tmp_path, seeds=[0, 1, 2]))
    with pytest.raises(UserError, match="holds another suite \\(task frozenlake: seeds differs"):
        claim_suite_directory(other, paths, overwrite=False)
    earlier, _ = claim_suite_directory(other, paths, overwrite=True)  # the first suite's outputs
    start_suite(other, paths, earlier)  # deletes them, records this one
    assert json.loads(paths.record.read_text())["tasks"]["frozenlake"]["seeds"] == [0, 1, 2]
    paths.finished.write_text(json.dumps({"task": "frozenlake", "method": "standard", "seed": 0, "seconds": 1.0,
                                          "cpu_model": "Another CPU (family 6)"}) + "\n")
    with pytest.raises(UserError, match="runs made on the CPU 'Another CPU \\(family 6\\)', and this one is"):
        claim_suite_directory(other, paths, overwrite=False)


def test_the_scorecard_refuses_to_pair_runs_from_different_cpus(tmp_path):
    task = load_suite(write_suite(tmp_path)).tasks[0]
    finished = {("frozenlake", m, s): {"cpu_model": "A"} for m, s in task.runs()}
    check_same_cpu(task, finished)
    finished[("frozenlake", "iif", 1)] = {"cpu_model": "B"}
    with pytest.raises(UserError, match="frozenlake iif seed 1 ran on 'B' and standard seed 1 on 'A'"):
        check_same_cpu(task, finished)


# ------------------------------------------------------------------------------------------------ scorecard

def test_standard_climb_is_where_the_seed_mean_reaches_90_percent_of_its_gain():
    rising = {0: curve_history([0.0] * 5 + [0.1 * k for k in range(1, 11)] + [1.0] * 5)}
    assert standard_climb(rising, smooth=1) == pytest.approx(14 / 20)  # 0.9 in round 14 of 20
    # smoothed over 5 rounds: round 17's mean of 0.8, 0.9, 1, 1, 1 is the first above 0.9
    assert standard_climb(rising, smooth=5) == pytest.approx(17 / 20)
    assert standard_climb({0: curve_history([1.0, 0.5, 0.5])}, smooth=1) is None  # no gain
    every_other = {0: [{**m, "round": 2 * m["round"] + 1} for m in rising[0]]}  # GRPO evaluating every 2 steps
    for m in curve_history([0.0] * 20):
        every_other[0].append({key: value for key, value in {**m, "round": 2 * m["round"]}.items()
                               if key != "reward_mean"})
    every_other[0].sort(key=lambda m: m["round"])
    assert standard_climb(every_other, smooth=1) == pytest.approx(14 / 20)


def test_task_scorecard_verdicts_on_known_curves(tmp_path):
    task = load_suite(write_suite(tmp_path, tasks={"t": {"recipe": str(FROZENLAKE),
                                                         "methods": ["standard", "iif", "random"]}},
                                  seeds=[0, 1, 2, 3])).tasks[0]
    rounds = 20
    standard = {s: curve_history([k / rounds + 0.01 * s for k in range(rounds)]) for s in task.seeds}
    faster = {s: curve_history([min(1.0, 2 * k / rounds) + 0.01 * s for k in range(rounds)]) for s in task.seeds}
    # GRPO tasks also run DAPO with refill and IIF after it; the scorecard reads only the histories
    histories = {"standard": standard, "iif": faster, "random": standard, "dapo-refill": faster,
                 "dapo-refill-iif": standard}
    entry = task_scorecard(task, histories, summarize(histories), seconds=60.0)
    assert entry["verdicts"]["iif vs standard"].startswith("better (AUC × ")
    assert entry["verdicts"]["iif vs random"].startswith("better (AUC × ")  # random is standard's twin here
    assert entry["verdicts"]["iif vs dapo-refill"].startswith("no measurable difference")  # the same curves
    assert entry["verdicts"]["dapo-refill-iif vs dapo-refill"].startswith("worse (AUC × ")
    assert set(entry["pairs"]) == {"iif vs random", "iif vs dapo-refill", "dapo-refill-iif vs dapo-refill",
                                   "dapo-refill-iif vs random"}
    random_stats = entry["methods"]["random"]["intervals"]
    assert random_stats["auc_ratio"]["verdict"] == "no measurable difference"
    assert random_stats["probability_of_improvement"]["estimate"][0] == pytest.approx(0.5)
    card = {"suite": "s.yaml", "command": "llm-iif suite s.yaml", "date": "2026-12-02", "commit": "abc",
            "cpu_models": ["A"], "versions": {"torch": "2"}, "tasks": {"t": entry, "u": {"finished_runs": 1, "runs": 6}}}
    text = scorecard_markdown(card)
    assert "| t | 4 | better (AUC × " in text and "| u | – | 1 of 6 runs finished |" in text
    assert "## t" in text and "| random | " in text and "IIF against the other baselines" in text
    assert "- t, dapo-refill-iif vs dapo-refill: worse (AUC × " in text  # under "Further verdicts"


# ------------------------------------------------------------------------------------------------ a real suite

def test_a_suite_restarts_where_it_stopped_and_keeps_finished_runs(tmp_path, capsys):
    pytest.importorskip("stable_baselines3", reason="needs the classic extra: pip install 'llm_iif[classic]'")
    suite = load_suite(write_suite(tmp_path))
    paths = SuitePaths(suite.output_dir)
    card = run_suite(suite, "llm-iif suite suite.yaml", build_trainer, progress=False)
    task = card["tasks"]["frozenlake"]
    assert set(task["methods"]) == {"standard", "iif"} and task["seeds"] == [0, 1] and task["seconds"] > 0
    assert "iif vs standard" in task["verdicts"] and card["cpu_models"] == [cpu_model()]
    for name in ("scorecard.md", "scorecard.json", "scorecard.png", "frozenlake/summary.json",
                 "frozenlake/reward_curves.png"):
        assert (paths.root / name).stat().st_size > 0, name

    # As if killed during the last run: its line is missing from finished.jsonl, its files half-written.
    lines = paths.finished.read_text().splitlines()
    paths.finished.write_text("\n".join(lines[:-1]) + "\n")
    last = json.loads(lines[-1])
    last_run = paths.task("frozenlake").run(last["method"], last["seed"])
    kept_run = paths.task("frozenlake").run("standard", 0)
    kept_metrics = kept_run.metrics.read_text()
    kept_run.metrics.touch()
    kept_time = kept_run.metrics.stat().st_mtime_ns
    last_run.metrics.write_text('{"round": 0, "reward_m')
    paths.task("frozenlake").summary.unlink()

    code, _ = cli_in_process(capsys, "suite", suite.path, "--no-progress")
    assert code == 0
    assert kept_run.metrics.stat().st_mtime_ns == kept_time and kept_run.metrics.read_text() == kept_metrics
    assert len(last_run.logged_history()) == FAST_CLASSIC["run.rounds"]  # retrained whole
    assert len(paths.finished.read_text().splitlines()) == len(lines)
    assert "| frozenlake | 2 |" in paths.scorecard_markdown.read_text()


@pytest.mark.parametrize("name", ["quick", "full"])
def test_the_shipped_suites_load_with_every_recipe_and_method(name):
    suite = load_suite(REPO / "benchmarks" / "suites" / f"{name}.yaml")
    assert {task.name for task in suite.tasks} == {"tiny-sentiment", "tiny-learned-rm", "tiny-addition",
                                                   "tiny-sentiment-grpo", "tiny-reasoning", "frozenlake", "acrobot",
                                                   *(["tiny-overopt"] if name == "full" else [])}
    for task in suite.tasks:
        if task.name == "tiny-overopt":  # the defences against over-optimisation instead of random
            assert {"standard", "iif", "kl-0.2", "kl-0.5", "kl-1", "ensemble", "iif-proxy-seq", "iif-gold"} == \
                set(task.methods) and task.custom["ensemble"][1] == 'reward.name="conservative-ensemble"'
            continue
        assert {"standard", "iif", "random"} <= set(task.methods)
        assert len(task.seeds) == (3 if name == "quick" else 5 if task.name == "tiny-reasoning" else 10)


def test_the_grpo_suite_loads_with_every_method():
    suite = load_suite(REPO / "benchmarks" / "suites" / "grpo.yaml")
    assert {task.name for task in suite.tasks} == {"tiny-addition", "tiny-reasoning", "tiny-sentiment-grpo"}
    for task in suite.tasks:
        assert task.methods == ["standard", "iif", "random", "dapo-refill", "dapo-refill-iif"]


def test_the_flawed_rewards_suite_loads_and_every_method_makes_a_valid_recipe():
    """benchmarks/suites/flawed-rewards.yaml: the three flaws on seeds 10-19, the same-data baselines and the
    trusted-set variants, each method's overrides a recipe that loads."""
    from llm_iif.recipes import load_recipe

    suite = load_suite(REPO / "benchmarks" / "suites" / "flawed-rewards.yaml")
    tasks = {task.name: task for task in suite.tasks}
    assert set(tasks) == {"overopt-but", "overopt-length", "grpo-hackable-verifier"}
    shared = {"standard", "iif", "dpo-aux-0.3", "dpo-aux-1", "iif-64", "iif-flipped", "iif-draw-64"}
    ppo = {"kl-0.2", "kl-1", "ensemble", "rm-plus-trusted", "iif-kl-0.2", "iif-16"}
    for name, task in tasks.items():
        assert task.seeds == list(range(10, 20))
        assert shared | (set() if task.kind is GRPORecipe else ppo) <= set(task.methods), name
        for method in task.methods:
            recipe = load_recipe(task.recipe, [*task.overrides, *task.method_table()[method]], kind=task.kind)
            assert recipe.trusted.source is not None, (name, method)
        assert load_recipe(task.recipe, task.method_table()["iif-draw-64"], kind=task.kind).trusted.target_draw == 64
