"""Measured numbers live once, in docs/results.md: every interval the README or another docs page quotes
("1.20 [1.04, 1.36]") must be one that results.md reports, so a re-measured section cannot leave a stale copy
behind."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"[−-]?\d+(?:\.\d+)?"
INTERVAL = re.compile(rf"{NUMBER}×? \[{NUMBER}, {NUMBER}\]")
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "results.md")]


def intervals(text: str) -> set[str]:
    """Every "estimate [low, high]" in ``text``, with the minus signs written alike."""
    return {match.replace("−", "-") for match in INTERVAL.findall(text)}


def test_the_pattern_finds_intervals():
    assert intervals("AUC × 1.20 [1.04, 1.36] and −0.36 [−0.47, −0.30]; not [1, 2]") == {
        "1.20 [1.04, 1.36]", "-0.36 [-0.47, -0.30]"}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_quoted_interval_is_in_results(page):
    reported = intervals((REPO / "docs" / "results.md").read_text())
    missing = sorted(intervals(page.read_text()) - reported)
    assert not missing, f"{page.name} quotes intervals that docs/results.md does not report: {missing}"
