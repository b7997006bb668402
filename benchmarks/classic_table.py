"""The paper's classic-RL table (Fig. 6(b)) measured with `llm-iif classic compare`, beside the paper's values.

    .venv/bin/python benchmarks/classic_table.py [--envs frozenlake,acrobot] [--seeds 0,1,2,3,4]
                                                 [--set section.key=value ...] [--output-dir runs/classic-table]

For each environment it runs standard PPO, IIF and size-matched random filtering on
``recipes/classic/ENV.yaml`` with the given seeds into OUTPUT_DIR/ENV, then rewrites
``benchmarks/results/classic.md`` from every environment found in OUTPUT_DIR: SE_ave, SE_peak and RT_peak
(mean ± standard error over seeds) for IIF and random against standard, the paper's values, the final test
returns and the wall times. Each process uses one torch thread, so two environments can run side by side on
two cores, one per core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llm_iif.analysis.grid import run_classic_compare
from llm_iif.analysis.summary import summarize
from llm_iif.core.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ENVS = ("frozenlake", "acrobot", "lunarlander", "minigrid")
# Hu et al. 2025, Fig. 6(b), 5 seeds: IIF against standard PPO, in %.
PAPER = {
    "frozenlake": {"SE_ave": "34.0±2.0", "SE_peak": "19.2±5.9", "RT_peak": "29.5±2.9"},
    "acrobot": {"SE_ave": "36.7±6.5", "SE_peak": "48.5±0.8", "RT_peak": "55.2±1.0"},
    "lunarlander": {"SE_ave": "26.0±1.8", "SE_peak": "39.7±3.7", "RT_peak": "44.9±2.5"},
    "minigrid": {"SE_ave": "65.8±3.3", "SE_peak": "61.7±4.1", "RT_peak": "69.1±1.7"},
}


def pm(stat) -> str:
    mean, sem = stat
    return f"{mean:+.1f}±{sem:.1f}"


def load_histories(env_dir: Path) -> dict[str, dict[int, list[dict]]]:
    """{method: {seed: per-round metrics}} from a `classic compare` output directory."""
    return {method.name: {int(run.name.split("-")[1]): [json.loads(line) for line in
                                                        (run / "metrics.jsonl").read_text().splitlines()]
                          for run in sorted(method.glob("seed-*"))}
            for method in sorted(env_dir.iterdir()) if method.is_dir()}


def rows(env: str, histories: dict, smooth: int, with_paper: bool) -> list[str]:
    summary = summarize(histories, smooth=smooth)
    lines = []
    for method in ("standard", "iif", "random"):
        entry = summary["methods"].get(method)
        if entry is None:
            continue
        vs = entry.get("vs_baseline")
        cells = [pm(vs[k]) for k in ("SE_ave", "SE_peak", "RT_peak")] if vs else ["", "", ""]
        scoring = [m["time_influence_s"] for runs in histories[method].values() for m in runs]
        lines.append(f"| {env} | {method} | {' | '.join(cells)} | {pm(entry['final_reward'])} | "
                     f"{entry['mean_kept_fraction'][0]:.2f} | {entry['mean_round_s'][0]:.2f} | "
                     f"{sum(scoring) / len(scoring):.3f} |")
    if with_paper and env in PAPER:
        paper = PAPER[env]
        lines.append(f"| {env} | IIF, paper | {paper['SE_ave']} | {paper['SE_peak']} | {paper['RT_peak']} | | | | |")
    return lines


def table(output_dir: Path) -> str:
    header = ["| environment | method | SE_ave % | SE_peak % | RT_peak % | final test return | kept | "
              "s/round (training) | s/round (scoring + filter) |", "|---|---|---|---|---|---|---|---|---|"]
    smoothed, raw, walls = [], [], []
    for env in ENVS:
        if not (output_dir / env / "benchmark.json").exists():
            continue
        run = json.loads((output_dir / env / "benchmark.json").read_text())
        settings = f" with {', '.join(run['overrides'])}" if run["overrides"] else ""
        note = f" ({run['note']})" if run.get("note") else ""  # e.g. a run stopped early, by hand
        walls.append(f"{env}: seeds {', '.join(map(str, run['seeds']))}{settings}, {run['wall_time_s'] / 60:.0f} min"
                     f"{note}")
        histories = load_histories(output_dir / env)
        smoothed += rows(env, histories, smooth=5, with_paper=True)
        raw += rows(env, histories, smooth=1, with_paper=False)
    lines = ["# Classic RL: IIF against standard PPO, beside the paper", "",
             f"Written by `benchmarks/classic_table.py` on {time.strftime('%Y-%m-%d')} (2 CPU cores, one torch "
             "thread per environment). Reductions are in % (positive = fewer rounds or seconds than standard "
             "PPO to reach the same test return), mean ± standard error over seeds; the paper's are over 5 "
             "seeds. `kept` is the mean fraction of transitions trained on; the final test return is the mean "
             "of the last 5 rounds. Training time per round covers the rollout, scoring and the update, not "
             "the evaluation; RT_peak sums it.", "",
             "## Curves smoothed over 5 rounds (what `llm-iif classic compare` reports)", "", *header, *smoothed,
             "", "## Raw per-round curves (the paper's definition applied to single-round test returns)", "",
             *header, *raw, "",
             "Seeds, recipe overrides and the wall time of all runs of an environment, evaluation included: "
             + "; ".join(walls) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="frozenlake,acrobot")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override for every environment of this call, e.g. run.eval_episodes=20")
    parser.add_argument("--output-dir", default="runs/classic-table")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite classic.md from the runs already in OUTPUT_DIR without training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    output_dir = Path(args.output_dir)
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    for env in [] if args.table_only else args.envs.split(","):
        start = time.perf_counter()
        run_classic_compare(str(REPO / "recipes" / "classic" / f"{env}.yaml"), args.overrides,
                            ["standard", "iif", "random"], seeds, output_dir / env,
                            overwrite=True)  # a benchmark re-run replaces its previous runs
        atomic_write_text(output_dir / env / "benchmark.json",
                          json.dumps({"seeds": seeds, "overrides": args.overrides,
                                      "wall_time_s": time.perf_counter() - start}))
    markdown = table(output_dir)
    atomic_write_text(results / "classic.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
