"""docs/recipes.md is generated from the recipe dataclasses and must be kept current."""

import dataclasses
import difflib
from pathlib import Path

import pytest
import yaml

from llm_iif import recipes as config
from llm_iif.recipes import docs as recipe_docs
from llm_iif.recipes.docs import KINDS, TOP_LEVEL, render

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "recipes.md"


def _section_blocks(text: str) -> dict[tuple[str, str], str]:
    """(kind title, section name) -> the Markdown under that section's heading."""
    blocks = {}
    for kind_block in text.split("\n## ")[1:]:
        title, _, body = kind_block.partition("\n")
        for section_block in body.split("\n### ")[1:]:
            heading, _, table = section_block.partition("\n")
            blocks[title, heading.strip("`")] = table
    return blocks


def _rows(block: str) -> dict[str, list[str]]:
    """key -> the cells of its table row (split on unescaped pipes)."""
    rows = {}
    for line in block.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in line.replace("\\|", "\0").strip("|").split("|")]
            cells = [c.replace("\0", "|") for c in cells]
            rows[cells[0].strip("`")] = cells
    return rows


def _all_sections():
    for kind in KINDS:
        for name, cls, _ in recipe_docs.sections(kind.recipe):
            yield kind, name, cls


def test_docs_file_is_current():
    expected = render()
    current = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else ""
    if current != expected:
        diff = "\n".join(list(difflib.unified_diff(current.splitlines(), expected.splitlines(), "docs/recipes.md",
                                                   "render()", lineterm=""))[:40])
        pytest.fail(f"docs/recipes.md is out of date: run `python -m llm_iif.recipes.docs`\n{diff}")


def test_render_is_deterministic():
    assert render() == render()


def test_every_field_of_every_section_has_a_row():
    blocks = _section_blocks(render())
    seen = 0
    for kind, name, cls in _all_sections():
        block = blocks[kind.title, name]
        rows = _rows(block)
        assert [f.name for _, f in recipe_docs.section_fields(kind.recipe, name)] == list(rows), (kind.title, name)
        seen += len(rows)
    # Every recipe dataclass is some kind's section, nested in one (EvalConfig.data, EvalConfig.rewards), the
    # base of sections, whose fields their tables list (IIFFilterConfig), or a section with keys of its own
    # (GRPORewardModel: the reward section plus weight, which the type column names).
    documented = {base for _, _, cls in _all_sections() if cls is not None for base in cls.__mro__}
    documented |= {cls for cls in vars(config).values() if isinstance(cls, type) and dataclasses.is_dataclass(cls)
                   and any(base in documented for base in cls.__mro__[1:])
                   and f"section plus {dataclasses.fields(cls)[-1].name}" in render()}
    recipes = {kind.recipe for kind in KINDS}
    in_config = {obj for obj in vars(config).values()
                 if isinstance(obj, type) and dataclasses.is_dataclass(obj)
                 and obj.__module__.startswith(f"{config.__name__}.")}
    assert in_config - documented - recipes == set()
    assert seen > 50


def test_field_docstrings_and_class_docstrings_appear():
    blocks = _section_blocks(render())
    iif = _rows(blocks["LM PPO recipes", "iif"])
    assert iif["val_size"][3] == ("Validation responses generated per round (prompts are cycled when there "
                                  "are fewer).")
    # A docstring over several lines becomes one line of the table.
    assert iif["train_grad"][3].startswith("Per-sample training gradient: the policy term of the PPO loss, or "
                                           "the full loss (policy + vf_coef × value, as the paper's RLHF code). "
                                           "The target has no value term")
    # A field without a docstring gets an empty meaning, not an invented one.
    assert iif["enabled"][3] == ""
    assert blocks["LM PPO recipes", "iif"].startswith(
        "\nIterative influence-based filtering: score every rollout sample against a target, drop the worst.\n")
    env = _rows(blocks["Classic recipes", "env"])
    assert env["wrapper"][3] == ("A gymnasium wrapper class applied to every environment, as module:Class, "
                                 "e.g. minigrid.wrappers:ImgObsWrapper.")
    # And every attribute docstring in config.py is somewhere in the output, as one line.
    text = render().replace("\\|", "|")
    for kind, name, _ in _all_sections():
        for owner, f in recipe_docs.section_fields(kind.recipe, name):
            doc = recipe_docs.field_doc(owner, f.name)
            assert " ".join(doc.split()) in text, f"{owner.__name__}.{f.name}"


def test_types_and_defaults():
    blocks = _section_blocks(render())
    model = _rows(blocks["LM PPO recipes", "model"])
    assert model["name_or_path"][1:3] == ["str", "required"]
    assert model["dtype"][1:3] == ["float32 | bfloat16 | float16", '`"float32"`']
    assert model["quantization"][1:3] == ["8bit | 4bit or null", "`null`"]
    assert model["chat_template"][1:3] == ["bool", "`false`"]
    run = _rows(blocks["LM PPO recipes", "run"])
    assert run["report_to"][1:3] == ["list[tensorboard | wandb | trackio]", '`["tensorboard"]`']
    data = _rows(blocks["LM PPO recipes", "data"])
    assert data["filters"][1:3] == ["list[str]", "`[]`"]
    reward = _rows(blocks["LM PPO recipes", "reward"])
    assert reward["label"][1] == "int or str or null"
    assert reward["report"][1:3] == ["dict", "`{}`"]
    # The module-level enumerations render as their values.
    iif = _rows(blocks["LM PPO recipes", "iif"])
    assert iif["mode"][1] == " | ".join(config.FILTER_MODES)
    assert iif["target"][1] == " | ".join(config.TARGETS)
    assert _rows(blocks["Classic recipes", "iif"])["target"][1] == " | ".join(config.CLASSIC_TARGETS)
    # Nested dataclasses link to the section that documents them.
    evaluation = _rows(blocks["LM PPO recipes", "eval"])
    assert evaluation["data"][1] == "data section (see [data](#data)) or null"
    assert evaluation["rewards"][1] == "dict[str, reward section (see [reward](#reward))]"
    assert _rows(blocks["LM PPO recipes", "ppo"])["learning_rate"][2] == "`0.0001`"


def test_every_default_is_the_dataclass_default():
    blocks = _section_blocks(render())
    for kind, name, _ in _all_sections():
        rows = _rows(blocks[kind.title, name])
        for cls, f in recipe_docs.section_fields(kind.recipe, name):
            shown = rows[f.name][2]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert shown == "required", f"{cls.__name__}.{f.name}"
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert shown.startswith("`") and shown.endswith("`"), f"{cls.__name__}.{f.name}"
            assert yaml.safe_load(shown.strip("`")) == default, f"{cls.__name__}.{f.name}"


TOP_LEVEL_HEADING = f"### {TOP_LEVEL}"


def test_nested_sections_link_to_the_first_heading_of_that_name():
    headings = [line for line in render().splitlines() if line.startswith("#")]
    # GitHub numbers repeated heading anchors (data, data-1, ...): the links above point at the first one,
    # which is the LM PPO recipes' section.
    assert headings.index("### `data`") < headings.index("## Reward-model recipes")
    assert headings.index("### `reward`") < headings.index("## Reward-model recipes")
    assert headings.count(TOP_LEVEL_HEADING) == 1  # only a GRPO recipe has keys that are not sections


def test_check_mode(tmp_path, capsys):
    target = tmp_path / "docs" / "recipes.md"
    assert recipe_docs.main([str(target), "--check"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert recipe_docs.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render()
    assert recipe_docs.main([str(target), "--check"]) == 0
    target.write_text(render() + "stale\n", encoding="utf-8")
    assert recipe_docs.main([str(target), "--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is stale: run `python -m llm_iif.recipes.docs" in err
