"""The command line's options: each command takes exactly the options it documents (argparse only, nothing trains)."""

from __future__ import annotations

import pytest

from llm_iif.cli import build_parser


@pytest.mark.parametrize("option", [["--methods", "standard,iif"], ["--seeds", "0,1"]])
def test_train_refuses_the_compare_options(option, capsys):
    # train trains one run of its recipe: --methods and --seeds belong to compare and classic compare.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["train", "recipe.yaml", *option])
    assert exited.value.code == 2
    assert f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["compare"], ["classic", "compare"]])
def test_the_compare_commands_take_methods_and_seeds(command):
    args = build_parser().parse_args([*command, "recipe.yaml", "--methods", "standard,iif", "--seeds", "3"])
    assert (args.methods, args.seeds) == ("standard,iif", "3")


def test_report_takes_no_recipe_overrides(capsys):
    # report reads a finished run; README and docs/cli.md say --set is for the commands that take a recipe.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "runs/demo", "--set", "run.rounds=2"])
    assert "unrecognized arguments: --set" in capsys.readouterr().err
