"""Command line for llm_iif.

    llm-iif train RECIPE [--set section.key=value ...] [--output-dir DIR] [--debug]
    llm-iif compare RECIPE [--methods standard,iif,random] [--seeds 0,1,2] [--set ...] [--output-dir DIR]
    llm-iif classic compare RECIPE [--methods ...] [--seeds ...] [--set ...] [--output-dir DIR]

Bad input (a `UserError`) prints one line and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
import time
import warnings

from llm_iif.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-iif", description="PPO with influence-based rollout filtering")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run PPO (with IIF when the recipe enables it) on a recipe")
    compare = commands.add_parser("compare", help="train standard PPO, IIF and random filtering side by side")
    classic = commands.add_parser("classic", help="IIF for Stable-Baselines3 PPO on gymnasium environments")
    classic_compare = classic.add_subparsers(dest="classic_command", required=True).add_parser(
        "compare", help="standard PPO, IIF and random filtering side by side on a recipes/classic/ recipe")
    for command in (train, compare, classic_compare):
        command.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/tiny-sentiment.yaml")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override a recipe value (repeatable); the value is parsed as YAML")
        command.add_argument("--debug", action="store_true", help="show full tracebacks for bad input")
    train.add_argument("--output-dir", help="where metrics, samples and checkpoints go (overrides run.output_dir)")
    for command, output_dir in ((compare, "runs/compare"), (classic_compare, "runs/classic-compare")):
        command.add_argument("--output-dir", default=output_dir, help="one sub-directory per method and seed")
        command.add_argument("--methods", default="standard,iif,random",
                             help="comma-separated: standard, iif, random")
        command.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "compare": _compare, "classic": _classic_compare}[args.command](args)
    except UserError as err:
        if args.debug:
            raise
        print(f"llm-iif: error: {err}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from llm_iif.config import load_recipe

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides)
    quiet_libraries()

    from accelerate import Accelerator

    from llm_iif.trainer import PPOTrainer

    accelerator = Accelerator()
    try:
        start = time.perf_counter()
        trainer = PPOTrainer(recipe, accelerator)
        history = trainer.train()
        if accelerator.is_main_process:
            _print_summary(history, recipe.run.output_dir, time.perf_counter() - start)
    finally:
        accelerator.end_training()
    return 0


def _methods_and_seeds(args) -> tuple[list[str], list[int]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2") from None
    if not methods or not seeds:
        raise UserError("--methods and --seeds each need at least one entry")
    return methods, seeds


def _classic_compare(args) -> int:
    from llm_iif.classic import run_classic_compare

    methods, seeds = _methods_and_seeds(args)
    output_dir = Path(args.output_dir)
    summary = run_classic_compare(args.recipe, args.overrides, methods, seeds, output_dir)
    _print_comparison(summary, output_dir, reward_name="test return")
    return 0


def _compare(args) -> int:
    from llm_iif.compare import run_compare

    methods, seeds = _methods_and_seeds(args)
    quiet_libraries()

    from accelerate import Accelerator

    accelerator = Accelerator()
    try:
        output_dir = Path(args.output_dir)
        summary = run_compare(args.recipe, args.overrides, methods, seeds, output_dir, accelerator)
        if accelerator.is_main_process:
            _print_comparison(summary, output_dir)
    finally:
        accelerator.end_training()
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (per-load progress bars, upstream deprecation notes) out of training output."""
    import transformers

    # transformers warns about its own renamed attribute when peft wraps a model; nothing for users to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _print_summary(history: list[dict], output_dir: str, seconds: float) -> None:
    first, last = history[0], history[-1]
    tail = history[-3:]
    tail_reward = sum(m["reward_mean"] for m in tail) / len(tail)
    print(f"done: {len(history)} rounds in {seconds:.0f} s")
    print(f"  reward  round 0: {first['reward_mean']:+.3f}   last {len(tail)} rounds: {tail_reward:+.3f}")
    print(f"  distinct-2  round 0: {first['distinct_2']:.3f}   last round: {last['distinct_2']:.3f}")
    print(f"  outputs: {output_dir}/metrics.jsonl, samples.jsonl, reward_curve.png, final/")


def _print_comparison(summary: dict, output_dir, reward_name: str = "final reward") -> None:
    with_kl = all("final_kl" in entry for entry in summary["methods"].values())
    print(f"{'method':<10} {'s/round':>8} {'kept':>6} {reward_name:>13}" + (f" {'final KL':>9}" if with_kl else "")
          + f" {'SE_ave %':>10} {'SE_peak %':>10} {'RT_peak %':>10} {'rounds to std final':>20}")
    for method, entry in summary["methods"].items():
        row = (f"{method:<10} {entry['mean_round_s'][0]:>8.2f} {entry['mean_kept_fraction'][0]:>6.2f} "
               f"{entry['final_reward'][0]:>+13.3f}")
        if with_kl:
            row += f" {entry['final_kl'][0]:>9.2f}"
        vs = entry.get("vs_standard")
        if vs:
            row += (f" {_pm(vs['SE_ave'])} {_pm(vs['SE_peak'])} {_pm(vs['RT_peak'])}"
                    f" {vs['rounds_to_standard_final'][0]:>20.2f}")
        print(row)
    written = ", ".join(path.name for path in sorted(Path(output_dir).glob("*.*")))
    print(f"outputs in {output_dir}: {written}")


def _pm(stat) -> str:
    mean, sem = stat
    return f"{mean:>+5.0f}±{sem:<4.0f}"
