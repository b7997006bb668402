"""IIF in the trainer: exact scores on real rollouts, filtering, records and metrics, targets, comparison."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import assert_scores_match, cli_in_process, tiny_recipe_dict
from llm_iif.attribution.influence import influence_scores
from llm_iif.attribution.gradients import grad_dot, lora_parameters
from llm_iif.analysis.summary import efficiency, rounds_to_reach, summarize, trailing_mean
from llm_iif.recipes import recipe_from_dict
from llm_iif.lm.iif import per_sample_ppo_losses, ppo_sample_loss
from llm_iif.lm.rollouts import estimate_advantages
from llm_iif.training import build_trainer

IIF_METRICS = {"kept_fraction", "influence_mean", "influence_neg_fraction", "target_split_cos", "time_target_s",
               "time_scoring_s", "time_influence_s"}


def iif_recipe(output_dir, **iif):
    raw = tiny_recipe_dict(output_dir)
    raw["iif"] = {"enabled": True, "val_size": 16, "score_batch_size": 3, **iif}
    return recipe_from_dict(raw)


@pytest.fixture(scope="module")
def iif_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("iif")
    history = build_trainer(iif_recipe(out)).train()
    return out, history


def test_metrics_and_records_show_what_was_filtered(iif_run):
    out, history = iif_run
    for m in history:
        assert IIF_METRICS <= m.keys()
        assert {"time_val_generate_s", "time_val_reward_s", "time_val_forward_s"} <= m.keys()  # fresh responses
        assert m["time_influence_s"] == m["time_target_s"] + m["time_scoring_s"]
        assert -1.0 <= m["target_split_cos"] <= 1.0
        records = pq.read_table(out / "records" / f"round_{m['round']:04d}.parquet").to_pydict()
        assert set(records) == {"prompt", "response", "reward", "advantage", "influence", "kept"}
        assert len(records["influence"]) == 8
        kept = records["kept"]
        assert sum(kept) / len(kept) == pytest.approx(m["kept_fraction"])
        # neg-bottom with p = 1 drops exactly the negative scores (unless that would empty the batch).
        if any(s >= 0 for s in records["influence"]):
            assert kept == [s >= 0 for s in records["influence"]]
        assert m["influence_neg_fraction"] == pytest.approx(sum(s < 0 for s in records["influence"]) / 8)


def first_round_scoring_inputs(tmp_path):
    """A trainer with one fresh rollout, its advantages and the round's target gradient."""
    trainer = build_trainer(iif_recipe(tmp_path))
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    advantages = estimate_advantages(rollout, trainer.kl_controller.value, trainer.cfg, trainer.accelerator)
    target, _ = trainer.iif.target_gradient(trainer.policy)
    return trainer, trainer.accelerator.unwrap_model(trainer.policy), rollout, advantages, target


def test_trainer_scores_equal_a_per_sample_autograd_loop(tmp_path, tiny_model_dir):
    """The scores the trainer filters on are exactly ⟨target, ∇L_i⟩ with L_i the PPO loss of sample i: through
    `IIFStage.influence`, as the trainer calls it (autocast, eval mode, chunks of 3), on the round's target rows."""
    trainer, policy, rollout, targets, target = first_round_scoring_inputs(tmp_path)
    tokens = rollout.response_mask.sum().item() / len(rollout)
    cfg = trainer.cfg
    scores, _ = trainer.iif.influence(trainer.policy, ppo_sample_loss(rollout, targets, cfg, "full", tokens),
                                      len(rollout), rows=trainer.iif.target_rows)
    params = lora_parameters(policy)
    expected = []
    for i in range(len(rollout)):
        index = torch.tensor([i])
        loss = per_sample_ppo_losses(policy, rollout.select(index), targets.advantages[index],
                                               targets.returns[index], cfg, "full", tokens)[0]
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        expected.append(grad_dot(grads, target))
    expected = torch.stack(expected)
    assert_scores_match(scores, expected)
    assert all(p.grad is None for p in params.values())  # scoring leaves .grad alone


def test_policy_only_training_gradient_differs_from_full(tmp_path, tiny_model_dir):
    trainer, policy, rollout, targets, target = first_round_scoring_inputs(tmp_path)
    # The value head starts at zero, so at first no value gradient reaches the backbone; give it weights.
    with torch.no_grad():
        policy.value_head.weight.normal_()
    full = influence_scores(policy, ppo_sample_loss(rollout, targets, trainer.cfg, "full", 5.0), len(rollout),
                            target, 8, "cpu")
    policy_only = influence_scores(policy, ppo_sample_loss(rollout, targets, trainer.cfg, "policy", 5.0), len(rollout),
                                   target, 8, "cpu")
    assert not torch.allclose(full, policy_only)


@pytest.mark.parametrize("iif", [
    {"target": "return"}, {"target": "reward", "mode": "bottom", "p": 0.25},
    {"target": "gold", "val_prompts": "builtin:positive-reviews"},
    {"target": "preference", "target_source": "cached"},
    {"mode": "neg-random", "p": 0.5, "train_grad": "full"},
])
def test_targets_and_modes_run(tmp_path, tiny_model_dir, iif):
    raw = tiny_recipe_dict(tmp_path)
    raw["run"]["rounds"] = 1
    raw["iif"] = {"enabled": True, "val_size": 8, **iif}
    if iif.get("target") == "preference":
        raw["trusted"] = {"source": "builtin:trusted-preferences", "size": 8}
    (m,) = build_trainer(recipe_from_dict(raw)).train()
    assert IIF_METRICS <= m.keys()
    if iif.get("mode") == "bottom":
        assert m["kept_fraction"] == 0.75


def test_random_mode_skips_scoring_and_drops_half(tmp_path, tiny_model_dir):
    (m,) = build_trainer(iif_recipe(tmp_path, mode="random", p=0.5)).train()[:1]
    assert m["kept_fraction"] == 0.5
    assert "target_split_cos" not in m
    records = pq.read_table(tmp_path / "records" / "round_0000.parquet").to_pydict()
    assert all(s != s for s in records["influence"])  # NaN: nothing was scored


def test_unreliable_target_turns_filtering_off(tmp_path, tiny_model_dir):
    history = build_trainer(iif_recipe(tmp_path, min_split_cos=1.0)).train()
    assert all(m["filtered"] == 0 and m["kept_fraction"] == 1.0 for m in history)


def test_gold_target_without_pairs_exits_2(tmp_path, capsys):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "target": "gold"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, stderr = cli_in_process(capsys, "train", recipe)
    assert code == 2
    assert stderr.count("\n") == 1 and "iif.val_prompts" in stderr


# ---------------------------------------------------------------------------------------------- metrics

def test_trailing_mean_and_rounds_to_reach():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rounds_to_reach([0.0, 0.5, 1.0], 0.5) == 2
    assert rounds_to_reach([0.0, 0.5], 0.9) is None


def test_efficiency_matches_the_paper_definitions():
    standard = [i / 10 for i in range(11)]          # reaches its peak 1.0 after 11 rounds
    method = [min(1.0, i / 5) for i in range(11)]   # twice as fast: 1.0 after 6 rounds
    result = efficiency(standard, method, [1.0] * 11, [2.0] * 11, smooth=1)
    assert result["SE_peak"] == pytest.approx(100 * (1 - 6 / 11))
    # Levels 20%..90% of the rise: standard needs 10f+1 rounds, the method ceil(5f)+1.
    standard_rounds, method_rounds = [3, 4, 5, 6, 7, 8, 9, 10], [2, 3, 3, 4, 4, 5, 5, 6]
    expected = [1 - m / s for m, s in zip(method_rounds, standard_rounds)]
    assert result["SE_ave"] == pytest.approx(100 * sum(expected) / 8)
    assert result["RT_peak"] == pytest.approx(100 * (1 - 12 / 11))  # 6 rounds at 2 s vs 11 at 1 s
    assert result["rounds_to_baseline_final"] == pytest.approx(6 / 11)
    assert result["seconds_to_baseline_final"] == pytest.approx(12 / 11)  # 6 rounds at 2 s of standard's 11 s
    assert result["rounds_to_baseline_peak"] == pytest.approx(6 / 11)
    assert result["seconds_to_baseline_peak"] == pytest.approx(12 / 11)
    assert result["round_time_ratio"] == 2.0
    assert result["unreached_levels"] == 0


def test_a_method_that_never_gets_there_is_charged_the_whole_budget():
    result = efficiency([0.0, 0.5, 1.0], [0.0, 0.1, 0.2], [1.0] * 3, [1.0] * 3, smooth=1)
    assert result["unreached_levels"] > 0
    assert result["SE_peak"] == pytest.approx(100 * (1 - 4 / 3))


def test_summary_pairs_each_seed_with_its_standard_run():
    def history(rewards, seconds):
        return [{"reward_mean": r, "time_round_s": seconds, "kept_fraction": 1.0, "kl": 1.0} for r in rewards]

    summary = summarize({"standard": {0: history([0, 1, 2], 1.0), 1: history([0, 1, 2], 1.0)},
                         "iif": {0: history([0, 2, 2], 1.0), 1: history([0, 1, 2], 1.0)}}, smooth=1)
    per_seed = summary["methods"]["iif"]["seeds"]
    assert per_seed["0"]["vs_baseline"]["SE_peak"] == pytest.approx(100 * (1 - 2 / 3))
    assert per_seed["1"]["vs_baseline"]["SE_peak"] == 0.0
    mean, sem = summary["methods"]["iif"]["vs_baseline"]["SE_peak"]
    assert mean == pytest.approx(50 * (1 - 2 / 3)) and sem > 0
    assert "vs_baseline" not in summary["methods"]["standard"]


def test_compare_command_writes_summary_and_plots(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path / "unused")
    raw["iif"] = {"val_size": 8}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "llm_iif", "compare", str(recipe), "--seeds", "0",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"standard", "iif", "random"}
    assert {"SE_ave", "SE_peak", "RT_peak"} <= summary["methods"]["iif"]["vs_baseline"].keys()
    for name in ("reward_curves.png", "influence.png", "iif/seed-0/metrics.jsonl", "random/seed-0/final"):
        assert (out / name).exists(), name
    assert "SE_peak" in proc.stdout and "final KL" in proc.stdout
    report = (out / "report.html").read_text()  # written by compare: every method overlaid, scores from IIF
    assert all(f"<td>{m} / seed-0</td>" in report for m in ("standard", "iif", "random"))
    assert "Influence scores (iif/seed-0)" in report and "SE_peak %" in report


def test_compare_rejects_unknown_methods(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path)))
    code, stderr = cli_in_process(capsys, "compare", recipe, "--methods", "iif,best")
    assert code == 2 and "--methods: unknown method 'best'" in stderr


@pytest.mark.parametrize("target_source", ["fresh", "batch"])
def test_adam_preconditioning_starts_after_the_first_update(tmp_path, tiny_model_dir, target_source):
    """Round 0 has no Adam state and is scored with plain gradients; from round 1 the target is preconditioned."""
    raw = tiny_recipe_dict(tmp_path / "run")
    raw["iif"] = {"enabled": True, "val_size": 8, "precondition": "adam", "target_source": target_source}
    history = build_trainer(recipe_from_dict(raw)).train()
    assert [m["preconditioned"] for m in history] == [0, 1]
    assert all(0 < m["kept_fraction"] <= 1 for m in history)
