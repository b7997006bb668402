"""End to end on the built-in tiny model: a short run, its outputs, checkpoint reload, bad rewards."""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import launch_command, tiny_recipe_dict
from llm_iif.recipes import recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.attribution.stage import IIFStage
from llm_iif.training import PPOTrainer, build_trainer

REQUIRED_METRICS = {"round", "samples", "reward_mean", "reward_std", "kl", "kl_coef", "entropy", "policy_loss",
                    "value_loss", "clipfrac", "approx_kl", "response_len_mean", "distinct_2"}
REQUIRED_TIMINGS = {"round", "time_generate_s", "time_reward_s", "time_forward_s", "time_update_s", "time_round_s"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("run")
    trainer = build_trainer(recipe_from_dict(tiny_recipe_dict(out)))
    history = trainer.train()
    return out, trainer, history


def test_two_rounds_write_metrics_samples_and_plot(finished_run):
    out, _, history = finished_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [m["round"] for m in timings] == [0, 1]
    assert [{**m, **t} for m, t in zip(lines, timings)] == history  # wall-clock fields live apart
    assert all(t.keys() == REQUIRED_TIMINGS for t in timings)
    for m in lines:
        assert REQUIRED_METRICS <= m.keys()
        assert m["samples"] == 8
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
        assert 0.0 < m["distinct_2"] <= 1.0
        assert 1 <= m["response_len_mean"] <= 8
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # round 0: the adapter is still the identity
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"round", "prompt", "response", "reward"} <= samples[0].keys()
    assert any((out / "tensorboard").iterdir())


def test_training_moves_the_adapter_and_the_reference_stays_put(finished_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _, trainer, _ = finished_run
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    ids = trainer.tokenizer(["the movie was great"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(**ids).logits
        ref_logits = policy.reference_logits(ids["input_ids"], ids["attention_mask"])
        policy_logits, _ = policy(ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(ref_logits, base_logits)
    assert (policy_logits - base_logits).abs().max() > 1e-4


def test_saved_adapter_reloads_with_peft_and_generates(finished_run, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trainer, _ = finished_run
    final = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final).eval()
    ids = tokenizer(["the movie was great"], return_tensors="pt")
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    with torch.no_grad():
        expected, _ = policy(ids["input_ids"], ids["attention_mask"])
        torch.testing.assert_close(model(**ids).logits, expected)
        generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    head = load_file(final / "value_head.safetensors")
    torch.testing.assert_close(head["weight"], policy.value_head.weight.detach())
    assert json.loads((final / "trainer_state.json").read_text())["rounds_completed"] == 2


def test_same_seed_same_run(tmp_path, tiny_model_dir):
    recipe = tiny_recipe_dict(tmp_path / "a")
    recipe["run"]["rounds"] = 1
    first = build_trainer(recipe_from_dict(recipe)).train()
    recipe["run"]["output_dir"] = str(tmp_path / "b")
    second = build_trainer(recipe_from_dict(recipe)).train()
    keys = ["reward_mean", "kl", "policy_loss", "value_loss", "distinct_2"]
    assert [first[0][k] for k in keys] == pytest.approx([second[0][k] for k in keys])


def nan_and_inf_for_the_first_two(reward_model):
    return lambda prompts, responses: [math.nan if i == 0 else math.inf if i == 1 else s
                                       for i, s in enumerate(reward_model(prompts, responses))]


def test_nonfinite_rewards_stop_the_run_by_default(tmp_path, tiny_model_dir):
    trainer = build_trainer(recipe_from_dict({**tiny_recipe_dict(tmp_path), "run": {
        "rounds": 1, "batch_size": 8, "output_dir": str(tmp_path)}}))
    trainer.collector.reward_function = nan_and_inf_for_the_first_two(trainer.collector.reward_function)
    with pytest.raises(UserError, match=r"reward.name: 'vader' returned NaN or inf for 2 of 8 samples; "
                                        r"e.g. prompt .+, response .+ \(1 round\(s\) in a row\)"):
        trainer.train()


def test_nonfinite_rewards_within_patience_are_dropped_not_propagated(tmp_path, tiny_model_dir, caplog):
    trainer = build_trainer(recipe_from_dict({**tiny_recipe_dict(tmp_path), "run": {
        "rounds": 2, "batch_size": 8, "output_dir": str(tmp_path), "nonfinite_patience": 1}}))
    trainer.collector.reward_function = nan_and_inf_for_the_first_two(trainer.collector.reward_function)
    with pytest.raises(UserError, match=r"2 of 8 samples.*\(2 round\(s\) in a row\)"):
        trainer.train()
    first = trainer.history[0]  # round 0 dropped its two samples; round 1 exceeded the patience
    assert first["nonfinite_reward"] == 2 and first["samples"] == 6
    assert all(math.isfinite(v) for v in first.values() if isinstance(v, float))
    assert "skipped (1 of run.nonfinite_patience=1 rounds in a row)" in caplog.text
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_reward_count_mismatch_is_an_error(tmp_path, tiny_model_dir):
    trainer = build_trainer(recipe_from_dict({**tiny_recipe_dict(tmp_path), "run": {
        "rounds": 1, "batch_size": 8, "output_dir": str(tmp_path)}}))
    trainer.collector.reward_function = lambda prompts, responses: [0.0] * (len(responses) - 1)
    with pytest.raises(UserError, match=r"reward.name: 'vader' returned \(7,\) scores for 8 samples"):
        trainer.train()


def test_detached_value_head_keeps_value_gradients_out_of_the_backbone(tmp_path, tiny_model_dir):
    recipe = tiny_recipe_dict(tmp_path)
    recipe["model"]["detach_value_head"] = True
    trainer = build_trainer(recipe_from_dict(recipe))
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    ids = trainer.tokenizer(["the movie was great"], return_tensors="pt")
    _, values = policy(ids["input_ids"], ids["attention_mask"])
    values.sum().backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert all(g is None or g.abs().max() == 0 for g in lora_grads)
    assert policy.value_head.weight.grad.abs().max() > 0


def test_unloadable_model_exits_2_with_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: no-such-org/no-such-model}\ndata: {source: builtin:review-prompts}\n"
                      "reward: {name: vader}\nrun: {rounds: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "llm_iif", "train", str(recipe), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.name_or_path: cannot load" in proc.stderr and "no-such-org/no-such-model" in proc.stderr


def run_fixed_rollouts(tmp_path, name, iif, processes, *options, run=None):
    """tests/training/fixed_rollout_run.py on the tiny recipe with IIF, as one process or under `accelerate launch`
    (``options``: the script's --fsdp2 and --resume; ``run``: settings of the recipe's run section)."""
    raw = tiny_recipe_dict(tmp_path / name)
    iif = dict(iif)
    if "trusted" in iif:  # the preference target's triples: a section of their own
        raw["trusted"] = iif.pop("trusted")
    raw["iif"] = {"enabled": True, "val_size": 8, **iif}
    raw["run"].update(run or {})
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    script = os.path.join(os.path.dirname(__file__), "fixed_rollout_run.py")
    launch = launch_command(script, processes)
    proc = subprocess.run([*launch, str(recipe), str(tmp_path / name), *options], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name


def records(run_dir, k):
    return pq.read_table(run_dir / "records" / f"round_{k:04d}.parquet").to_pydict()


# Adam preconditioning scores round 1 against the optimiser's second moments, which FSDP2 keeps as shards.
FIXED_ROLLOUT_IIF = {source: {"mode": "bottom", "p": 0.5, "target_source": source, "precondition": "adam"}
                     for source in ("fresh", "batch")}
# The preference target on 16 trusted triples, 8 per process under 2 processes.
FIXED_ROLLOUT_IIF["preference"] = {**FIXED_ROLLOUT_IIF["fresh"], "target": "preference",
                                   "trusted": {"source": "builtin:trusted-preferences", "size": 16}}
# In-run scoring under 2 processes, against the separate pass of one process.
FIXED_ROLLOUT_IIF["batch-in-run"] = {**FIXED_ROLLOUT_IIF["batch"], "scoring": "in-run"}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_model_dir):
    """(2 processes under DDP, 1 process) on fixed rollouts for a target source, each pair run once per module."""
    made = {}

    def runs(target_source):
        if target_source not in made:
            base = tmp_path_factory.mktemp(target_source)
            iif = FIXED_ROLLOUT_IIF[target_source]
            one = runs("batch")[1] if target_source == "batch-in-run" else run_fixed_rollouts(base, "one", iif, 1)
            made[target_source] = (run_fixed_rollouts(base, "two", iif, 2), one)
        return made[target_source]
    return runs


@pytest.mark.parametrize("target_source", ["fresh", "batch", "preference", "batch-in-run"])
def test_two_processes_filter_as_one_and_stay_in_step(tmp_path, ddp_runs, target_source):
    """2 CPU processes with IIF on fixed rollouts: one global batch and one filtering decision, the same
    kept set as a single process, one set of metrics and one checkpoint, and identical LoRA weights on
    both ranks after 2 rounds. With the batch source, the folds follow the global row index; with the
    preference target, each process holds half the trusted triples; with in-run scoring (against one
    process's separate pass), the first epoch's all-reduced gradients keep the ranks identical."""
    two, one = ddp_runs(target_source)

    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1]
    assert all(m["samples"] == 8 and m["kept_fraction"] == 0.5 for m in lines)  # 4 per process, counted once
    # Round 0 runs at the same θ(0) in both runs: same samples, same scores, same kept set.
    by_prompt = {}
    for run in (one, two):
        rows = records(run, 0)
        by_prompt[run.name] = {p: (s, k) for p, s, k in zip(rows["prompt"], rows["influence"], rows["kept"])}
    assert by_prompt["one"].keys() == by_prompt["two"].keys() and len(by_prompt["one"]) == 8
    for prompt, (score, kept) in by_prompt["one"].items():
        assert by_prompt["two"][prompt][1] == kept
        assert by_prompt["two"][prompt][0] == pytest.approx(score, rel=1e-4, abs=1e-7)
    rank0, rank1 = (torch.load(two / f"weights_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    start = build_trainer(recipe_from_dict(tiny_recipe_dict(tmp_path / "unused")))
    initial = {n: p for n, p in start.accelerator.unwrap_model(start.policy).named_parameters() if p.requires_grad}
    assert any(not torch.equal(rank0[n], initial[n]) for n in rank0)  # training did move the adapter
    assert (two / "final" / "adapter_model.safetensors").is_file()


def test_fsdp2_preference_target_scores_and_filters_as_ddp(tmp_path, ddp_runs):
    """The preference target with the policy sharded by FSDP2 on 2 CPU processes, each with half the trusted
    triples: the same influence as DDP (to 1e-5 of the largest score) and the same kept set, in both rounds."""
    sharded = run_fixed_rollouts(tmp_path, "fsdp2", FIXED_ROLLOUT_IIF["preference"], 2, "--fsdp2", "GPT2Block")
    ddp, _ = ddp_runs("preference")
    for k in (0, 1):
        by_run = {name: {p: (s, kept) for p, s, kept in zip(*(records(run, k)[c] for c in
                                                               ("prompt", "influence", "kept")))}
                  for name, run in (("fsdp2", sharded), ("ddp", ddp))}
        assert by_run["fsdp2"].keys() == by_run["ddp"].keys() and len(by_run["ddp"]) == 8
        scale = max(abs(score) for score, _ in by_run["ddp"].values())
        for prompt, (score, kept) in by_run["ddp"].items():
            assert by_run["fsdp2"][prompt][1] == kept
            assert abs(by_run["fsdp2"][prompt][0] - score) <= 1e-5 * scale


def test_fsdp2_scores_filters_trains_and_resumes_as_ddp(tmp_path, ddp_runs):
    """2 CPU processes with the policy sharded by FSDP2 (each GPT2Block, the LM, the root): the same influence
    as DDP and as one process with the fresh target and Adam preconditioning (round 1), the same kept set, and
    after 2 rounds the same LoRA weights as DDP, in memory and in the final
    checkpoint. Resumed from its round-1 checkpoint, the sharded run ends exactly where it did. A checkpoint
    resumed under the other kind of launch, either way, is refused."""
    from safetensors.torch import load_file

    iif, run = FIXED_ROLLOUT_IIF["fresh"], {"save_every": 1}
    sharded = run_fixed_rollouts(tmp_path, "fsdp2", iif, 2, "--fsdp2", "GPT2Block", run=run)
    ddp, one = ddp_runs("fresh")
    for k in (0, 1):
        by_run = {name: {p: (s, kept) for p, s, kept in zip(*(records(run, k)[c] for c in
                                                               ("prompt", "influence", "kept")))}
                  for name, run in (("fsdp2", sharded), ("ddp", ddp), ("one", one))}
        assert by_run["fsdp2"].keys() == by_run["ddp"].keys() and len(by_run["ddp"]) == 8
        scale = max(abs(score) for score, _ in by_run["ddp"].values())
        # Round 0 scores at the same θ, summed in another order: to 1e-5 of the largest score (measured: 2e-7).
        # Round 1 scores at weights that agree to 1e-5 (asserted below), through Adam's 1/√v after one step,
        # which amplifies that: to 1e-4 (measured: up to 4.6e-5 on an AMD EPYC, family 25, model 17).
        tolerance = 1e-5 if k == 0 else 1e-4
        for prompt, (score, kept) in by_run["ddp"].items():
            for other in ("fsdp2", "one") if k == 0 else ("fsdp2",):  # one process's round 1 starts elsewhere
                assert by_run[other][prompt][1] == kept
                assert abs(by_run[other][prompt][0] - score) <= tolerance * scale
    rank0, rank1, expected = (torch.load(run / f"weights_rank{r}.pt") for run, r in ((sharded, 0), (sharded, 1),
                                                                                      (ddp, 0)))
    # Adam moves each weight by up to lr = 1e-3 a step whatever its gradient's size, so the float noise of a
    # near-zero gradient can move it by a small part of a step: to 1% of one (measured: up to 2.2e-6).
    atol = 1e-5
    for name in expected:
        torch.testing.assert_close(rank0[name], expected[name], rtol=1e-5, atol=atol)
        assert torch.equal(rank0[name], rank1[name])
    saved, reference = (load_file(run / "final" / "adapter_model.safetensors") for run in (sharded, ddp))
    assert saved.keys() == reference.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], reference[name], rtol=1e-5, atol=atol)

    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "metrics.jsonl").write_text((sharded / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    run_fixed_rollouts(tmp_path, "resumed", iif, 2, "--fsdp2", "GPT2Block", "--resume", str(resumed / "checkpoint-1"),
                       run=run)
    again = torch.load(resumed / "weights_rank0.pt")
    assert all(torch.equal(again[name], rank0[name]) for name in rank0)
    assert (resumed / "metrics.jsonl").read_text() == (sharded / "metrics.jsonl").read_text()

    # The same checkpoint under a DDP launch: refused, since the optimiser states are laid out differently.
    recipe = tmp_path / "resumed.yaml"
    proc = subprocess.run([*launch_command(os.path.join(os.path.dirname(__file__), "fixed_rollout_run.py"), 2),
                           str(recipe), str(resumed), "--resume", str(resumed / "checkpoint-1")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode != 0
    assert "written by an FSDP2 launch; resume it with one like it, not a DDP or single-process one" in proc.stderr

    # and a DDP run's checkpoint under an FSDP2 launch
    from_ddp, recipe = tmp_path / "from-ddp", tmp_path / "from-ddp.yaml"
    shutil.copytree(ddp, from_ddp)
    raw = yaml.safe_load((ddp.parent / "two.yaml").read_text())
    raw["run"]["output_dir"] = str(from_ddp)
    recipe.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([*launch_command(os.path.join(os.path.dirname(__file__), "fixed_rollout_run.py"), 2),
                           str(recipe), str(from_ddp), "--fsdp2", "GPT2Block",
                           "--resume", str(from_ddp / "final")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode != 0
    assert "final: written by a DDP or single-process launch; resume it with one like it, not an FSDP2 one" \
        in proc.stderr


def test_two_processes_keeping_one_sample_do_not_deadlock(tmp_path, tiny_model_dir):
    """Filtering keeps a single sample (p = 1): the process left without one takes zero-weight steps."""
    two = run_fixed_rollouts(tmp_path, "two", {"mode": "bottom", "p": 1.0}, processes=2)
    assert all(sum(records(two, k)["kept"]) == 1 for k in (0, 1))
    rank0, rank1 = (torch.load(two / f"weights_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)


def test_building_the_tiny_model_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    from llm_iif.lm import builtin as tiny

    monkeypatch.setenv("LLM_IIF_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "build_tiny_model", lambda out, seed: (torch.rand(5), (out / "config.json").touch()))
    torch.manual_seed(123)
    tiny.ensure_tiny_model()
    after_build = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(torch.rand(3), after_build)


def test_built_in_models_build_with_a_fixed_thread_count(tmp_path, monkeypatch):
    """A built model's weights depend on torch's thread count (with 1 thread and with 2, the tiny GPT-2's
    differ): every build uses BUILD_THREADS, and the caller's count comes back afterwards."""
    from llm_iif.lm import builtin as tiny

    monkeypatch.setenv("LLM_IIF_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(tiny, "build_tiny_model",
                        lambda out, seed: (seen.append(torch.get_num_threads()), (out / "config.json").touch()))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as under OMP_NUM_THREADS=1, or one pytest worker's share
    try:
        tiny.ensure_tiny_model()
        assert seen == [tiny.BUILD_THREADS] == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_rows_padded_to_common_widths_stack_without_changing_masked_values():
    from llm_iif.core.records import Rollout, concat_rows, pad_to_widths

    def rollout(b, p, t, fill):
        ones = torch.ones(b, t)
        return Rollout([f"p{fill}"] * b, [f"r{fill}"] * b, torch.full((b, p), fill), torch.ones(b, p, dtype=torch.long),
                       torch.full((b, t), fill), torch.ones(b, t, dtype=torch.long), torch.full((b,), float(fill)),
                       ones * fill, ones, ones, ones)

    short, long = rollout(2, 3, 4, 7), rollout(1, 5, 6, 9)
    both = concat_rows([pad_to_widths(r, 5, 6, pad_token_id=0) for r in (short, long)])
    assert both.prompts == ["p7", "p7", "p9"] and both.query_ids.shape == (3, 5) and both.response_ids.shape == (3, 6)
    assert both.query_ids[0].tolist() == [0, 0, 7, 7, 7] and both.query_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert both.response_mask[0].tolist() == [1, 1, 1, 1, 0, 0] and both.logprobs[0].tolist()[-2:] == [0, 0]
    assert (both.logprobs * both.response_mask).sum() == 2 * 4 * 7 + 6 * 9


def guarded_trainer(tmp_path, rounds=1, patience=1, **iif):
    raw = tiny_recipe_dict(tmp_path)
    raw["run"].update(rounds=rounds, nonfinite_patience=patience)
    if iif:
        raw["iif"] = {"enabled": True, "val_size": 8, **iif}
    return build_trainer(recipe_from_dict(raw))


def nan_value_for_first_sample(trainer, when_grad: bool):
    """Make the value head return NaN for row 0 of every batch, only in no-grad passes (the rollout) or only
    in gradient passes (the update)."""
    head = trainer.accelerator.unwrap_model(trainer.policy).value_head

    def hook(module, inputs, output):
        if torch.is_grad_enabled() == when_grad:
            poison = torch.zeros_like(output)
            poison[0] = math.nan
            return output + poison  # an addition passes the NaN on to the gradients too
        return output
    head.register_forward_hook(hook)


def test_nonfinite_values_drop_their_samples(tmp_path, tiny_model_dir):
    trainer = guarded_trainer(tmp_path)
    nan_value_for_first_sample(trainer, when_grad=False)
    (metrics,) = trainer.train()
    # forward_batch_size 64 > 8 samples: one batch, one NaN row.
    assert metrics["nonfinite_policy"] == 1 and metrics["samples"] == 7
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_nonfinite_gradients_skip_the_step_and_leave_weights_alone(tmp_path, tiny_model_dir):
    trainer = guarded_trainer(tmp_path)
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    nan_value_for_first_sample(trainer, when_grad=True)
    (metrics,) = trainer.train()
    assert metrics["nonfinite_grad_steps"] == 4  # 2 epochs x 2 minibatches of 4, every one poisoned
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters() if p.requires_grad)
    with pytest.raises(UserError, match=r"the gradient was NaN or inf in 4 of 4 optimiser steps \(1 round\(s\) "
                                        r"in a row\); run.nonfinite_patience > 0 skips them instead"):
        strict = guarded_trainer(tmp_path / "strict", patience=0)
        nan_value_for_first_sample(strict, when_grad=True)
        strict.train()


class InfiniteLossStage(IIFStage):
    """The IIF stage with sample 3's training loss scaled to inf, so its influence score is not finite."""

    def select(self, model, per_sample_loss, batch_size, precondition=None):
        def poisoned(model, rows):
            return per_sample_loss(model, rows) * torch.where(rows == 3, math.inf, 1.0)
        return super().select(model, poisoned, batch_size, precondition)


def test_nonfinite_influence_is_not_trained_on(tmp_path, tiny_model_dir):
    built = guarded_trainer(tmp_path, rounds=2, patience=1, mode="none")
    stage = built.iif
    trainer = PPOTrainer(dataclasses.replace(built.parts, iif=InfiniteLossStage(
        stage.config, stage.accelerator, stage.target_source, stage.sequence_logprobs, stage.guard, stage.generator)))
    with pytest.raises(UserError, match=r"influence scores are NaN or inf for 1 of 8 samples \(2 round\(s\)"):
        trainer.train()
    (first,) = trainer.history
    assert first["nonfinite_influence"] == 1 and first["kept_fraction"] == 7 / 8


def test_trackers_follow_report_to(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path / "none")
    raw["run"].update(rounds=1, report_to=[])
    build_trainer(recipe_from_dict(raw)).train()
    assert not (tmp_path / "none" / "tensorboard").exists()
    raw["run"].update(report_to=["tensorboard"], output_dir=str(tmp_path / "tb"))
    build_trainer(recipe_from_dict(raw)).train()
    events = list((tmp_path / "tb" / "tensorboard" / "tb").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 1000
    with pytest.raises(UserError,
                       match=r"run.report_to\[0\]: expected one of \[.tensorboard., .wandb., .trackio.\], got .mlflow."):
        recipe_from_dict({**raw, "run": {**raw["run"], "report_to": ["mlflow"]}})
    for backend in ("wandb", "trackio"):
        if importlib.util.find_spec(backend) is None:
            raw["run"].update(report_to=[backend], output_dir=str(tmp_path / backend))
            with pytest.raises(UserError, match=rf"run.report_to: {backend} needs `pip install {backend}`"):
                build_trainer(recipe_from_dict(raw)).train()
