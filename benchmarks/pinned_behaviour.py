"""Behaviour pinned for a refactor: fixed-seed metrics of short runs, recorded once and compared line by line.

    .venv/bin/python benchmarks/pinned_behaviour.py record    # writes benchmarks/pinned/<run>.jsonl
    .venv/bin/python benchmarks/pinned_behaviour.py check     # runs them again; exit 1 on any difference

A refactor that moves code and changes no behaviour leaves every metric of a seeded run as it was, to the last
bit, on the same machine: each run's metrics.jsonl, without its timings (``time_*`` keys and ``eval/time_*``),
is compared line for line. The runs (`RUNS`): 4 PPO rounds with IIF on the batch and the fresh sources and the
preference target, 4 GRPO steps with IIF and with DAPO with refill, and 2 classic rounds with IIF. A float
result depends on the CPU model (docs/results.md): record and check on the same one. The files in
benchmarks/pinned/ were recorded at commit 7f90932 (before issue 41's moves) on an AMD EPYC (family 25,
model 17), with the built-in models in the cache built by `lm.builtin.reproducible_build`; on another CPU,
record them at that commit first (in a git worktree, with the same cache), then check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llm_iif.runs.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / "benchmarks" / "pinned"
RUNS = {  # name -> (command after `python -m llm_iif`, its --set overrides, metrics.jsonl's folder in --output-dir)
    "ppo-batch": (["train", "recipes/tiny-sentiment.yaml"], ["run.rounds=4", "iif.target_source=batch"], "."),
    "ppo-fresh": (["train", "recipes/tiny-sentiment.yaml"], ["run.rounds=4", "iif.target_source=fresh",
                                                             "iif.val_size=64"], "."),
    "ppo-preference": (["train", "recipes/tiny-overopt.yaml"], ["run.rounds=4"], "."),
    "grpo-iif": (["train", "recipes/tiny-addition-grpo.yaml"], ["run.steps=4"], "."),
    "grpo-dapo-refill": (["train", "recipes/tiny-addition-grpo.yaml"],
                         ["run.steps=4", "iif.enabled=false", "group_filter.kind=dapo", "group_filter.refill=true"], "."),
    "classic-iif": (["classic", "compare", "recipes/classic/frozenlake.yaml", "--methods", "iif", "--seeds", "0"],
                    ["run.rounds=2", "ppo.n_steps=512"], "iif/seed-0"),
}


def run_metrics(name: str, directory: Path) -> list[str]:
    """The run's metrics.jsonl lines without timings, each as canonical JSON."""
    command, overrides, folder = RUNS[name]
    out = directory / name
    sets = [arg for override in overrides for arg in ("--set", override)]
    proc = subprocess.run([sys.executable, "-m", "llm_iif", *command, *sets, "--output-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    lines = []
    for line in RunPaths(out / folder).metrics.read_text().splitlines():  # the run layer's file name
        metrics = {key: value for key, value in json.loads(line).items() if "time_" not in key}
        lines.append(json.dumps(metrics, sort_keys=True))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated names from RUNS")
    args = parser.parse_args()
    differing = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            lines = run_metrics(name, Path(tmp))
            pinned = PINNED / f"{name}.jsonl"
            if args.action == "record":
                PINNED.mkdir(exist_ok=True)
                pinned.write_text("\n".join(lines) + "\n")
                print(f"{name}: {len(lines)} lines recorded")
                continue
            expected = pinned.read_text().splitlines()
            changed = [i for i, (a, b) in enumerate(zip(lines, expected)) if a != b]
            if changed or len(lines) != len(expected):
                differing.append(name)
                first = changed[0] if changed else min(len(lines), len(expected))
                print(f"{name}: DIFFERS from line {first + 1} ({len(lines)} lines, {len(expected)} pinned)")
            else:
                print(f"{name}: {len(lines)} lines identical")
    if differing:
        sys.exit(1)


if __name__ == "__main__":
    main()
