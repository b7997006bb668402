"""Why IIF's FrozenLake SE_ave falls short of the paper's 34%: one IIF variant at a time against standard PPO.

    .venv/bin/python benchmarks/classic_gap.py [--variants baseline,average_identical] [--seeds 0,1,2,3,4]
                                               [--rounds 30] [--eval-episodes 1000] [--set section.key=value ...]
                                               [--output-dir runs/classic-gap]

Trains standard PPO once per seed and IIF once per seed and variant (`VARIANTS`: recipe overrides on
``recipes/classic/frozenlake.yaml``, after the ``--set`` overrides that every method gets) into OUTPUT_DIR/standard/seed-S and OUTPUT_DIR/iif-VARIANT/seed-S, one run
at a time on one torch thread. A run whose metrics.jsonl and final.zip are complete is skipped, so the script
can be stopped and restarted. Then it prints, per variant, SE_ave against standard PPO (mean ± standard error
over the seeds both finished) on the test-return curves of every evaluation size and smoothing:

- evaluation episodes: every round plays ``--eval-episodes`` (the paper: 1,000), and the test return of the
  first 100 of them is exactly what a 100-episode evaluation would have measured (training does not depend
  on evaluation, `llm_iif.classic.train.evaluation_returns`), so one set of runs gives both;
- smoothing: the 5-round trailing mean that `llm-iif classic compare` reports, and the raw curve.

It also counts stalled runs (`stalled`) and collapsed runs (`collapsed`) of IIF and, by the same rules, of
standard PPO.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llm_iif.analysis.grid import CLASSIC_METHODS
from llm_iif.analysis.summary import mean_and_sem, rounds_to_reach, summarize, trailing_mean
from llm_iif.classic.train import train_classic
from llm_iif.recipes import ClassicRecipe, load_recipe
from llm_iif.runs.paths import GridPaths, RunPaths

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "classic" / "frozenlake.yaml"
# IIF variants: recipe overrides on top of the recipe's own IIF settings.
VARIANTS = {
    "baseline": [],
    "average_identical": ["iif.average_identical=true"],
    # Guards: transitions never dropped.
    "keep_positive_advantage": ["iif.guard=positive-advantage"],
    "keep_rewarded": ["iif.guard=rewarded"],
}
# A stall: the 5-round-smoothed test return takes STALL_ROUNDS or more rounds to climb from STALL_FROM to STALL_TO
# (a run that never reaches STALL_TO counts the rounds left after reaching STALL_FROM, plus one). Standard PPO
# takes 5-6 rounds on seeds 0-4 with 1,000 evaluation episodes; a stall takes at least about twice that.
STALL_FROM, STALL_TO, STALL_ROUNDS, STALL_SMOOTH = 0.5, 0.9, 10, 5


def finished(run: RunPaths, rounds: int) -> bool:
    """Whether ``run`` holds a complete run of ``rounds`` rounds (metrics.jsonl and final.zip)."""
    return (run.classic_model.exists() and run.metrics.exists()
            and len(run.metrics.read_text().splitlines()) == rounds)


def train_missing(method: str, overrides: list[str], seeds: list[int], grid: GridPaths, rounds: int) -> None:
    """Train ``method`` (``standard`` or ``iif-VARIANT``) for every seed whose run is not finished yet."""
    for seed in seeds:
        run = grid.run(method, seed)
        if finished(run, rounds):
            continue
        recipe = load_recipe(RECIPE, [*overrides, f"run.rounds={rounds}", f"run.seed={seed}"], kind=ClassicRecipe)
        mode, p = CLASSIC_METHODS[method.split("-")[0]](recipe.iif)
        print(f"== {method}, seed {seed} -> {run.root}", flush=True)
        start = time.perf_counter()
        train_classic(recipe, mode, p, run.root)
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)


def history(run: RunPaths, episodes: int | None) -> list[dict]:
    """A run's per-round metrics with ``reward_mean`` the test return of its first ``episodes`` evaluation
    episodes (None: all of them)."""
    rounds = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    if episodes is None:
        return rounds
    return [{**m, "reward_mean": m["reward_mean_by_episodes"][str(episodes)]} for m in rounds]


def stall_rounds(curve: list[float]) -> int | None:
    """Rounds the smoothed ``curve`` takes from first reaching STALL_FROM to first reaching STALL_TO (the rounds
    left plus one when it never does); None when it never reaches STALL_FROM."""
    smoothed = trailing_mean(curve, STALL_SMOOTH)
    start = rounds_to_reach(smoothed, STALL_FROM)
    if start is None:
        return None
    end = rounds_to_reach(smoothed, STALL_TO) or len(smoothed) + 1
    return end - start


def stalled(curve: list[float]) -> bool:
    """Whether a run stalled: its smoothed test return took STALL_ROUNDS or more rounds from STALL_FROM to
    STALL_TO."""
    rounds = stall_rounds(curve)
    return rounds is not None and rounds >= STALL_ROUNDS


def collapsed(curve: list[float]) -> bool:
    """Whether a run collapsed: after its smoothed test return first reached STALL_TO, a single round's return
    fell below STALL_FROM."""
    solved = rounds_to_reach(trailing_mean(curve, STALL_SMOOTH), STALL_TO)
    return solved is not None and min(curve[solved:], default=1.0) < STALL_FROM


def pm(stat) -> str:
    mean, sem = stat
    return f"{mean:+.1f}±{sem:.1f}"


def variant_rows(variant: str, grid: GridPaths, seeds: list[int], rounds: int, eval_episodes: int) -> list[str]:
    """Table rows of one variant: one per evaluation size (all episodes, then the first 100)."""
    both = [s for s in seeds if finished(grid.run("standard", s), rounds)
            and finished(grid.run(f"iif-{variant}", s), rounds)]
    if not both:
        return []
    rows = []
    for episodes in (None, 100) if eval_episodes > 100 else (None,):
        histories = {"standard": {s: history(grid.run("standard", s), episodes) for s in both},
                     "iif": {s: history(grid.run(f"iif-{variant}", s), episodes) for s in both}}
        smoothed, raw = summarize(histories, smooth=5), summarize(histories, smooth=1)
        curves = {m: [[r["reward_mean"] for r in h] for h in by_seed.values()] for m, by_seed in histories.items()}
        stalls = {m: sum(stalled(c) for c in curves[m]) for m in curves}
        collapses = {m: sum(collapsed(c) for c in curves[m]) for m in curves}
        climb = {m: mean_and_sem([r for r in map(stall_rounds, curves[m]) if r is not None] or [float("nan")])[0]
                 for m in curves}
        finals = "/".join(f"{smoothed['methods'][m]['final_reward'][0]:.3f}" for m in ("standard", "iif"))
        rows.append(f"| {variant} | {episodes or eval_episodes} | {len(both)} | "
                    f"{pm(smoothed['methods']['iif']['vs_baseline']['SE_ave'])} | "
                    f"{pm(raw['methods']['iif']['vs_baseline']['SE_ave'])} | "
                    f"{pm(smoothed['methods']['iif']['vs_baseline']['SE_peak'])} | {finals} | "
                    f"{smoothed['methods']['iif']['mean_kept_fraction'][0]:.2f} | "
                    f"{stalls['iif']} / {stalls['standard']} | {collapses['iif']} / {collapses['standard']} | "
                    f"{climb['iif']:.1f} / {climb['standard']:.1f} |")
    return rows


def table(variants: list[str], grid: GridPaths, seeds: list[int], rounds: int, eval_episodes: int) -> str:
    lines = ["| IIF variant | eval episodes | seeds | SE_ave % (5-round smoothing) | SE_ave % (raw) | "
             "SE_peak % (smoothed) | final return standard/IIF | IIF kept | stalled IIF / standard | "
             f"collapsed IIF / standard | rounds {STALL_FROM}→{STALL_TO} IIF / standard |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        lines += variant_rows(variant, grid, seeds, rounds, eval_episodes)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-episodes", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a recipe override for every method, e.g. ppo.optimizer=adam (repeatable)")
    parser.add_argument("--output-dir", default="runs/classic-gap")
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished runs only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown variant '{unknown[0]}' (expected some of: {', '.join(VARIANTS)})")
    grid = GridPaths(Path(args.output_dir))
    start = time.perf_counter()
    if not args.table_only:
        common = [*args.overrides, f"run.eval_episodes={args.eval_episodes}"]
        train_missing("standard", common, seeds, grid, args.rounds)
        for variant in variants:
            train_missing(f"iif-{variant}", [*common, *VARIANTS[variant]], seeds, grid, args.rounds)
    print(f"\nFrozenLake{' with ' + ' '.join(args.overrides) if args.overrides else ''}, {args.rounds} rounds, "
          f"seeds {args.seeds}; wall time of this call "
          f"{(time.perf_counter() - start) / 60:.1f} min\n")
    print(table(variants, grid, seeds, args.rounds, args.eval_episodes))


if __name__ == "__main__":
    main()
