"""The LM trainer's LDS check (iif.lds_rounds): it measures the round on the scores' own target and leaves
training exactly as it would be without it."""

import json

import pytest

from conftest import tiny_recipe_dict
from llm_iif.analysis.report import write_report
from llm_iif.recipes import recipe_from_dict
from llm_iif.training import build_trainer

TRAINING_METRICS = ("reward_mean", "kl", "entropy", "policy_loss", "value_loss", "kept_fraction", "influence_mean")


def run(out, **iif):
    raw = tiny_recipe_dict(out)
    raw["run"]["rounds"] = 3
    raw["iif"] = {"enabled": True, "val_size": 8, "precondition": "adam", **iif}
    return build_trainer(recipe_from_dict(raw)).train()


@pytest.mark.parametrize("target_source", ["fresh", "batch"])
def test_checked_run_trains_exactly_as_an_unchecked_one(tmp_path, tiny_model_dir, target_source):
    plain = run(tmp_path / "plain", target_source=target_source)
    checked = run(tmp_path / "checked", target_source=target_source, lds_rounds=[0, 2], lds_subsets=4)
    for a, b in zip(plain, checked):
        assert {m: a[m] for m in TRAINING_METRICS} == {m: b[m] for m in TRAINING_METRICS}
    assert "lds_plain" not in checked[1]
    assert "lds_preconditioned" not in checked[0]  # no Adam state yet: preconditioned scores are the plain ones
    for k in (0, 2):
        metrics = checked[k]
        for kind in ["plain", "random"] + (["preconditioned"] if k else []):
            assert -1.0 <= metrics[f"lds_{kind}_low"] <= metrics[f"lds_{kind}"] <= metrics[f"lds_{kind}_high"] <= 1.0
        assert metrics["lds_sign_agreement"] == int(metrics["lds_drop_negatives_gain"] > 0)
        details = json.loads((tmp_path / "checked" / "lds" / f"round_{k:04d}.json").read_text())
        assert len(details["actual"]) == 4 and len(details["predicted"]["plain"]) == 4
        assert len(set(details["actual"])) > 1  # different subsets change the target differently
    assert "LDS checks" in write_report(tmp_path / "checked").read_text()  # one predicted-vs-real figure
    assert "LDS checks" not in write_report(tmp_path / "plain").read_text()


def test_lds_rounds_need_one_process(tmp_path):
    from types import SimpleNamespace

    from llm_iif.core.errors import UserError
    from llm_iif.training.factory import check_distributed_support

    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "lds_rounds": [0]}
    two_processes = SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU",
                                    state=SimpleNamespace(deepspeed_plugin=None))
    with pytest.raises(UserError, match="iif.lds_rounds: the LDS check runs in one process; this launch has 2"):
        check_distributed_support(two_processes, recipe_from_dict(raw))


def test_grpo_recipes_refuse_lds_rounds():
    from llm_iif.recipes import GRPORecipe, load_recipe
    from llm_iif.core.errors import UserError

    # GRPO's iif section has no LDS keys: the check runs in the PPO trainer only.
    with pytest.raises(UserError, match="iif.lds_rounds: unknown key"):
        load_recipe("recipes/tiny-addition-grpo.yaml", ["iif.lds_rounds=[0]"], kind=GRPORecipe)
