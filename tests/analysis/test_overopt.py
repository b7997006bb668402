"""recipes/tiny-overopt.yaml through `llm-iif suite`: the recipe, a KL-sweep method and the conservative
ensemble defined as custom methods, IIF with the trusted preference target, the hidden rule's peak and final in
the scorecard, and its figure against KL in the task's report."""

from pathlib import Path

import yaml
from conftest import cli_in_process

REPO = Path(__file__).resolve().parents[2]
SHORT = {"run.rounds": 2, "run.batch_size": 8, "ppo.mini_batch_size": 4, "ppo.generation_batch_size": 16,
         "ppo.max_new_tokens": 8, "iif.val_size": 8, "data.validation_fraction": 0.1}


def test_the_over_optimisation_task_runs_with_its_baselines(tmp_path, capsys, tiny_model_dir):
    full = yaml.safe_load((REPO / "benchmarks" / "suites" / "full.yaml").read_text())
    suite = {"output_dir": str(tmp_path / "out"), "seeds": [0, 1],
             "custom_methods": {name: full["custom_methods"][name] for name in ("kl-1", "ensemble")},
             "tasks": {"tiny-overopt": {"recipe": str(REPO / "recipes" / "tiny-overopt.yaml"), "set": SHORT,
                                        "methods": ["standard", "iif", "kl-1", "ensemble"]}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    code, stderr = cli_in_process(capsys, "suite", path, "--no-progress")
    assert code == 0, stderr
    scorecard = (tmp_path / "out" / "scorecard.md").read_text()
    assert "peak hidden_rule (not trained on)" in scorecard and "final hidden_rule (not trained on)" in scorecard
    assert "Δ peak hidden_rule" in scorecard
    report = (tmp_path / "out" / "tiny-overopt" / "report.html").read_text()
    assert "reward/hidden_rule against KL to the reference" in report
    recipe = yaml.safe_load((tmp_path / "out" / "tiny-overopt" / "iif" / "seed-0" / "recipe.yaml").read_text())
    assert recipe["iif"]["target"] == "preference" and recipe["trusted"]["source"] == "builtin:trusted-preferences"
    ensemble = yaml.safe_load((tmp_path / "out" / "tiny-overopt" / "ensemble" / "seed-0" / "recipe.yaml").read_text())
    assert ensemble["reward"]["name"] == "conservative-ensemble" and len(ensemble["reward"]["members"]) == 3
