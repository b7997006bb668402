"""`llm-iif train` and `llm-iif compare` on a GRPO recipe, and their one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import cli_in_process

from llm_iif.recipes import GRPORecipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-addition-grpo.yaml"


def small(model_dir, *extra):
    """Overrides that shrink the shipped recipe to seconds (the random tiny model, 16 completions a step) and
    turn on IIF alone, which the recipe ships off (its default is DAPO with refill)."""
    return ["--set", f"model.name_or_path={model_dir}", "--set", "grpo.per_device_train_batch_size=16",
            "--set", "grpo.num_generations=4", "--set", "data.eval_size=16", "--set", "data.validation_size=16",
            "--set", "run.report_to=[]", "--set", "iif.enabled=true", "--set", "group_filter.kind=null",
            *[a for item in extra for a in ("--set", item)]]


def llm_iif(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "llm_iif", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_compare_runs_every_baseline(random_adder_dir, tmp_path):
    out = tmp_path / "cmp"
    methods = "standard,iif,dapo-refill,pods"
    proc = llm_iif("compare", RECIPE, "--methods", methods, "--seeds", "0", "--output-dir", out,
                   *small(random_adder_dir, "run.steps=2", "group_filter.keep_per_group=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == methods.split(",")
    for method in methods.split(",")[1:]:
        assert "seconds_to_baseline_final" in summary["methods"][method]["vs_baseline"]
    pods = [json.loads(line) for line in (out / "pods" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["kept_fraction"] == 0.5 for m in pods)  # 2 of every 4
    assert (out / "reward_curves.png").is_file()
    report = (out / "report.html").read_text()  # per-run curves, seed means with intervals, influence, samples
    assert "Mean over seeds, ± one standard error" in report and "Influence scores (iif/seed-0)" in report
    assert "mean kept" in report and "Samples of round 1" in report


@pytest.mark.parametrize("overrides,message", [
    (["grpo.no_such_field=1"], "grpo: GRPOConfig.__init__() got an unexpected keyword argument 'no_such_field'"),
    (["iif.mode=bottom", "iif.p=1.0"], "iif.p: 1.0 with iif.mode bottom would drop every completion"),
    (["group_filter.kind=pods"], "group_filter.kind: pods with iif.enabled: true; IIF runs after a dapo filter"),
    (["group_filter.kind=pods", "iif.enabled=false", "group_filter.keep_per_group=4"],
     "group_filter.keep_per_group: 4 would keep no or every completion"),
    (["iif.target_source=fresh", "iif.val_size=6"], "iif.val_size: 6 completions; expected a multiple of"),
])
def test_bad_input_is_one_line(random_adder_dir, tmp_path, capsys, overrides, message):
    code, stderr = cli_in_process(capsys, "train", RECIPE, "--output-dir", tmp_path / "bad",
                                *small(random_adder_dir, "run.steps=1", *overrides))
    assert code == 2, stderr[-2000:]
    assert message in stderr and stderr.strip().count("\n") == 0, stderr


@pytest.mark.parametrize("recipe", ["tiny-addition-grpo", "tiny-reasoning-grpo"])
def test_verifiable_reward_recipes_ship_dapo_with_refill_and_no_iif(recipe):
    """The best measured setting on these tasks (docs/results.md section 20) is the recipes' default."""
    loaded = load_recipe(REPO / "recipes" / f"{recipe}.yaml", kind=GRPORecipe)
    assert (loaded.group_filter.kind, loaded.group_filter.refill, loaded.iif.enabled) == ("dapo", True, False)


def test_unknown_reward_function(random_adder_dir, tmp_path, capsys):
    raw = yaml.safe_load(RECIPE.read_text())
    raw["rewards"] = {"llm_iif.lm.addition:no_such": 1.0}
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, stderr = cli_in_process(capsys, "train", recipe, "--output-dir", tmp_path / "bad",
                                *small(random_adder_dir, "run.steps=1"))
    assert code == 2
    assert stderr.strip() == ("llm-iif: error: rewards.llm_iif.lm.addition:no_such: cannot import "
                                   "'llm_iif.lm.addition:no_such' (module 'llm_iif.lm.addition' has no 'no_such')")


def test_reasoning_recipe_trains_and_evaluates_a_step(tmp_path, capsys):
    """recipes/tiny-reasoning-grpo.yaml end to end, on a randomly initialised stand-in for builtin:tiny-reasoner."""
    from llm_iif.lm.char_tasks import character_gpt2
    from llm_iif.lm.reasoning import reasoner_tokenizer

    tokenizer = reasoner_tokenizer()
    character_gpt2(tokenizer, n_positions=64, n_embd=32, n_layer=1).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code, stderr = cli_in_process(capsys, "train", REPO / "recipes" / "tiny-reasoning-grpo.yaml", "--output-dir",
                                  tmp_path / "run", *small(tmp_path / "model", "run.steps=1"))
    assert code == 0, stderr[-3000:]
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["eval_completions"] == 16 and 0.0 <= metrics["eval/answer_reward"] <= 1.0
    assert "eval/format_reward" in metrics
