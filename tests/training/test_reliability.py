"""What a run directory can be trusted with (issue 14), one test per case: resume runs no planted code, picks
the newest state and works as printed; a directory holds one run; bad input is one line with exit code 2."""

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from llm_iif.cli import main
from llm_iif.core.errors import UserError
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.runs.state import discard_checkpoints_after, resolve_resume, verify, write_manifest
from llm_iif.training.trainer import PPOTrainer


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-round tiny recipe that saves no periodic checkpoints."""
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", tiny_recipe_dict("runs/unused"))


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """The recipe extended to 4 rounds, run without a stop: what every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", str(recipe), "--set", "run.rounds=4", "--output-dir", str(out)]) == 0
    return out


def one_error_line(capsys) -> str:
    """The single stderr line of a command that failed with a `UserError` (no traceback)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-iif: error: "), lines
    return lines[0]


def sigterm_after_round(monkeypatch, stop_after: int) -> None:
    """Send this process SIGTERM once round ``stop_after`` has run, as a cluster's scheduler would."""
    run_round = PPOTrainer.run_round

    def run_round_then_signal(self, k):
        metrics = run_round(self, k)
        if k == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(PPOTrainer, "run_round", run_round_then_signal)


def printed_resume_command(stderr: str) -> list[str]:
    line = next(line for line in stderr.splitlines() if "Resume with: " in line)
    return shlex.split(line.split("Resume with: ", 1)[1])


# ----------------------------------------------------------------------- 1. loading runs no planted code

class Planted:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("cover_up", ["recomputed checksums", "entry dropped from the manifest"])
def test_a_tampered_checkpoint_runs_nothing_and_is_one_line(reference, tmp_path, capsys, cover_up):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    final, marker = copy / "final", tmp_path / "planted-code-ran"
    torch.save({"trainable": Planted(marker)}, final / "training_state.pt")
    manifest = json.loads((final / "trainer_state.json").read_text())
    if cover_up == "recomputed checksums":
        write_manifest(final, {k: v for k, v in manifest.items() if k != "files"})
    else:
        del manifest["files"]["training_state.pt"]
        (final / "trainer_state.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(copy), "--set", "run.rounds=5"]) == 2
    error = one_error_line(capsys)
    assert "training_state.pt" in error
    assert not marker.exists()


def test_a_checkpoint_without_a_trainable_tensor_is_refused_naming_it(reference, tmp_path, capsys):
    """A checkpoint that verifies but would load nothing into one trainable parameter (one written for other
    LoRA settings, say) is refused, not resumed with that parameter at its initial value."""
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    final = copy / "final"
    state = torch.load(final / "training_state.pt", weights_only=True)
    dropped = sorted(state["trainable"])[0]
    del state["trainable"][dropped]
    torch.save(state, final / "training_state.pt")
    manifest = json.loads((final / "trainer_state.json").read_text())
    write_manifest(final, {k: v for k, v in manifest.items() if k != "files"})  # checksums that verify
    assert main(["train", "--resume", str(copy), "--set", "run.rounds=5"]) == 2
    assert f"has no tensor for the trainable parameter '{dropped}' (1 missing)" in one_error_line(capsys)


def test_a_file_added_to_a_checkpoint_is_refused(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference / "final", copy / "final")
    (copy / "final" / "adapter_loader.py").write_text("print('hello')\n")
    with pytest.raises(UserError, match="adapter_loader.py is not listed in trainer_state.json"):
        verify(copy / "final")


# ----------------------------------------------------------------------- 2. the printed command resumes exactly

def test_the_printed_resume_command_reproduces_the_uninterrupted_run(recipe, reference, tmp_path, capsys,
                                                                     monkeypatch):
    run = tmp_path / "run"
    sigterm_after_round(monkeypatch, stop_after=1)
    assert main(["train", str(recipe), "--set", "run.rounds=4", "--set", "run.save_every=1",
                 "--output-dir", str(run)]) == 0
    command = printed_resume_command(capsys.readouterr().err)
    assert command == ["llm-iif", "train", "--resume", str(run)]
    monkeypatch.undo()
    assert main(command[1:]) == 0
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------- 3. resume picks the newest state

def test_resume_picks_the_checkpoint_with_the_most_rounds_and_clears_unfinished_ones(
        recipe, reference, tmp_path, capsys, monkeypatch, caplog):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--output-dir", str(run)]) == 0  # final/ after 2 rounds
    sigterm_after_round(monkeypatch, stop_after=2)
    assert main(["train", "--resume", str(run), "--set", "run.rounds=4"]) == 0  # extended, stopped after 3
    command = printed_resume_command(capsys.readouterr().err)
    monkeypatch.undo()
    assert verify(run / "final")["rounds_completed"] == 2
    assert resolve_resume(run) == (run, run / "checkpoint-3")  # not final/, whose 2 rounds are older
    unfinished = run / ".checkpoint-4-k2x9"  # what a SIGKILL during a save leaves
    unfinished.mkdir()
    (unfinished / "training_state.pt").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="llm_iif.runs.state"):
        assert main(command[1:]) == 0
    assert not unfinished.exists()
    assert any(".checkpoint-4-k2x9" in record.getMessage() for record in caplog.records)
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def test_resuming_from_an_older_checkpoint_discards_the_later_ones(tmp_path):
    for name, rounds in (("checkpoint-1", 1), ("checkpoint-3", 3), ("final", 4)):
        (tmp_path / name).mkdir()
        write_manifest(tmp_path / name, {"rounds_completed": rounds})
    discard_checkpoints_after(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


# ----------------------------------------------------------------------- 4. one run per directory

def test_a_second_run_in_a_used_directory_is_refused_and_overwrite_replaces_it(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "run.rounds=3", "--set", "run.save_every=1",
                 "--output-dir", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    second = ["train", str(recipe), "--set", "run.seed=7", "--output-dir", str(run)]
    assert main(second) == 2
    error = one_error_line(capsys)
    assert f"{run} already holds a run" in error and f"--resume {run}" in error and "--overwrite" in error
    assert (run / "metrics.jsonl").read_bytes() == before

    assert main([*second, "--overwrite"]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["run"]["seed"] == 7
    assert sorted(p.name for p in (run / "records").iterdir()) == ["round_0000.parquet", "round_0001.parquet"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "final"))) == ["final"]
    assert verify(run / "final")["rounds_completed"] == 2
    assert (run / "notes.txt").read_text() == "mine"  # not the run's: left alone


# ----------------------------------------------------------------------- 5. bad input: one line, exit 2

def test_bad_yaml_in_a_set_value(recipe, capsys):
    assert main(["train", str(recipe), "--set", "run.rounds=[2"]) == 2
    assert "--set run.rounds=[2: the value '[2' is not valid YAML" in one_error_line(capsys)


def test_a_yaml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: builtin:tiny-sentiment\n lora: [\n")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}: line 3, column 2: not valid YAML" in one_error_line(capsys)


def test_an_empty_jsonl_prompts_file(recipe, tmp_path, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    assert main(["train", str(recipe), "--set", f"data.source={empty}", "--output-dir", str(tmp_path / "run")]) == 2
    assert f"data.source: {empty} is empty" in one_error_line(capsys)


def test_a_truncated_model_safetensors(recipe, tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["train", str(recipe), "--set", f"model.name_or_path={model}",
                 "--output-dir", str(tmp_path / "run")]) == 2
    error = one_error_line(capsys)
    assert "model.name_or_path" in error and "model.safetensors: damaged or truncated" in error


@pytest.mark.parametrize("where, reason", [
    ("a file", "is a file, not a directory"),
    ("below a file", "cannot write to"),
    ("read-only", "cannot write to"),
])
def test_an_output_dir_that_cannot_be_written(recipe, tmp_path, capsys, where, reason):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    if where == "read-only" and not os.path.isdir("/sys"):
        pytest.skip("needs Linux's read-only /sys")
    output_dir = {"a file": a_file, "below a file": a_file / "run", "read-only": Path("/sys/llm-iif-run")}[where]
    assert main(["train", str(recipe), "--output-dir", str(output_dir)]) == 2
    error = one_error_line(capsys)
    assert f"run.output_dir: {output_dir}" in error or f"run.output_dir: cannot write to {output_dir}" in error
    assert reason in error


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('no GPU here')\n", "(RuntimeError: no GPU here)"),
    ("def reward(prompts, responses:\n", "syntax error in"),
])
def test_a_reward_module_that_fails_at_import(recipe, tmp_path, capsys, monkeypatch, source, message):
    module = f"failing_reward_{abs(hash(source))}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import puts the working directory on it
    assert main(["train", str(recipe), "--set", "reward.name=callable", "--set", f"reward.function={module}:reward",
                 "--output-dir", str(tmp_path / "run")]) == 2
    error = one_error_line(capsys)
    assert f"reward.function: cannot import '{module}:reward'" in error and message in error


# ----------------------------------------------------------------------- 6. smaller

def test_a_local_reward_module_imports_through_the_installed_script(recipe, tmp_path):
    (tmp_path / "my_reward.py").write_text("def reward(prompts, responses):\n    return [1.0] * len(responses)\n")
    script = Path(sys.executable).with_name("llm-iif")
    proc = subprocess.run([str(script), "train", str(recipe), "--set", "run.rounds=1", "--set", "reward.name=callable",
                           "--set", "reward.function=my_reward:reward", "--output-dir", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["reward_mean"] == 1.0


def test_the_patience_message_matches_the_patience():
    guard = NonfiniteGuard(patience=1)
    guard.flag("reward", 2, "2 rewards were NaN")
    guard.end_round()
    with pytest.raises(UserError) as err:
        guard.flag("reward", 1, "1 reward was NaN")
    assert "(2 round(s) in a row); run.nonfinite_patience: 1 allows 1 such round(s) in a row" in str(err.value)
    assert "> 0" not in str(err.value)


# ----------------------------------------------------------------------- 7. issue 36: signals, manifests

def test_a_signal_in_the_last_round_stops_and_the_resume_saves_final(recipe, reference, tmp_path, capsys,
                                                                     monkeypatch, harmless_sigterm):
    run = tmp_path / "run"
    sigterm_after_round(monkeypatch, stop_after=3)  # rounds 0..3: the last one
    assert main(["train", str(recipe), "--set", "run.rounds=4", "--output-dir", str(run)]) == 0
    stderr = capsys.readouterr().err
    assert f"stopped by SIGTERM after round 4 of 4; checkpoint {run / 'checkpoint-4'}." in stderr
    assert not (run / "final").exists() and verify(run / "checkpoint-4")["rounds_completed"] == 4
    monkeypatch.undo()
    assert main(printed_resume_command(stderr)[1:]) == 0  # nothing left to train, but final/ to save
    assert verify(run / "final")["rounds_completed"] == 4 and (run / "report.html").is_file()
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def test_a_signal_during_the_final_save_lets_it_finish_and_is_reported(recipe, tmp_path, monkeypatch,
                                                                       harmless_sigterm):
    from llm_iif.recipes import load_recipe
    from llm_iif.training import build_trainer

    save = PPOTrainer.save

    def save_with_a_signal(self, directory):
        if directory.name == "final":
            os.kill(os.getpid(), signal.SIGTERM)
        save(self, directory)

    monkeypatch.setattr(PPOTrainer, "save", save_with_a_signal)
    trainer = build_trainer(load_recipe(recipe, ["run.rounds=1", f"run.output_dir={tmp_path / 'run'}"]))
    trainer.train()
    assert trainer.stopped_by == "SIGTERM"
    assert trainer.checkpoint == tmp_path / "run" / "final" and verify(trainer.checkpoint)["rounds_completed"] == 1


@pytest.mark.parametrize("key, value, message", [
    ("rounds_completed", "abc", "rounds_completed: expected an integer, 0 or more, got 'abc'"),
    ("rounds_completed", True, "rounds_completed: expected an integer, 0 or more, got True"),
    ("files", ["training_state.pt"], "files: expected a mapping of file names to SHA-256 checksums, got "
                                     "['training_state.pt']"),
    ("num_processes", "2", "num_processes: expected an integer, 1 or more, got '2'"),
])
def test_a_manifest_value_of_the_wrong_type_is_one_line(reference, tmp_path, capsys, key, value, message):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    manifest_file = copy / "final" / "trainer_state.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, key: value}))
    assert main(["train", "--resume", str(copy), "--set", "run.rounds=5"]) == 2
    assert f"final: damaged checkpoint (trainer_state.json: {message})" in one_error_line(capsys)


@pytest.mark.parametrize("checkpoint, rounds, message", [
    # a run killed after its checkpoint at round 2, whose manifest now claims the whole run
    ("checkpoint-2", 4, "rounds_completed is 4, but the checkpoint of 4 is named checkpoint-4"),
    # a finished run of 4 rounds whose manifest claims 6, resumed to 6
    ("final", 6, "rounds_completed is 6, but training_state.pt (its history) has 4"),
])
def test_an_edited_count_is_refused_not_taken_for_a_finished_run(reference, tmp_path, capsys, checkpoint, rounds,
                                                                  message):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns("final"))
    shutil.copytree(reference / "final", copy / checkpoint)
    manifest_file = copy / checkpoint / "trainer_state.json"
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "rounds_completed": rounds}))
    before = sorted(copy.iterdir())
    assert main(["train", "--resume", str(copy), "--set", f"run.rounds={rounds}"]) == 2
    assert f"{checkpoint}: damaged checkpoint (trainer_state.json: {message})" in one_error_line(capsys)
    assert sorted(copy.iterdir()) == before


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_one_line(recipe, tmp_path, capsys, seed):
    assert main(["train", str(recipe), "--set", f"run.seed={seed}", "--output-dir", str(tmp_path / "run")]) == 2
    assert (f"{recipe}: run.seed: expected a non-negative integer below 2**31, got {seed}"
            in one_error_line(capsys))
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_names_the_byte(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# résumé\nmodel:\n  name_or_path: builtin:tiny-sentiment\n".encode("latin-1"))
    assert main(["train", str(bad)]) == 2
    assert f"{bad}: not UTF-8 text: byte 3 (line 1) is 0xe9; expected a UTF-8 file" in one_error_line(capsys)
