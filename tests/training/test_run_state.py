"""Exact resume, checkpoints under SIGKILL and SIGTERM, damaged checkpoints, and determinism."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import accelerate_launch, tiny_recipe_dict
from llm_iif.runs.state import load_training_state, resolve_resume, verify
from llm_iif.cli import main
from llm_iif.recipes import recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.training import build_trainer


def iif_recipe(output_dir, rounds, **run):
    raw = tiny_recipe_dict(output_dir)
    raw["iif"] = {"enabled": True, "val_size": 8, "mode": "bottom", "p": 0.25}
    raw["run"].update(rounds=rounds, **run)
    return raw


def write_recipe(tmp_path, raw, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def trainable_weights(run_dir):
    return load_training_state(Path(run_dir) / "final")["trainable"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """4 rounds with IIF in one go: the reference every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    build_trainer(recipe_from_dict(iif_recipe(out, rounds=4))).train()
    return out


def test_same_seed_same_metrics_file(uninterrupted, tmp_path):
    build_trainer(recipe_from_dict(iif_recipe(tmp_path, rounds=4))).train()
    assert (tmp_path / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()


def test_extending_a_finished_run_matches_an_uninterrupted_one(uninterrupted, tmp_path):
    build_trainer(recipe_from_dict(iif_recipe(tmp_path, rounds=2))).train()
    resumed = build_trainer(recipe_from_dict(iif_recipe(tmp_path, rounds=4)))
    resumed.train(resume_from=tmp_path / "final")
    assert (tmp_path / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    expected, actual = trainable_weights(uninterrupted), trainable_weights(tmp_path)
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    assert len((tmp_path / "timings.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [f"round_{k:04d}.parquet" for k in range(4)]


def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "llm_iif", "train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_finishes_the_round_saves_and_resumes_exactly(uninterrupted, tmp_path):
    recipe = write_recipe(tmp_path, iif_recipe(tmp_path / "run", rounds=4))
    proc = run_cli(recipe)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)  # until round 0 is written: the signal handlers are installed by then
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    done = metrics.read_text().count("\n")
    assert 1 <= done < 4, "the run ended before the signal arrived; nothing to resume"
    assert f"stopped by SIGTERM after round {done} of 4" in stderr
    assert f"--resume {tmp_path / 'run'}" in stderr
    assert verify(tmp_path / "run" / f"checkpoint-{done}")["rounds_completed"] == done
    assert not (tmp_path / "run" / "final").exists()

    assert main(["train", str(recipe), "--resume", str(tmp_path / "run")]) == 0
    assert metrics.read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    expected, actual = trainable_weights(uninterrupted), trainable_weights(tmp_path / "run")
    assert all(torch.equal(expected[n], actual[n]) for n in expected)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, iif_recipe(tmp_path / "run", rounds=3, save_every=1))
    script = Path(__file__).with_name("kill_during_checkpoint.py")
    proc = subprocess.run([sys.executable, str(script), str(recipe)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert not (run / "checkpoint-2").exists()  # the half-written one never got its name
    assert resolve_resume(run) == (run, run / "checkpoint-1")
    assert main(["train", str(recipe), "--resume", str(run)]) == 0
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert verify(run / "final")["rounds_completed"] == 3


def test_damaged_checkpoint_is_refused_and_the_previous_offered(tmp_path, tiny_model_dir, capsys):
    raw = iif_recipe(tmp_path / "run", rounds=3, save_every=1, keep_last_n=1)
    build_trainer(recipe_from_dict(raw)).train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "final"))) == \
        ["checkpoint-2", "final"]  # keep_last_n: 1 removed checkpoint-1
    head = run / "final" / "value_head.safetensors"
    head.write_bytes(head.read_bytes()[:-8])  # truncated, as by a bad copy
    recipe = write_recipe(tmp_path, {**raw, "run": {**raw["run"], "rounds": 4}})
    assert main(["train", str(recipe), "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "final: damaged checkpoint (value_head.safetensors does not match its checksum)" in err
    assert f"the previous good one is {run / 'checkpoint-2'}: --resume {run / 'checkpoint-2'}" in err
    assert main(["train", str(recipe), "--resume", str(run / "checkpoint-2")]) == 0
    assert verify(run / "final")["rounds_completed"] == 4


def test_resume_refuses_a_changed_recipe(uninterrupted, tmp_path, capsys):
    raw = iif_recipe(uninterrupted, rounds=5)
    raw["ppo"]["learning_rate"] = 0.5
    assert main(["train", str(write_recipe(tmp_path, raw)), "--resume", str(uninterrupted)]) == 2
    err = capsys.readouterr().err
    assert "the recipe differs from" in err and "in ppo.learning_rate; only run.rounds may change" in err


def test_resuming_a_finished_run_does_nothing(uninterrupted, tmp_path, capsys):
    before = (uninterrupted / "metrics.jsonl").read_bytes()
    recipe = write_recipe(tmp_path, iif_recipe(uninterrupted, rounds=4))
    assert main(["train", str(recipe), "--resume", str(uninterrupted)]) == 0
    assert "has completed all 4 rounds; nothing to do" in capsys.readouterr().err
    assert (uninterrupted / "metrics.jsonl").read_bytes() == before


def test_two_process_run_resumes_exactly(tmp_path, tiny_model_dir):
    """Each process's random number generators are saved and restored: 2 processes resumed after round 2
    write the same metrics as 2 processes that never stopped. The stopped run is the whole run's directory as a
    kill after round 3 leaves it: checkpoint-2/, and metrics of a round the resume must redo."""
    launch = [*accelerate_launch(2), "-m", "llm_iif", "train"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    recipe = write_recipe(tmp_path, iif_recipe(tmp_path / "whole", rounds=4, save_every=2), "whole.yaml")
    subprocess.run([*launch, str(recipe)], env=env, check=True, capture_output=True, timeout=600)
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "final")
    metrics = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "part" / "metrics.jsonl").write_text("\n".join(metrics[:3]) + "\n")
    subprocess.run([*launch, "--resume", str(tmp_path / "part")], env=env, check=True, capture_output=True,
                   timeout=600)
    assert (tmp_path / "part" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


def test_a_cached_target_source_resumes_exactly(tmp_path, tiny_model_dir):
    """The cached validation responses are part of the checkpoint: stopped after round 2 of a 3-round refresh
    cycle and resumed, the run reweights the same responses as one that never stopped."""
    def cached(out, rounds):
        raw = iif_recipe(out, rounds=rounds)
        raw["iif"].update(target_source="cached", refresh_every=3)
        return recipe_from_dict(raw)

    build_trainer(cached(tmp_path / "whole", 4)).train()
    build_trainer(cached(tmp_path / "part", 2)).train()
    build_trainer(cached(tmp_path / "part", 4)).train(resume_from=tmp_path / "part" / "final")
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == lines
    assert [json.loads(line)["target_ess"] < 8 for line in lines.splitlines()] == [False, True, True, False]
