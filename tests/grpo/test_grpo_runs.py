"""GRPO runs on the shared run infrastructure: two processes from the CLI, exact resume, a clean stop on SIGTERM,
damaged checkpoints, and the recipe checks that keep a run's settings its own."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import cli_in_process, launch_command
from test_grpo_recipes import RECIPE, REPO, llm_iif, small

from llm_iif.recipes import GRPORecipe, load_recipe
from llm_iif.core.errors import UserError


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_from_the_cli(random_adder_dir, tmp_path):
    """`accelerate launch -m llm_iif train` on 2 CPU processes: one set of outputs, written by the main process,
    and a held-out evaluation that covers every row exactly once between the two processes. DAPO with refill
    runs, then IIF among the completions it keeps; each process takes half the trusted triples and its own DPO
    draws. run.batch_size 32 over 2 processes of 8-completion micro-batches: 2 accumulation steps, 32 a step."""
    out = tmp_path / "run"
    proc = subprocess.run([*launch_command("-m", 2), "llm_iif", "train", str(RECIPE), "--output-dir", str(out),
                           *small(random_adder_dir, "run.steps=2", "grpo.per_device_train_batch_size=8",
                                  "run.batch_size=32",
                                  "run.eval_decoding=greedy", "group_filter.kind=dapo", "group_filter.refill=true",
                                  f"trusted.source={trusted_file(tmp_path)}", "trusted.dpo_coef=0.5")],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]  # one writer: no line twice
    assert all({"refill_batches", "informative_fraction", "influence_mean"} <= m.keys() for m in lines)
    for step, m in enumerate(lines):
        records = pd.read_parquet(out / "records" / f"round_{step:04d}.parquet")
        assert len(records) == 32 * (1 + m["refill_batches"])
    assert all({"trusted/margin", "trusted/accuracy", "dpo_loss"} <= m.keys() for m in lines)
    assert len(torch.load(out / "final" / "iif_state.pt", weights_only=True)["trusted_generators"]) == 2
    assert all(m["eval_completions"] == 16 for m in lines)  # data.eval_size rows, split over the processes
    assert json.loads((out / "environment.json").read_text())["processes"] == 2
    assert (out / "final" / "adapter_config.json").is_file() and (out / "report.html").is_file()
    assert proc.stdout.count("done: 2 steps") == 1


def trusted_file(directory: Path) -> Path:
    """40 trusted triples of sums (more than a step's 16 DPO draws, so that where the draws stand matters)."""
    from llm_iif.lm.addition import addition_problems

    path = directory / "trusted.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": r["prompt"], "chosen": r["answer"],
                                          "rejected": str(int(r["answer"]) + 1)}) for r in addition_problems(40, 9)))
    return path


def uninterrupted_settings(model_dir, out: Path) -> list[str]:
    """The overrides of the `uninterrupted` run (its trusted triples written beside ``out``)."""
    trusted = trusted_file(out.parent)
    return small(model_dir, "run.steps=4", "run.save_every=2", f"trusted.source={trusted}", "trusted.dpo_coef=0.5")


@pytest.fixture(scope="module")
def uninterrupted(random_adder_dir, tmp_path_factory):
    """A 4-step run that saves every 2 steps, trained without a stop, with a DPO term on trusted triples (whose
    per-process generator a resume must restore)."""
    out = tmp_path_factory.mktemp("grpo") / "whole"
    proc = llm_iif("train", RECIPE, "--output-dir", out, *uninterrupted_settings(random_adder_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)  # not a run output: --overwrite would leave it
    return out


def test_a_run_writes_the_ppo_run_layout(uninterrupted):
    out = uninterrupted
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and [m["round"] for m in lines] == [0, 1, 2, 3]
    for m in lines:
        assert 0 <= m["reward_mean"] <= 1 and 0 < m["kept_fraction"] <= 1
        assert {"eval/exact_match_reward", "eval/format_reward", "kl", "target_split_cos"} <= m.keys()
        assert {"trusted/margin", "trusted/accuracy", "dpo_loss"} <= m.keys()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["algorithm"] == "grpo"
    assert "held-out exact_match_reward" in (out / "stdout.txt").read_text()
    assert {"recipe.yaml", "environment.json", "metrics.jsonl", "timings.jsonl", "samples.jsonl", "records",
            "report.html", "reward_curve.png", "final", "checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert all(t["time_round_s"] > 0 and t["time_eval_s"] > 0 and t["time_trusted_s"] > 0 for t in timings)
    assert sorted(os.listdir(out / "records")) == [f"round_000{k}.parquet" for k in range(4)]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["round"] for s in samples} == {0, 1, 2, 3} and all("influence" in s for s in samples)
    report = (out / "report.html").read_text()
    assert "Influence scores" in report and "Samples of round 3" in report
    manifest = json.loads((out / "checkpoint-2" / "manifest.json").read_text())
    assert manifest["steps_completed"] == 2 and "iif_state.pt" in manifest["files"]
    state = torch.load(out / "checkpoint-2" / "iif_state.pt", weights_only=True)
    assert len(state["trusted_generators"]) == 1  # one DPO generator per process


def test_resume_continues_exactly(uninterrupted, tmp_path):
    """A run killed after its checkpoint at step 2 (later checkpoints gone, later metrics left behind) resumes
    with `--resume RUN_DIR` to the same metrics, line for line, as the run that was never stopped."""
    out = tmp_path / "killed"
    shutil.copytree(uninterrupted, out)
    for later in ("checkpoint-4", "final", "report.html", "stdout.txt"):
        shutil.rmtree(out / later) if (out / later).is_dir() else (out / later).unlink()
    proc = llm_iif("train", "--resume", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(out) == metrics(uninterrupted)
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(
        (uninterrupted / "samples.jsonl").read_text().splitlines())


def test_sigterm_saves_and_prints_a_working_resume_command(random_adder_dir, uninterrupted, tmp_path):
    out = tmp_path / "stopped"
    args = [sys.executable, "-m", "llm_iif", "train", str(RECIPE), "--output-dir", str(out),
            *uninterrupted_settings(random_adder_dir, uninterrupted)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)  # signal soon after the first step: 4 steps can end within a longer poll
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    line = next(line for line in stderr.splitlines() if "Resume with:" in line)
    assert line.startswith("llm-iif: stopped by SIGTERM after step ")
    command = line.split("Resume with: ")[1].split()
    assert command[:3] == ["llm-iif", "train", "--resume"] and not (out / "final").exists()
    resumed = llm_iif(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(out) == metrics(uninterrupted)


def test_resume_of_a_damaged_checkpoint_is_one_line(uninterrupted, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "final")
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    proc = llm_iif("train", "--resume", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"llm-iif: error: --resume: {out / 'checkpoint-4'}: damaged checkpoint "
                                   f"(optimizer.pt does not match its checksum); the previous good one is "
                                   f"{out / 'checkpoint-2'}: --resume {out / 'checkpoint-2'}")


@pytest.mark.parametrize("override,message", [
    ("grpo.seed=5", "grpo.seed: set by the run section (run.seed); remove it from grpo"),
    ("grpo.max_steps=3", "grpo.max_steps: set by the run section (run.steps)"),
    ("grpo.output_dir=elsewhere", "grpo.output_dir: set by the run section (run.output_dir)"),
    ("iif.lds_rounds=[1]", "iif.lds_rounds: unknown key"),
    ("iif.train_grad=full", "iif.train_grad: unknown key"),
    ("iif.target=gold", "iif.target: expected one of ['seq', 'preference'], got 'gold'"),
    ("iif.target=preference", "iif.target_source: expected fresh with iif.target preference (the training batch "
                              "holds no preferences), got 'batch'"),
    ("iif.target=preference,iif.target_source=fresh", "iif.target preference needs trusted (prompt, chosen, "
                                                      "rejected) triples"),
    ("iif.target_source=cached", "iif.target_source: expected one of ['batch', 'fresh'], got 'cached'"),
    ("run.eval_batch_size=0", "run.eval_batch_size: expected a positive integer"),
    ("run.batch_size=0", "run.batch_size: expected a positive integer or null"),
    ("run.batch_size=64,grpo.gradient_accumulation_steps=2", "grpo.gradient_accumulation_steps: set by "
                                                             "run.batch_size (completions per step over all "
                                                             "processes); remove one of them"),
])
def test_recipe_keys_grpo_does_not_own_are_refused(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_recipe(RECIPE, override.split(","), kind=GRPORecipe)


def test_grpo_defaults_to_the_batch_target_source(tmp_path):
    raw = yaml.safe_load(RECIPE.read_text())
    del raw["iif"]["target_source"]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    assert load_recipe(recipe_file, kind=GRPORecipe).iif.target_source == "batch"


def test_save_every_must_not_split_a_generation_batch(random_adder_dir, tmp_path, capsys):
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", tmp_path / "run",
                                *small(random_adder_dir, "run.steps=4", "run.save_every=3",
                                       "grpo.steps_per_generation=2"))
    assert code == 2
    assert ("run.save_every: 3 steps would save inside a generation batch; expected a multiple of the optimiser "
            "steps per batch, steps_per_generation × num_iterations / gradient_accumulation_steps = 2 × 1 / 1"
            ) in stderr
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # nothing written before the run could start


def test_a_global_batch_the_processes_do_not_divide_is_one_line(random_adder_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as `accelerate launch --num_processes 3` exports it
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", tmp_path / "run",
                                *small(random_adder_dir, "run.batch_size=64"))
    assert code == 2 and stderr.strip().count("\n") == 0
    assert ("run.batch_size: 64 completions a step do not divide over 3 process(es) × "
            "grpo.per_device_train_batch_size 16; expected a multiple of 48") in stderr
    assert not (tmp_path / "run").exists()


def test_a_system_prompt_needs_a_chat_template(random_adder_dir, tmp_path, capsys):
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", tmp_path / "run",
                                *small(random_adder_dir, "data.system_prompt=Add the numbers."))
    assert code == 2 and stderr.strip().count("\n") == 0
    assert "data.system_prompt: the tokenizer of " in stderr and "has no chat template" in stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_unsupported_sharded_launches_are_refused_with_iif(random_adder_dir, tmp_path, monkeypatch):
    from grpo_setup import make_trainer

    from llm_iif.recipes import GRPOIIFConfig
    from llm_iif.core import distributed

    refusal = "DeepSpeed ZeRO-3 (zero_stage: 3) is not supported with influence scoring; use FSDP2, DDP or ZeRO-2"
    monkeypatch.setattr(distributed, "sharding_refusal", lambda accelerator: refusal)
    with pytest.raises(UserError, match=re.escape(f"{refusal} (or set iif.mode: random)")):
        make_trainer(random_adder_dir, tmp_path, iif=GRPOIIFConfig(enabled=True))
    make_trainer(random_adder_dir, tmp_path, iif=GRPOIIFConfig(enabled=True, mode="random", p=0.5))


def test_a_reward_function_that_raises_is_one_line(random_adder_dir, tmp_path):
    from grpo_setup import make_trainer

    def broken_reward(prompts, completions, **columns):
        raise KeyError("answer")

    trainer = make_trainer(random_adder_dir, tmp_path, reward_funcs=[broken_reward])
    with pytest.raises(UserError, match=r"^rewards.broken_reward: raised KeyError \('answer'\)$"):
        trainer.train()


def test_damaged_model_weights_are_one_line_and_write_nothing(random_adder_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(random_adder_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "run"
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", out,
                                *small(random_adder_dir, "run.steps=1", f"model.name_or_path={model}"))
    assert code == 2
    assert stderr.strip() == (f"llm-iif: error: model.name_or_path: cannot load '{model}' as a causal LM "
                                   "(model.safetensors: damaged or truncated)")
    assert not out.exists() or not any(out.iterdir())
