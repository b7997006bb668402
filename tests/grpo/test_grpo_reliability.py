"""Issue 24's probe of GRPO runs: each case gives one line and exit code 2 (or the right result), and loses
nothing. The CLI runs in this process where the case fails before training (see `llm_iif_here`)."""

import importlib.util
import json
import shutil

import pytest
import yaml

from conftest import cli_in_process
from test_grpo_recipes import RECIPE, llm_iif, small

from llm_iif.core.fileio import append_jsonl


def train_here(capsys, model_dir, out, *overrides, flags=(), recipe=RECIPE):
    return cli_in_process(capsys, "train", recipe, "--output-dir", out, *flags,
                        *small(model_dir, "run.steps=1", *overrides))


def with_rewards(tmp_path, rewards: dict):
    """The shipped recipe with other reward functions (``rewards`` is top level, out of --set's reach)."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["rewards"] = rewards
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # the first reward function is the curve
    return path


@pytest.mark.parametrize("reward,message", [
    ("grpo_rewards:none_reward", "rewards.none_reward: returned no finite reward for any of the 16 held-out"),
    ("grpo_rewards:text_reward", "rewards.text_reward: returned 'good' (str); expected a number or None"),
    ("grpo_rewards:short_reward", "rewards.short_reward: returned 15 rewards for 16 completions"),
    ("grpo_rewards:NOT_A_FUNCTION", "rewards.grpo_rewards:NOT_A_FUNCTION: is a int, not a function"),
])
def test_reward_functions_that_misbehave(random_adder_dir, tmp_path, capsys, reward, message):
    code, stderr = train_here(capsys, random_adder_dir, tmp_path / "run", recipe=with_rewards(tmp_path, {reward: 1.0}))
    # the progress bar may stand above it, closed on a line of its own
    assert code == 2 and stderr.splitlines()[-1].startswith(f"llm-iif: error: {message}"), stderr
    assert stderr.count("llm-iif: error") == 1 and stderr.endswith("\n")


def test_a_nan_reward_on_held_out_completions_is_written_as_null(random_adder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = with_rewards(tmp_path, {"llm_iif.lm.addition:exact_match_reward": 1.0,
                                     "grpo_rewards:nan_when_evaluated": 0.1})
    code, stderr = train_here(capsys, random_adder_dir, out, recipe=recipe)
    assert code == 0, stderr
    line = (out / "metrics.jsonl").read_text().splitlines()[0]
    assert '"eval/nan_when_evaluated": null' in line and "NaN" not in line
    assert json.loads(line)["reward_mean"] >= 0


def test_jsonl_lines_are_always_json(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": float("nan"), "b": float("inf"), "c": 1.5, "d": "x"})
    assert json.loads(path.read_text()) == {"a": None, "b": None, "c": 1.5, "d": "x"}


@pytest.mark.parametrize("overrides,message", [
    (["grpo.learning_rate=abc"], "grpo.learning_rate: expected a number, got 'abc'"),
    (["grpo.num_generations=four"], "grpo.num_generations: expected an integer or null, got 'four'"),
    (["lora.target_modules=[]"], "lora.target_modules: expected module names, or null"),
    (["lora.target_modules=[no_such_layer]"], "lora.target_modules: ['no_such_layer'] match no layer of"),
    (["run.report_to=[wandb]"], "run.report_to: wandb needs `pip install wandb`"),
    (["run.report_to=[trackio]"], "run.report_to: trackio needs `pip install trackio`"),
    (["run.report_to=[mlflow]"], "run.report_to[0]: expected one of ['tensorboard', 'wandb', 'trackio'], got 'mlflow'"),
    (["iif.folds=5"], "iif.folds: 5 folds of a generation batch of 4 prompts (folds take whole groups of 4"),
])
def test_bad_settings_are_one_line(random_adder_dir, tmp_path, capsys, overrides, message):
    for backend in ("wandb", "trackio"):
        if f"[{backend}]" in overrides[0] and importlib.util.find_spec(backend) is not None:
            pytest.skip(f"{backend} is installed")
    code, stderr = train_here(capsys, random_adder_dir, tmp_path / "run", *overrides)
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.fixture(scope="module")
def one_step_run(random_adder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "run"
    proc = llm_iif("train", RECIPE, "--output-dir", out, *small(random_adder_dir, "run.steps=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_failed_start_with_overwrite_deletes_nothing(one_step_run, random_adder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    (out / "recipe.yaml").write_text("# my notes\n")
    before = sorted(p.name for p in out.iterdir())
    code, stderr = train_here(capsys, random_adder_dir, out, "iif.mode=bottom", flags=["--overwrite"])
    assert code == 2 and "would drop every completion" in stderr
    assert sorted(p.name for p in out.iterdir()) == before and (out / "recipe.yaml").read_text() == "# my notes\n"


def test_overwrite_removes_a_symlinked_final_not_its_target(one_step_run, random_adder_dir, tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(one_step_run, out)
    shutil.move(out / "final", elsewhere)
    (out / "final").symlink_to(elsewhere, target_is_directory=True)
    (out / "mine.txt").write_text("not the run's")
    code, stderr = train_here(capsys, random_adder_dir, out, flags=["--overwrite"])
    assert code == 0, stderr
    assert (elsewhere / "adapter_config.json").is_file() and (out / "mine.txt").read_text() == "not the run's"
    assert (out / "final").is_dir() and not (out / "final").is_symlink()


def test_a_used_directory_lists_everything_and_quotes_the_resume_command(one_step_run, random_adder_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "$(touch X)"
    shutil.copytree(one_step_run, out)
    code, stderr = train_here(capsys, random_adder_dir, out)
    assert code == 2
    for name in ("recipe.yaml", "metrics.jsonl", "records", "final", "README.md", "report.html"):
        assert name in stderr
    assert f"--resume '{out}'" in stderr and "more" not in stderr


def test_report_marks_an_incomplete_run_and_skips_a_torn_line(one_step_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    shutil.rmtree(out / "final")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round": 1, "step"')  # killed mid-write
    code, stderr = cli_in_process(capsys, "report", out)
    page = (out / "report.html").read_text()
    assert code == 0, stderr
    assert "(incomplete: no final/)" in page and "(1 torn metrics line skipped)" in page
    assert "Not recorded" not in page  # environment.json is written when a run starts
    (out / "metrics.jsonl").write_text("")
    code, stderr = cli_in_process(capsys, "report", out)
    assert code == 2 and "metrics.jsonl: no complete line yet" in stderr


def test_interrupt_outside_training_is_one_line(monkeypatch, capsys):
    from llm_iif import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "report", interrupted)
    assert cli.main(["report", "anywhere"]) == 130
    assert capsys.readouterr().err == "llm-iif: interrupted\n"


# ------------------------------------------------------------------------------- issue 36: resume and triples
def test_resuming_under_another_number_of_processes_is_refused(one_step_run, tmp_path):
    """As for PPO: each process's RNG state and share of the batch are in the checkpoint, so a 1-process run
    resumed by 2 would double the batch and leave the RNG states behind."""
    import os
    import subprocess

    from conftest import launch_command
    from test_grpo_recipes import REPO

    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    before = (out / "metrics.jsonl").read_bytes()
    proc = subprocess.run([*launch_command("-m", 2), "llm_iif", "train", "--resume", str(out), "--set", "run.steps=2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode != 0
    assert (f"llm-iif: error: --resume: {out / 'final'} was written by 1 process(es); resume it with the same "
            "number, not 2") in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


class Planted:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "iif_state.pt"])
def test_a_planted_pickle_is_refused_in_one_line_naming_its_file(one_step_run, random_adder_dir, tmp_path, capsys,
                                                                  name):
    import torch

    from llm_iif.runs.state import TRL_MANIFEST_FILE, write_manifest

    out, marker = tmp_path / "run", tmp_path / "planted-code-ran"
    shutil.copytree(one_step_run, out)
    final = out / "final"
    torch.save({"state": Planted(marker)}, final / name)
    manifest = json.loads((final / TRL_MANIFEST_FILE).read_text())
    write_manifest(final, {k: v for k, v in manifest.items() if k != "files"}, TRL_MANIFEST_FILE)  # checksums fixed
    before = sorted(p.name for p in out.iterdir())
    code, stderr = cli_in_process(capsys, "train", "--resume", out, "--set", "run.steps=2")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"llm-iif: error: {final / name}: refused: it holds more than tensors and plain values")
    assert "mkdir" in stderr and not marker.exists()  # torch names the object it refused
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("key, value, message", [
    ("steps_completed", "abc", "steps_completed: expected an integer, 0 or more, got 'abc'"),
    ("files", ["optimizer.pt"], "files: expected a mapping of file names to SHA-256 checksums, got ['optimizer.pt']"),
    # the count of a finished 1-step run edited to 3, resumed to 3: no "nothing to do" without 3 steps trained
    ("steps_completed", 3, "steps_completed is 3, but trl's trainer_state.json (global_step) has 1"),
])
def test_a_manifest_edited_by_hand_is_one_line(one_step_run, tmp_path, capsys, key, value, message):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    manifest = out / "final" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), key: value}))
    code, stderr = cli_in_process(capsys, "train", "--resume", out, "--set", "run.steps=3")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"final: damaged checkpoint (manifest.json: {message})" in stderr


def write_triples(path, rows):
    path.write_text("\n".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), row))) for row in rows))
    return path


@pytest.mark.parametrize("rows, message", [
    ([("12+34=", "46", "47"), ("50+70=", "120é", "12")],
     "trusted.source: row 1 of '{file}' has a chosen text with characters the tokenizer has no token for "
     "('é' in '120é'); expected text the model's vocabulary covers"),
    ([("12+34=", "46", "47"), ([{"role": "user", "content": "5é+70="}], "120", "12")],
     "trusted.source: row 1 of '{file}' has a prompt text with characters the tokenizer has no token for "
     "('é' in '5é+70=')"),
    ([("", "46", "47"), ("", "120", "12")],
     "trusted.source: row 0 of '{file}' has an empty text as its prompt; expected non-empty text or a list of "
     "role/content messages"),
])
def test_trusted_triples_the_model_cannot_read_are_one_line(random_adder_dir, tmp_path, capsys, rows, message):
    triples = write_triples(tmp_path / "trusted.jsonl", rows)
    code, stderr = train_here(capsys, random_adder_dir, tmp_path / "run", "iif.target=preference",
                              "iif.target_source=fresh", f"trusted.source={triples}")
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("llm-iif: error: "), stderr
    assert message.format(file=triples) in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def sigterm_before(monkeypatch, owner, name: str, when=lambda *args: True) -> None:
    """Send this process SIGTERM as ``owner.name`` is called (when ``when(*its arguments)``), then call it."""
    import os
    import signal

    original = getattr(owner, name)

    def signalled(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)


def test_a_signal_in_the_last_step_stops_and_the_resume_saves_final(one_step_run, random_adder_dir, tmp_path,
                                                                    capsys, monkeypatch, harmless_sigterm):
    from llm_iif.grpo import run

    out = tmp_path / "run"
    sigterm_before(monkeypatch, run.CheckpointsAndSignals, "on_step_end")  # in step 1 of 1
    code, stderr = train_here(capsys, random_adder_dir, out)
    assert code == 0, stderr
    assert f"stopped by SIGTERM after step 1 of 1; checkpoint {out / 'checkpoint-1'}." in stderr
    assert not (out / "final").exists()
    monkeypatch.undo()
    code, stderr = cli_in_process(capsys, "train", "--resume", out)
    assert code == 0, stderr
    assert (out / "final" / "manifest.json").is_file() and (out / "report.html").is_file()
    assert (out / "metrics.jsonl").read_text() == (one_step_run / "metrics.jsonl").read_text()


def test_a_signal_during_the_final_save_lets_it_finish_and_is_reported(random_adder_dir, tmp_path, capsys,
                                                                       monkeypatch, harmless_sigterm):
    from llm_iif.grpo import run

    out = tmp_path / "run"
    sigterm_before(monkeypatch, run, "save_final")
    code, stderr = train_here(capsys, random_adder_dir, out)
    assert code == 0, stderr
    assert f"stopped by SIGTERM after step 1 of 1; checkpoint {out / 'final'}." in stderr
    assert json.loads((out / "final" / "manifest.json").read_text())["steps_completed"] == 1


def test_resuming_a_finished_run_has_nothing_to_do_and_writes_nothing(one_step_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stderr = cli_in_process(capsys, "train", "--resume", out)
    assert code == 0 and "has completed all 1 steps; nothing to do (--set run.steps=N extends the run)" in stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
