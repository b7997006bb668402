"""The classic extra is optional: without Stable-Baselines3 and gymnasium the package imports, the LM commands
work, and every classic entry point stops with one line naming the extra (`llm_iif.core.imports.require_classic`).

The extra's absence is simulated in a fresh interpreter (``None`` in ``sys.modules`` makes ``import`` raise
ModuleNotFoundError), which runs every check once and reports them as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("stable_baselines3", "gymnasium", "minigrid", "Box2D")
MESSAGE = "classic RL needs the classic extra: pip install 'llm_iif[classic]' (missing: stable_baselines3)"

SCRIPT = """
import contextlib, io, json, sys
sys.modules.update(dict.fromkeys(%(blocked)r, None))

import llm_iif, llm_iif.analysis.diagnosis, llm_iif.analysis.grid, llm_iif.cli  # none of them needs the extra
from llm_iif.cli import main


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


results = {"train --help": run(["train", "--help"])}
for command in ("compare", "diagnose", "intervene"):
    results[command] = run(["classic", command, "recipes/classic/frozenlake.yaml"])
try:
    from llm_iif.classic import IIFPPO
    results["import"] = None
except ImportError as err:
    results["import"] = [type(err).__name__, str(err)]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def without_extra() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT % {"blocked": BLOCKED}], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_package_and_train_help_work_without_the_extra(without_extra):
    result = without_extra["train --help"]
    assert result["code"] == 0, result["stderr"]
    assert "usage: llm-iif train" in result["stdout"] and "--resume" in result["stdout"]


@pytest.mark.parametrize("command", ["compare", "diagnose", "intervene"])
def test_a_classic_command_without_the_extra_is_one_line(without_extra, command):
    result = without_extra[command]
    assert result["code"] == 2
    assert result["stderr"] == f"llm-iif: error: {MESSAGE}\n"  # one line, no traceback
    assert result["stdout"] == ""


def test_importing_the_classic_package_without_the_extra_is_an_import_error_naming_it(without_extra):
    assert without_extra["import"] == ["MissingExtra", MESSAGE]  # MissingExtra is an ImportError


def test_require_classic_names_the_module_that_is_missing(monkeypatch):
    from llm_iif.core.errors import UserError
    from llm_iif.core.imports import require_classic

    monkeypatch.setitem(sys.modules, "stable_baselines3", None)
    with pytest.raises(UserError) as raised:
        require_classic()
    assert str(raised.value) == MESSAGE and isinstance(raised.value, ImportError)
