"""Methods × seeds comparisons for LM recipes and classic recipes."""

from __future__ import annotations

import json
from pathlib import Path

from llm_iif.analysis.plots import plot_influence, plot_reward_curves
from llm_iif.analysis.summary import METHODS, summarize
from llm_iif.classic.iif_ppo import CLASSIC_METHODS
from llm_iif.classic.train import train_classic


def run_compare(recipe_path: str, overrides: list[str], methods: list[str], seeds: list[int], output_dir: Path,
                accelerator) -> dict:
    """Train every (method, seed) pair in turn and write the comparison outputs; returns the summary."""
    from llm_iif.core.config import load_recipe
    from llm_iif.core.errors import UserError
    from llm_iif.core.fileio import atomic_write_text
    from llm_iif.training.trainer import PPOTrainer

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method '{unknown[0]}' (expected some of: {', '.join(METHODS)})")
    histories: dict[str, dict[int, list[dict]]] = {m: {} for m in methods}
    for seed in seeds:
        for method in methods:
            run_dir = output_dir / method / f"seed-{seed}"
            recipe = load_recipe(recipe_path, [*overrides, *METHODS[method], f"run.seed={seed}",
                                               f"run.output_dir={run_dir}"])
            if accelerator.is_main_process:
                print(f"== {method}, seed {seed} -> {run_dir}", flush=True)
            histories[method][seed] = PPOTrainer(recipe, accelerator).train()
            accelerator.free_memory()
    summary = summarize(histories)
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
        plot_reward_curves(summary, output_dir / "reward_curves.png")
        if "iif" in methods:
            plot_influence(output_dir / "iif", seeds, output_dir / "influence.png")
        from llm_iif.analysis.report import write_report

        write_report(output_dir)
    return summary


def run_classic_compare(recipe_path: str, overrides: list[str], methods: list[str], seeds: list[int],
                        output_dir: Path) -> dict:
    """`llm-iif classic compare`: every (method, seed) pair into OUTPUT_DIR/METHOD/seed-S, then summary.json
    and reward_curves.png with the paper's SE_ave / SE_peak / RT_peak (see `llm_iif.compare`)."""
    import json

    from llm_iif.analysis.plots import plot_reward_curves
    from llm_iif.analysis.summary import summarize
    from llm_iif.core.config import ClassicRecipe, load_recipe
    from llm_iif.core.errors import UserError
    from llm_iif.core.fileio import atomic_write_text

    unknown = [m for m in methods if m not in CLASSIC_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method '{unknown[0]}' (expected some of: {', '.join(CLASSIC_METHODS)})")
    histories: dict[str, dict[int, list[dict]]] = {m: {} for m in methods}
    for seed in seeds:
        recipe = load_recipe(recipe_path, [*overrides, f"run.seed={seed}"], kind=ClassicRecipe)
        for method in methods:
            run_dir = output_dir / method / f"seed-{seed}"
            print(f"== {method}, seed {seed} -> {run_dir}", flush=True)
            mode, p = CLASSIC_METHODS[method](recipe.iif)
            histories[method][seed] = train_classic(recipe, mode, p, run_dir)
    summary = summarize(histories)
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    plot_reward_curves(summary, output_dir / "reward_curves.png", ylabel="test return (stochastic policy)")
    return summary

