"""Recipe validation: good recipes load, bad ones give one line naming the file and key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_iif.cli import main
from llm_iif.recipes import ClassicRecipe, GRPORecipe, Recipe, RewardTrainRecipe, load_recipe, recipe_kind
from llm_iif.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "model": {"name_or_path": "builtin:tiny-sentiment"},
    "data": {"source": "builtin:review-prompts"},
    "reward": {"name": "vader"},
    "run": {"rounds": 3},
}


def write(tmp_path, recipe) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_shipped_recipes_load():
    for folder, kind in (("", Recipe), ("classic", ClassicRecipe), ("reward", RewardTrainRecipe)):
        paths = sorted((REPO / "recipes" / folder).glob("*.yaml"))
        assert paths, folder
        for path in paths:
            load_recipe(path, kind=recipe_kind(path) if kind is Recipe else kind)
    assert recipe_kind(REPO / "recipes" / "tiny-addition-grpo.yaml") is GRPORecipe
    assert recipe_kind(REPO / "recipes" / "tiny-reasoning-grpo.yaml") is GRPORecipe


def test_defaults_fill_missing_sections(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.lora.target_modules is None  # peft's per-architecture default
    assert recipe.ppo.adaptive_kl is True
    assert recipe.run.rounds == 3


def test_overrides_are_parsed_as_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["ppo.learning_rate=3e-4", "lora.target_modules=[q_proj, v_proj]",
                                                 "run.output_dir=out/x", "ppo.adaptive_kl=false"])
    assert recipe.ppo.learning_rate == pytest.approx(3e-4)
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.run.output_dir == "out/x"
    assert recipe.ppo.adaptive_kl is False


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["ppo"].update(lr=1.0), "ppo.lr: unknown key"),
    (lambda r: r.update(extra={}), "extra: unknown key"),
    (lambda r: r["run"].update(rounds="ten"), "run.rounds: expected an integer, got 'ten'"),
    (lambda r: r["run"].update(rounds=2.5), "run.rounds: expected an integer"),
    (lambda r: r["run"].update(nonfinite_patience=-1), "run.nonfinite_patience: expected a non-negative integer"),
    (lambda r: r["ppo"].update(adaptive_kl="yes please"), "ppo.adaptive_kl: expected true or false"),
    (lambda r: r["lora"].update(target_modules="c_attn"), "lora.target_modules: expected a list"),
    (lambda r: r["model"].update(dtype="float8"), "model.dtype: expected one of"),
    (lambda r: r["model"].pop("name_or_path"), "model.name_or_path: required key is missing"),
    (lambda r: r.pop("reward"), "reward: required key is missing"),
    (lambda r: r["ppo"].update(top_p=1.5), "ppo.top_p: expected a value in (0, 1]"),
    (lambda r: r["ppo"].update(min_new_tokens=40), "ppo.min_new_tokens: expected a value in [0, ppo.max_new_tokens]"),
    (lambda r: r.update(ppo=[1, 2]), "ppo: expected a mapping"),
    (lambda r: r.update(iif={"lds_subsets": 1}), "iif.lds_subsets: expected at least 2"),
    (lambda r: r.update(iif={"lds_rounds": [0, 99]}), "iif.lds_rounds: expected rounds in [0, run.rounds="),
])
def test_bad_recipes_name_file_and_key(tmp_path, mutate, message):
    recipe = {k: dict(v) for k, v in GOOD.items()}
    recipe["ppo"], recipe["lora"] = {}, {}
    mutate(recipe)
    path = write(tmp_path, recipe)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_nested_overrides_reach_eval_sections(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), [
        "eval.every=5", "eval.data.source=wiki.parquet", "eval.data.filters=['label == 1']",
        "eval.rewards.toxicity.name=hf-classifier", "eval.rewards.toxicity.name_or_path=some/classifier"])
    assert recipe.eval.every == 5 and recipe.eval.data.source == "wiki.parquet"
    assert recipe.eval.data.filters == ["label == 1"]
    assert recipe.eval.rewards["toxicity"].name_or_path == "some/classifier"
    with pytest.raises(UserError, match=r"eval.rewards.toxicity.output: expected one of"):
        load_recipe(write(tmp_path, GOOD), ["eval.rewards.toxicity.name=x", "eval.rewards.toxicity.output=odds"])
    with pytest.raises(UserError, match="eval.data: expected a prompt set"):
        load_recipe(write(tmp_path, GOOD), ["eval.every=1"])
    with pytest.raises(UserError, match="data.filters: expected 'COLUMN OP NUMBER'"):
        load_recipe(write(tmp_path, GOOD), ["data.filters=['toxicity above 0.3']"])


def test_bad_override_form(tmp_path):
    with pytest.raises(UserError, match="expected section.key=value"):
        load_recipe(write(tmp_path, GOOD), ["learning_rate=1"])


def test_missing_recipe_file():
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe("does/not/exist.yaml")


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, {**GOOD, "run": {"rounds": "many"}})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llm-iif: error: {path}: run.rounds: expected an integer, got 'many'"


def test_cli_debug_shows_the_traceback(tmp_path):
    path = write(tmp_path, {**GOOD, "run": {"rounds": "many"}})
    with pytest.raises(UserError):
        main(["train", str(path), "--debug"])


def test_python_m_and_console_script_are_the_same_cli(tmp_path):
    """Run as a real process: exit code 2 and no traceback on stderr."""
    path = write(tmp_path, {**GOOD, "ppo": {"bogus": 1}})
    proc = subprocess.run([sys.executable, "-m", "llm_iif", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("ppo.bogus: unknown key (expected one of: " + ", ".join(
        ["learning_rate", "epochs", "mini_batch_size", "forward_batch_size", "gamma", "lam", "clip_range",
         "clip_range_value", "vf_coef", "max_grad_norm", "init_kl_coef", "adaptive_kl", "target_kl", "kl_horizon",
         "temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens", "generation_batch_size"]) + ")")
    script = Path(sys.executable).with_name("llm-iif")
    proc = subprocess.run([str(script), "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("recipe, kind, key", [
    ("tiny-sentiment.yaml", Recipe, "run.seed"),
    ("tiny-addition-grpo.yaml", GRPORecipe, "run.seed"),
    ("tiny-addition-grpo.yaml", GRPORecipe, "data.shuffle_seed"),
    ("classic/frozenlake.yaml", ClassicRecipe, "run.seed"),
    ("reward/tiny.yaml", RewardTrainRecipe, "run.seed"),
])
@pytest.mark.parametrize("seed", [-1, 2 ** 31])
def test_seeds_are_checked_in_every_kind_of_recipe(recipe, kind, key, seed):
    """numpy takes seeds in [0, 2**32) and a run adds its process index to its seed: -1 used to fail mid-run."""
    path = REPO / "recipes" / recipe
    with pytest.raises(UserError) as err:
        load_recipe(path, [f"{key}={seed}"], kind=kind)
    assert str(err.value) == f"{path}: {key}: expected a non-negative integer below 2**31, got {seed}"


def test_a_recipe_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(yaml.safe_dump(GOOD).encode() + "# r\xe9sum\xe9\n".encode("cp1252"))
    offset = len(yaml.safe_dump(GOOD).encode()) + 3
    lines = yaml.safe_dump(GOOD).count("\n") + 1
    assert recipe_kind(path) is Recipe  # the kind is decided later, by load_recipe's error
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: not UTF-8 text: byte {offset} (line {lines}) is 0xe9; expected a UTF-8 file"
