"""How much folding the batch target by row, instead of by group, biases GRPO influence scores.

    .venv/bin/python benchmarks/grpo_fold_bias.py [--recipe recipes/tiny-addition-grpo.yaml] [--steps 20]

With ``iif.target_source: batch`` a completion is scored against the target built from the other folds. When
folds follow the row index, half of a completion's groupmates sit in its target; a group's advantages sum to
zero, so those groupmates' terms can add to its score a term that grows with Â_i². IIFGRPOTrainer folds whole
groups instead (`llm_iif.grpo.groups.group_ids`).

This trains IIF-GRPO from the recipe for ``--steps`` steps and, at every generation batch, scores the same
completions at the same θ(k) both ways. Per batch it fits d_i = I_row,i − I_group,i ≈ a + b·Â_i² and prints the
medians over the batches of: b (in units of the median |I_group|), the share of the variance of d that Â²
explains (R²), the correlation of each score with Â², and the share of completions whose sign (the neg-bottom
keep decision) differs between the two. Scores are taken in one run, so θ(k) follows the group-folded filter.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from llm_iif.recipes import GRPORecipe, load_recipe
from llm_iif.grpo import IIFGRPOTrainer
from llm_iif.grpo.run import bare_trainer

REPO = Path(__file__).resolve().parents[1]


def both_fold_layouts(trainer: IIFGRPOTrainer, found: list[dict]):
    """Wrap the stage's cross-fitted scoring so that each batch is also scored with folds by row."""
    stage, scored = trainer._scoring.stage, trainer._scoring.stage.cross_fitted_scores
    make_loss = trainer._scoring.loss_and_target

    def loss_and_target(batch):
        found.append({"advantages": batch["advantages"].detach().clone()})
        return make_loss(batch)

    def cross_fitted_scores(model, loss_and_target, batch_size, precondition=None, groups=None):
        by_row, _ = scored(model, loss_and_target, batch_size, precondition)
        by_group, split_cos = scored(model, loss_and_target, batch_size, precondition, groups)
        found[-1].update(by_row=by_row.detach().cpu(), by_group=by_group.detach().cpu())
        return by_group, split_cos

    trainer._scoring.loss_and_target = loss_and_target
    stage.cross_fitted_scores = cross_fitted_scores


def batch_statistics(advantages: torch.Tensor, by_row: torch.Tensor, by_group: torch.Tensor) -> dict:
    squared = advantages.float().cpu() ** 2
    difference = by_row - by_group
    design = torch.stack([torch.ones_like(squared), squared], dim=1)
    coefficients = torch.linalg.lstsq(design, difference[:, None]).solution.flatten()
    residual = difference - design @ coefficients
    scale = by_group.abs().median().item()
    return {"slope": coefficients[1].item() / scale,
            "r2": 1 - residual.var().item() / difference.var().item(),
            "corr_row": torch.corrcoef(torch.stack([by_row, squared]))[0, 1].item(),
            "corr_group": torch.corrcoef(torch.stack([by_group, squared]))[0, 1].item(),
            "sign_flips": ((by_row < 0) != (by_group < 0)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-addition-grpo.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides, kind=GRPORecipe)
    recipe.iif.enabled, recipe.iif.target_source = True, "batch"
    found: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bare_trainer(recipe, Path(tmp), args.steps, iif=recipe.iif)
        both_fold_layouts(trainer, found)
        trainer.train()
    rows = [batch_statistics(f["advantages"], f["by_row"], f["by_group"]) for f in found
            if "by_row" in f and f["advantages"].abs().sum() > 0]
    print(f"{args.recipe}: {len(rows)} generation batches of {len(found[0]['advantages'])} completions "
          f"({trainer.num_generations} per prompt), {recipe.iif.folds} folds")
    for key, label in [("slope", "slope b of I_row - I_group on Â², per median |I_group|"),
                       ("r2", "R² of that fit"),
                       ("corr_row", "corr(I_row, Â²)"), ("corr_group", "corr(I_group, Â²)"),
                       ("sign_flips", "completions whose score sign differs")]:
        values = [r[key] for r in rows]
        print(f"{label:<58} median {statistics.median(values):+.3f}   "
              f"[{min(values):+.3f}, {max(values):+.3f}] over batches")


if __name__ == "__main__":
    main()
