"""Command line: ``llm-iif train RECIPE [--set section.key=value ...] [--output-dir DIR] [--debug]``.

Bad input (a `UserError`) prints one line and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from llm_iif.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-iif", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run PPO on a recipe")
    train.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/tiny-sentiment.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value (repeatable); the value is parsed as YAML")
    train.add_argument("--output-dir", help="where metrics, samples and checkpoints go (overrides run.output_dir)")
    train.add_argument("--debug", action="store_true", help="show full tracebacks for bad input")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _train(args)
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
