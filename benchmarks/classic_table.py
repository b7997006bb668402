"""The paper's classic-RL table (Fig. 6(b)) measured with `llm-iif classic compare`, beside the paper's values.

    .venv/bin/python benchmarks/classic_table.py [--envs frozenlake,acrobot] [--seeds 0,1,2,3,4]
                                                 [--output-dir runs/classic-table]

For each environment it runs standard PPO, IIF and random filtering on ``recipes/classic/ENV.yaml`` with the
given seeds, then writes ``benchmarks/results/classic.md``: SE_ave, SE_peak and RT_peak (mean ± standard
error over seeds) for IIF and random against standard, the paper's values, the final test returns and the
wall time of every run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llm_iif.classic import run_classic_compare
from llm_iif.outputs import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
# Hu et al. 2025, Fig. 6(b), 5 seeds: IIF against standard PPO, in %.
PAPER = {
    "frozenlake": {"SE_ave": "34.0±2.0", "SE_peak": "19.2±5.9", "RT_peak": "29.5±2.9"},
    "acrobot": {"SE_ave": "36.7±6.5", "SE_peak": "48.5±0.8", "RT_peak": "55.2±1.0"},
}


def pm(stat) -> str:
    mean, sem = stat
    return f"{mean:+.1f}±{sem:.1f}"


def table(results: dict, seeds: list[int]) -> str:
    lines = ["# Classic RL: IIF against standard PPO, beside the paper", "",
             f"Seeds {', '.join(map(str, seeds))}; written by `benchmarks/classic_table.py` on "
             f"{time.strftime('%Y-%m-%d')}. Values are reductions in % (positive = fewer rounds or seconds "
             "than standard PPO), mean ± standard error over seeds.", "",
             "| environment | method | SE_ave % | SE_peak % | RT_peak % | final test return | s/round (training) |",
             "|---|---|---|---|---|---|---|"]
    for env, (summary, seconds) in results.items():
        for method, entry in summary["methods"].items():
            vs = entry.get("vs_standard")
            cells = [pm(vs[k]) for k in ("SE_ave", "SE_peak", "RT_peak")] if vs else ["", "", ""]
            lines.append(f"| {env} | {method} | {' | '.join(cells)} | {pm(entry['final_reward'])} | "
                         f"{entry['mean_round_s'][0]:.2f} |")
        paper = PAPER.get(env)
        if paper:
            lines.append(f"| {env} | IIF, paper (5 seeds) | {paper['SE_ave']} | {paper['SE_peak']} | "
                         f"{paper['RT_peak']} | | |")
    lines += ["", "Wall time of all runs, evaluation included: "
              + ", ".join(f"{env} {seconds / 60:.1f} min" for env, (_, seconds) in results.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="frozenlake,acrobot")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--output-dir", default="runs/classic-table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for env in args.envs.split(","):
        start = time.perf_counter()
        summary = run_classic_compare(str(REPO / "recipes" / "classic" / f"{env}.yaml"), [],
                                      ["standard", "iif", "random"], seeds, Path(args.output_dir) / env)
        results[env] = (summary, time.perf_counter() - start)
        markdown = table(results, seeds)
        atomic_write_text(REPO / "benchmarks" / "results" / "classic.md", markdown)  # after every environment
    print(markdown)


if __name__ == "__main__":
    main()
