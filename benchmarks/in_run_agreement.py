"""How close in-run scores stay to the separate scoring pass's over a whole run: kept sets and scores, step by step.

    .venv/bin/python benchmarks/in_run_agreement.py [--recipe recipes/tiny-addition-grpo.yaml] [--steps 20]

Trains IIF-GRPO with ``iif.scoring: in-run`` (the recipe's IIF settings with the batch target, no group
filter). At every generation batch the separate scoring pass also scores the same candidates at θ(k)
(`GRPOScoring.decide`; its decision is not used), and at the end of the batch's accumulation
window the two are compared: the share of candidates that both keep or both drop, and the largest difference
between the two scores over the largest score. Prints one line per step, then the totals.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


from llm_iif.recipes import GRPORecipe, load_recipe
from llm_iif.grpo import IIFGRPOTrainer
from llm_iif.grpo.run import bare_trainer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-addition-grpo.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides, kind=GRPORecipe)
    recipe.iif.enabled, recipe.iif.target_source, recipe.iif.scoring = True, "batch", "in-run"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bare_trainer(recipe, Path(tmp), args.steps, iif=recipe.iif)
        steps = compare_every_step(trainer)
        trainer.train()
    agreed = sum(s[0] for s in steps)
    total = sum(s[1] for s in steps)
    print(f"\n{Path(args.recipe).name}, {len(steps)} steps: kept sets agree on {agreed} of {total} candidates "
          f"({agreed / total:.2%}); largest score difference over the largest score: "
          f"{max(s[2] for s in steps):.2e}")


def compare_every_step(trainer: IIFGRPOTrainer) -> list[tuple[int, int, float]]:
    """Wrap the trainer's window so that every step is compared; returns the list it fills with (candidates
    both kept or both dropped, candidates, largest score difference over the largest score)."""
    steps, separate, scoring = [], {}, trainer._scoring
    open_window, close_window = scoring.open_window, scoring.close_window

    def open_and_score_separately(model, batch, candidates, groups, chunks):
        keep, influence, _ = scoring.decide(model, batch, candidates, groups)
        separate.update(rows=candidates.nonzero().flatten().cpu(), keep=keep.cpu(), influence=influence)
        return open_window(model, batch, candidates, groups, chunks)

    def close_and_compare(model):
        in_run_keep, in_run, metrics = close_window(model)
        rows = separate["rows"]
        reference = separate["influence"][rows]
        agreed = int((in_run_keep.cpu()[rows] == separate["keep"][rows]).sum())
        scale = reference.abs().max().clamp(min=1e-30)
        difference = float(((in_run[rows] - reference).abs().max() / scale).item()) if len(rows) else 0.0
        steps.append((agreed, len(rows), difference))
        print(f"step {len(steps):>3}: kept sets agree on {agreed}/{len(rows)}, largest score difference "
              f"{difference:.2e} of the largest score", flush=True)
        return in_run_keep, in_run, metrics

    scoring.open_window, scoring.close_window = open_and_score_separately, close_and_compare
    return steps


if __name__ == "__main__":
    main()
