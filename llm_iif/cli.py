"""Command line for llm_iif.

    llm-iif train RECIPE [--set section.key=value ...] [--output-dir DIR] [--overwrite] [--debug]
    llm-iif train [RECIPE] --resume RUN_DIR [--set run.rounds=N]
    llm-iif compare RECIPE [--methods standard,iif,random] [--seeds 0,1,2] [--set ...] [--output-dir DIR] [--overwrite]
    llm-iif classic compare RECIPE [--methods ...] [--seeds ...] [--set ...] [--output-dir DIR] [--overwrite]
    llm-iif classic diagnose RECIPE [--round K] [--action-target S,A] [--bottom N] [--set ...] [--output-dir DIR]
    llm-iif classic intervene RECIPE [--rounds 1-10] [--seeds 0,1,2] [--set ...] [--output-dir DIR]
    llm-iif reward train RECIPE [--set ...] [--output-dir DIR]
    llm-iif suite SUITE.yaml [--tasks NAME,...] [--output-dir DIR] [--overwrite]

Bad input (a `UserError`) prints one line and exits with code 2; ``--debug`` shows the traceback instead. A
comparison or suite stopped by SIGINT or SIGTERM, or Ctrl-C outside training, exits with code 130.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
import time
import warnings

from llm_iif.analysis.diagnosis import diagnose, intervene
from llm_iif.analysis.grid import LM_METHODS, RunStopped, run_classic_compare, run_compare, run_grpo_compare
from llm_iif.analysis.plots import run_title, write_run_figures
from llm_iif.analysis.report import write_report
from llm_iif.analysis.statistics import interval_table
from llm_iif.analysis.suite import load_suite, run_suite
from llm_iif.analysis.summary import BUDGET_FRACTIONS
from llm_iif.recipes import ClassicRecipe, GRPORecipe, RewardTrainRecipe, load_recipe, recipe_kind
from llm_iif.core.distributed import process_group_released
from llm_iif.core.errors import UserError
from llm_iif.core.imports import require_classic
from llm_iif.runs.paths import RunPaths, SuitePaths
from llm_iif.training import build_trainer
from llm_iif.models.builtins import resolve_builtin
from llm_iif.training.factory import make_accelerator
from llm_iif.models.reward_model import train_reward_model
from llm_iif.runs.outputs import check_writable_directory, claim_run_directory
from llm_iif.runs.state import finished, resolve_resume


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-iif", description="PPO with influence-based rollout filtering")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run PPO (with IIF when the recipe enables it) on a recipe")
    compare = commands.add_parser("compare", help="train standard PPO, IIF and random filtering side by side")
    classic = commands.add_parser("classic", help="IIF for Stable-Baselines3 PPO on gymnasium environments")
    classic_commands = classic.add_subparsers(dest="classic_command", required=True)
    classic_compare = classic_commands.add_parser(
        "compare", help="standard PPO, IIF and random filtering side by side on a recipes/classic/ recipe")
    diagnose = classic_commands.add_parser(
        "diagnose", help="influence of round K's records against Monte-Carlo advantages (discrete states)")
    intervene = classic_commands.add_parser(
        "intervene", help="redo chosen rounds' updates without negative-influence or random records")
    report = commands.add_parser("report", help="write RUN_DIR/report.html for a train or compare run")
    report.add_argument("run_dir", help="a run directory (llm-iif train) or a compare directory")
    report.add_argument("--round", type=int, help="the round whose top and bottom samples are tabled (default: last)")
    report.add_argument("--top", type=int, default=5, help="samples at each end of the table")
    report.add_argument("--debug", action="store_true", help="show full tracebacks for bad input")
    suite = commands.add_parser("suite", help="run a benchmark suite (tasks × methods × seeds) and write its "
                                              "scorecard; run it again to continue where it stopped")
    suite.add_argument("suite", help="a suite file, e.g. benchmarks/suites/quick.yaml")
    suite.add_argument("--tasks", help="comma-separated: run only these tasks of the suite")
    suite.add_argument("--output-dir", help="where the suite writes (overrides the suite file's output_dir)")
    suite.add_argument("--overwrite", action="store_true",
                       help="delete the outputs of another suite in the output directory first (without it, such a "
                            "directory is refused; the same suite continues)")
    suite.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. for logs)")
    suite.add_argument("--debug", action="store_true", help="show full tracebacks for bad input")
    reward = commands.add_parser("reward", help="reward models")
    reward_train = reward.add_subparsers(dest="reward_command", required=True).add_parser(
        "train", help="train a reward model on preference pairs with trl's RewardTrainer")
    train.add_argument("recipe", nargs="?", help="path to a YAML recipe, e.g. recipes/tiny-sentiment.yaml "
                                                 "(with --resume, the run's own recipe.yaml when left out)")
    for command in (compare, classic_compare, diagnose, intervene, reward_train):
        command.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/tiny-sentiment.yaml")
    for command in (train, compare, classic_compare, diagnose, intervene, reward_train):
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override a recipe value (repeatable); the value is parsed as YAML")
        command.add_argument("--debug", action="store_true", help="show full tracebacks for bad input")
    train.add_argument("--output-dir", help="where metrics, samples and checkpoints go (overrides run.output_dir)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from the checkpoint with the most completed rounds (or from "
                            "RUN_DIR/checkpoint-N); --set run.rounds=N extends a finished run")
    reward_train.add_argument("--output-dir", help="where model/ and eval.json go (overrides run.output_dir)")
    for command, output_dir in ((compare, "runs/compare"), (classic_compare, "runs/classic-compare")):
        command.add_argument("--output-dir", default=output_dir, help="one sub-directory per method and seed")
    for command, what in ((train, "run"), (compare, "comparison"), (classic_compare, "comparison")):
        command.add_argument("--overwrite", action="store_true",
                             help=f"delete the outputs of an earlier {what} in the output directory first "
                                  "(without it, such a directory is refused)")
    for command in (compare, classic_compare):  # not train: it trains one run of its recipe
        command.add_argument("--methods", default="standard,iif,random",
                             help="comma-separated: standard, iif, random")
        command.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    diagnose.add_argument("--round", type=int, default=5, help="the round k whose buffer B(k) is analysed at θ(k)")
    diagnose.add_argument("--bottom", type=int, default=20, help="how many bottom records to list")
    diagnose.add_argument("--action-target", metavar="STATE,ACTION",
                          help="also score every record's influence on log π(ACTION|STATE)")
    diagnose.add_argument("--output-dir", default="runs/classic-diagnose")
    intervene.add_argument("--rounds", default="1-10", help="rounds to intervene in: 1,2,5 or 1-10")
    intervene.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    intervene.add_argument("--output-dir", default="runs/classic-intervene")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sub = {"classic": "classic_command", "reward": "reward_command"}.get(args.command)
        command = f"{args.command} {getattr(args, sub)}" if sub else args.command
        return COMMANDS[command](args)
    except UserError as err:
        if args.debug:
            raise
        print(f"llm-iif: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (loading, a second Ctrl-C); in training the round finishes first
        if args.debug:
            raise
        print("llm-iif: interrupted", file=sys.stderr)
        return 130


def _train(args) -> int:
    overrides = list(args.overrides)
    checkpoint, recipe_path = None, args.recipe
    if args.resume:
        for given, option in ((args.output_dir, "--output-dir"), (args.overwrite, "--overwrite")):
            if given:
                raise UserError(f"--resume continues the run it names; leave out {option}")
        run_dir, checkpoint = resolve_resume(Path(args.resume))
        overrides.append(f"run.output_dir={run_dir}")
        recipe_path = recipe_path or RunPaths(run_dir).recipe
    elif args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if recipe_path is None:
        raise UserError("train: expected a RECIPE, or --resume RUN_DIR (which reads RUN_DIR/recipe.yaml)")
    if recipe_kind(recipe_path) is GRPORecipe:
        return _train_grpo(args, recipe_path, overrides, checkpoint)
    recipe = load_recipe(recipe_path, overrides)
    if checkpoint is None:
        claim_run_directory(RunPaths(recipe.run.output_dir), args.overwrite)  # before the slow model loading
    else:
        check_writable_directory(recipe.run.output_dir)
        if finished(checkpoint, recipe):  # e.g. a requeued job whose run had already finished
            print(f"llm-iif: {checkpoint} has completed all {recipe.run.rounds} rounds; nothing to do "
                  "(--set run.rounds=N extends the run)", file=sys.stderr)
            return 0
    quiet_libraries()

    accelerator = make_accelerator(recipe)
    trainer = None
    try:
        start = time.perf_counter()
        trainer = build_trainer(recipe, accelerator)
        history = trainer.train(resume_from=checkpoint, overwrite=args.overwrite)
        if accelerator.is_main_process:
            if trainer.stopped_by:  # the run's recipe.yaml holds every override, so the command needs none
                print(f"llm-iif: stopped by {trainer.stopped_by} after round {len(history)} of "
                      f"{recipe.run.rounds}; checkpoint {trainer.checkpoint}. "
                      f"Resume with: llm-iif train --resume {shlex.quote(recipe.run.output_dir)}", file=sys.stderr)
            else:
                paths = RunPaths(recipe.run.output_dir)
                write_run_figures(paths.root, history, run_title(recipe))
                write_report(paths.root)
                _print_summary(history, recipe.run.output_dir, time.perf_counter() - start)
    finally:
        # Release the DDP-wrapped policy while the process group still exists: released after end_training,
        # gloo's teardown can wait forever for a process that has already exited.
        del trainer
        accelerator.free_memory()
        accelerator.end_training()
    return 0


def _train_grpo(args, recipe_path: str, overrides: list[str], checkpoint: Path | None) -> int:
    from accelerate import PartialState

    from llm_iif.grpo.run import grpo_run_title, train_grpo

    recipe = load_recipe(recipe_path, overrides, kind=GRPORecipe)
    quiet_libraries()
    start = time.perf_counter()
    with process_group_released():
        result = train_grpo(recipe, overwrite=args.overwrite, resume_from=checkpoint)
    if not PartialState().is_main_process:
        return 0
    if result.already_finished:
        print(f"llm-iif: {checkpoint} has completed all {recipe.run.steps} steps; nothing to do "
              "(--set run.steps=N extends the run)", file=sys.stderr)
        return 0
    output_dir = recipe.run.output_dir
    if result.stopped_by:  # the run's recipe.yaml holds every override, so the command needs none
        print(f"llm-iif: stopped by {result.stopped_by} after step {len(result.history)} of {recipe.run.steps}; "
              f"checkpoint {result.checkpoint}. Resume with: llm-iif train --resume {shlex.quote(output_dir)}",
              file=sys.stderr)
        return 0
    history = result.history
    write_run_figures(Path(output_dir), history, grpo_run_title(recipe))
    write_report(Path(output_dir))
    print(f"done: {len(history)} steps in {time.perf_counter() - start:.0f} s")
    evaluated = [m for m in history if "reward_mean" in m]
    if evaluated:
        first, last = evaluated[0], evaluated[-1]
        print(f"  held-out {next(iter(recipe.rewards)).split(':')[-1]}  after step {first['step']}: "
              f"{first['reward_mean']:.3f}   after step {last['step']}: {last['reward_mean']:.3f}   KL {last['kl']:.3f}")
    print(f"  outputs: {output_dir}/report.html, metrics.jsonl, samples.jsonl, records/, reward_curve.png, "
          "final/ (LoRA adapter), tensorboard/")
    return 0


def _methods_and_seeds(args) -> tuple[list[str], list[int]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError(f"--methods: expected at least one of {', '.join(LM_METHODS)}")
    return methods, _integers(args.seeds, "--seeds", "comma-separated integers, e.g. 0,1,2")


def _classic_compare(args) -> int:
    require_classic()
    methods, seeds = _methods_and_seeds(args)
    output_dir = Path(args.output_dir)
    summary = run_classic_compare(args.recipe, args.overrides, methods, seeds, output_dir, args.overwrite)
    _print_comparison(summary, output_dir, reward_name="test return")
    return 0


def _classic_diagnose(args) -> int:
    require_classic()
    recipe = load_recipe(args.recipe, args.overrides, kind=ClassicRecipe)
    action_target = None
    if args.action_target:
        action_target = _integers(args.action_target, "--action-target", "STATE,ACTION, e.g. 14,2")
        if len(action_target) != 2:
            raise UserError(f"--action-target {args.action_target}: expected STATE,ACTION, e.g. 14,2")
    output_dir = Path(args.output_dir)
    check_writable_directory(output_dir, "--output-dir")
    result = diagnose(recipe, args.round, output_dir, bottom=args.bottom,
                      action_target=tuple(action_target) if action_target else None)
    print(f"{result['env']}, round {result['round']}: {result['records']} records with a Monte-Carlo advantage")
    print(f"  sign mismatch (Ā·Â < 0)   top 20%: {result['sign_mismatch_top']:.0%}   "
          f"bottom 20%: {result['sign_mismatch_bottom']:.0%}   all: {result['sign_mismatch_all']:.0%}")
    print(f"  mean |Ā − Â|              top 20%: {result['mean_abs_gap_top']:.3f}   "
          f"bottom 20%: {result['mean_abs_gap_bottom']:.3f}   all: {result['mean_abs_gap_all']:.3f}")
    print(f"  Spearman(influence, Ā·Â) {result['spearman_influence_vs_mc_times_gae']:+.2f}  "
          f"(against rank, as the paper reports it: {result['spearman_rank_vs_mc_times_gae']:+.2f})")
    print(f"  bottom {len(result['bottom_records'])} records (state, action, Â, Ā, influence):")
    for row in result["bottom_records"]:
        print(f"    {row['state']:>5} {row['action']:>6} {row['gae_advantage']:>+8.3f} {row['mc_advantage']:>+8.3f} "
              f"{row['influence']:>+10.4f}")
    written = ", ".join(path.name for path in sorted(output_dir.glob("*.*")))
    print(f"outputs in {output_dir}: {written}")
    return 0


def _classic_intervene(args) -> int:
    require_classic()
    recipe = load_recipe(args.recipe, args.overrides, kind=ClassicRecipe)
    rounds = _round_list(args.rounds)
    seeds = _integers(args.seeds, "--seeds", "comma-separated integers, e.g. 0,1,2")
    output_dir = Path(args.output_dir)
    check_writable_directory(output_dir, "--output-dir")
    summary = intervene(recipe, rounds, seeds, output_dir)
    print(f"{summary['env']}: Δ test return against the update on all records, over {len(seeds)} seed(s)")
    print(f"{'round':>5} {'drop negatives: median Δ':>25} {'Δ>0':>5} {'Δ<0':>5} {'drop random: median Δ':>22} "
          f"{'Δ>0':>5} {'Δ<0':>5}")
    for row in summary["per_round"]:
        print(f"{row['round']:>5} {row['median_delta_influence']:>+25.3f} {row['share_positive_influence']:>5.0%} "
              f"{row['share_negative_influence']:>5.0%} {row['median_delta_random']:>+22.3f} "
              f"{row['share_positive_random']:>5.0%} {row['share_negative_random']:>5.0%}")
    written = ", ".join(path.name for path in sorted(output_dir.glob("*.*")))
    print(f"outputs in {output_dir}: {written}")
    return 0


def _integers(text: str, option: str, expected: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: expected {expected}") from None
    if not values:
        raise UserError(f"{option} {text}: expected {expected}")
    return values


def _round_list(text: str) -> list[int]:
    """'1,2,5' or '1-10' (inclusive) -> a list of rounds."""
    first, dash, last = text.partition("-")
    try:
        if dash and "," not in text:
            return list(range(int(first), int(last) + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--rounds {text}: expected 1,2,5 or 1-10") from None


def _compare(args) -> int:
    methods, seeds = _methods_and_seeds(args)
    quiet_libraries()
    output_dir = Path(args.output_dir)
    try:
        if recipe_kind(args.recipe) is GRPORecipe:
            with process_group_released():
                summary = run_grpo_compare(args.recipe, args.overrides, methods, seeds, output_dir, args.overwrite)
            _print_comparison(summary, output_dir, reward_name="final held-out")
            return 0
        accelerator = make_accelerator(load_recipe(args.recipe, args.overrides))
        try:
            summary = run_compare(args.recipe, args.overrides, methods, seeds, output_dir, accelerator,
                                  build_trainer, args.overwrite)
            if accelerator.is_main_process:
                _print_comparison(summary, output_dir)
        finally:
            accelerator.end_training()
    except RunStopped as err:
        return _stopped(f"compare {err}; a comparison cannot be resumed: start it again, or run it in a suite "
                        "(llm-iif suite), which keeps finished runs")
    return 0


def _stopped(message: str) -> int:
    """A comparison or suite whose run a signal stopped: one line, and exit code 130, as for Ctrl-C."""
    print(f"llm-iif: {message}", file=sys.stderr)
    return 130


def _suite(args) -> int:
    suite = load_suite(args.suite, args.output_dir)
    only = None
    if args.tasks is not None:
        only = [name.strip() for name in args.tasks.split(",") if name.strip()]
        if not only:
            raise UserError(f"--tasks {args.tasks!r}: expected task names, comma-separated (the suite has: "
                            f"{', '.join(task.name for task in suite.tasks)})")
    command = ["llm-iif", "suite", args.suite, *(["--tasks", args.tasks] if args.tasks else []),
               *(["--output-dir", args.output_dir] if args.output_dir else [])]
    quiet_libraries()
    try:
        run_suite(suite, shlex.join(command), build_trainer, args.overwrite, only, progress=not args.no_progress)
    except RunStopped as err:
        return _stopped(f"suite {err}; run the same command again to continue (finished runs are kept)")
    paths = SuitePaths(suite.output_dir)
    print(f"\n{paths.scorecard_markdown.read_text()}")
    print(f"outputs in {paths.root}: scorecard.md, scorecard.json, scorecard.png, one comparison per task")
    return 0


def _reward_train(args) -> int:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides, kind=RewardTrainRecipe)
    check_writable_directory(recipe.run.output_dir)
    quiet_libraries()
    metrics = train_reward_model(recipe, base_model=resolve_builtin(recipe.model.name_or_path))
    print(f"held-out pairwise accuracy {metrics['heldout_accuracy']:.3f} on {metrics['heldout_pairs']} pairs "
          f"(train {metrics['train_accuracy']:.3f}, {metrics['train_pairs']} training pairs)")
    chat = ", chat_template: true" if metrics["chat_template"] else ""  # it learnt conversations written as text
    print(f"outputs in {recipe.run.output_dir}: model/ (load it with reward.name: hf-classifier, "
          f"input: prompt+response, append_eos: true{chat}), eval.json")
    return 0


def _report(args) -> int:
    print(f"wrote {write_report(Path(args.run_dir), args.round, args.top)}")
    return 0


COMMANDS = {"train": _train, "compare": _compare, "report": _report, "classic compare": _classic_compare,
            "classic diagnose": _classic_diagnose, "classic intervene": _classic_intervene,
            "reward train": _reward_train, "suite": _suite}


def quiet_libraries() -> None:
    """Keep library chatter (per-load progress bars, upstream deprecation notes) out of training output."""
    import transformers

    # transformers warns about its own renamed attribute when peft wraps a model; nothing for users to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # trl's GRPOConfig still sets transformers' renamed gradient_checkpointing field; peft notes that GPT-2's
    # Conv1D layers need fan_in_fan_out and sets it itself.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out is set to False.*", category=UserWarning)
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
    print(f"  outputs: {output_dir}/report.html, metrics.jsonl, samples.jsonl, reward_curve.png, final/")


def _print_comparison(summary: dict, output_dir, reward_name: str = "final reward") -> None:
    """One row per method; the last five columns are fractions of standard PPO's budget (see
    `llm_iif.analysis.summary.efficiency`): rounds and seconds to standard's final reward and to its peak,
    and the median round time against standard's."""
    with_kl = all("final_kl" in entry and "kl_spikes" in entry for entry in summary["methods"].values())
    print(f"{'method':<11} {'s/round':>8} {'kept':>6} {reward_name:>13}"
          + (f" {'final KL':>9} {'KL spikes':>10}" if with_kl else "")
          + f" {'SE_ave %':>10} {'SE_peak %':>10} {'RT_peak %':>10}"
          + "".join(f" {column:>12}" for column in BUDGET_FRACTIONS.values()))
    for method, entry in summary["methods"].items():
        row = (f"{method:<11} {entry['mean_round_s'][0]:>8.2f} {entry['mean_kept_fraction'][0]:>6.2f} "
               f"{entry['final_reward'][0]:>+13.3f}")
        if with_kl:  # spikes: rounds above 3 × the median KL of standard's run of the same seed
            row += f" {entry['final_kl'][0]:>9.2f} {entry['kl_spikes'][0]:>10.1f}"
        vs = entry.get("vs_baseline")
        if vs:
            row += f" {_pm(vs['SE_ave'])} {_pm(vs['SE_peak'])} {_pm(vs['RT_peak'])}"
            row += "".join(f" {vs[key][0]:>12.2f}" for key in BUDGET_FRACTIONS)
        print(row)
    for key in sorted({k for entry in summary["methods"].values() for k in entry if k.startswith("final_reward/")}):
        print(f"{key[len('final_'):]} (not trained on), last rounds: " + ", ".join(
            f"{method} {entry[key][0]:+.3f}±{entry[key][1]:.3f}" for method, entry in summary["methods"].items()
            if key in entry))
    header, rows = interval_table(summary)
    if rows:
        seeds = len(next(iter(summary["methods"].values()))["seeds"])
        print(f"\nAgainst standard, over {seeds} seeds: IQM [95% stratified bootstrap interval]; ratios (1 = standard) "
              "and differences (0 = standard); ≈ marks no measurable difference")
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        for row in (header, *rows):
            print("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)))
    written = ", ".join(path.name for path in sorted(Path(output_dir).glob("*.*")))
    print(f"outputs in {output_dir}: {written}")


def _pm(stat) -> str:
    mean, sem = stat
    return f"{mean:>+5.0f}±{sem:<4.0f}"
