"""report.html: its contents, a render in a real headless browser, and the CLI."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import tiny_recipe_dict
from llm_iif.analysis.report import write_report
from llm_iif.cli import main
from llm_iif.recipes import recipe_from_dict
from llm_iif.runs.paths import RunPaths
from llm_iif.training import build_trainer

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = os.environ.get("LLM_IIF_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails, not skips


@pytest.fixture(scope="module")
def iif_run(tmp_path_factory, tiny_model_dir):
    """`llm-iif train` with IIF for 3 rounds; train writes report.html and reward_curve.png itself."""
    out = tmp_path_factory.mktemp("report")
    raw = tiny_recipe_dict(out / "run")
    raw["run"]["rounds"] = 3
    raw["iif"] = {"enabled": True, "val_size": 8, "mode": "bottom", "p": 0.25}
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    return out / "run"


def test_train_writes_a_self_contained_report_and_the_reward_curve(iif_run):
    assert RunPaths(iif_run).reward_curve.stat().st_size > 0
    page = RunPaths(iif_run).report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing to fetch: opens offline
    assert len(re.findall(r'<img alt="figure" src="data:image/png;base64,', page)) == 2  # curves, histograms
    for heading in ("Curves over rounds", "Influence scores", "Samples of round 2: top and bottom 5", "Recipe",
                    "Environment"):
        assert f"{heading}" in page
    table = page[page.index("Samples of round 2"):page.index("<h2>Recipe")]
    assert table.count("<tr>") == 1 + 8  # header + 8 samples (fewer than 2 x 5, so each appears once)
    assert "name_or_path: builtin:tiny-sentiment" in page and "transformers" in page


def test_report_command_and_its_errors(iif_run, tmp_path, capsys):
    assert main(["report", str(iif_run), "--round", "0", "--top", "2"]) == 0
    page = RunPaths(iif_run).report.read_text()
    table = page[page.index("Samples of round 0"):page.index("<h2>Recipe")]
    assert table.count("<tr>") == 1 + 4
    assert main(["report", str(iif_run), "--round", "7"]) == 2
    assert "--round: " in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.skipif(BROWSER is None and not REQUIRE_BROWSER,
                    reason="needs Debian's chromium package (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(iif_run, tmp_path):
    assert BROWSER is not None, "LLM_IIF_REQUIRE_BROWSER=1, but chromium is not installed"
    from PIL import Image

    main(["report", str(iif_run)])
    url = RunPaths(iif_run).report.as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([BROWSER, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == 2 and dom.count("<table") >= 3 and "Influence scores" in dom
    # The same page with its images blanked is the baseline: only rendered figures put the histograms'
    # "kept" bars (tab:blue at alpha 0.6 on white, RGB 120 173 210) on the screen.
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', RunPaths(iif_run).report.read_text()))
    blue_pixels = {}
    for name, page_url in (("report", url), ("blank", blank.as_uri())):
        shot = tmp_path / f"{name}.png"
        subprocess.run([BROWSER, *flags, "--window-size=1300,1400", f"--screenshot={shot}", page_url],
                       capture_output=True, timeout=120, check=True)
        image = Image.open(shot).convert("RGB")
        assert image.size == (1300, 1400)
        blue_pixels[name] = sum(count for count, (r, g, b) in image.getcolors(maxcolors=1_000_000)
                                if abs(r - 120) <= 6 and abs(g - 173) <= 6 and abs(b - 210) <= 6)
    assert blue_pixels["report"] > 2000 and blue_pixels["blank"] == 0, blue_pixels


def test_report_of_a_run_without_iif_has_no_histograms(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["run"]["rounds"] = 1
    build_trainer(recipe_from_dict(raw)).train()
    page = write_report(tmp_path).read_text()
    assert "Influence scores" not in page and page.count("<img") == 1
    assert "Sorted by reward (this run was not scored)" in page
