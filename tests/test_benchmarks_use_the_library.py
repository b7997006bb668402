"""Benchmarks measure the library: each script imports what it measures from llm_iif, and none redefines a
statistic that `llm_iif.analysis` already computes (checked from the source with `ast`; nothing is run)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
ANALYSIS = [REPO / "llm_iif" / "analysis" / name for name in ("statistics.py", "summary.py")]
# Standard-library statistics that analysis wraps: mean_and_sem, interval_estimates and the rliable IQMs.
WRAPPED = {"stdev", "pstdev", "variance", "pvariance"}


def analysis_functions() -> set[str]:
    return {node.name for path in ANALYSIS for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_a_benchmark_imports_the_library_and_redefines_no_analysis_statistic(script):
    tree = ast.parse(script.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert any(module.startswith("llm_iif") for module in imported), f"{script.name} imports nothing from llm_iif"
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not defined & analysis_functions(), f"{script.name} redefines {defined & analysis_functions()}"
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in ("statistics", "np", "numpy")}
    assert not used & WRAPPED, f"{script.name} computes {used & WRAPPED} itself; use llm_iif.analysis"
