"""How far PPO's in-run scoring is from the separate path over a whole run: kept sets, scores, and the first
epoch's stale gradients.

    .venv/bin/python benchmarks/ppo_in_run_agreement.py [--recipe recipes/tiny-sentiment.yaml] [--rounds 24]

Trains IIF-PPO with ``iif.scoring: in-run`` (`llm_iif.training.in_run`). Every round the separate pass also
scores the same rollout at θ(k) (its decision is not used), and at every step of the first epoch the gradient
that in-run scoring takes (at θ(k)) is compared with the one the update would take on the same rows at the
parameters the earlier steps reached, by autograd. Prints, per round, the kept sets' agreement and the largest
score difference; at the end, per step of the first epoch, the mean cosine between the two gradients and the
norm of their difference over the norm of the update's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from llm_iif.recipes import load_recipe
from llm_iif.lm.iif import minibatch_loss, ppo_terms
from llm_iif.training import build_trainer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-sentiment.yaml"))
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.iif.enabled, recipe.iif.scoring = True, "in-run"
    with tempfile.TemporaryDirectory() as tmp:
        recipe.run.rounds, recipe.run.output_dir, recipe.run.report_to = args.rounds, tmp, []
        trainer = build_trainer(recipe)
        rounds, steps = compare_every_round(trainer)
        trainer.train()
    agreed, total = sum(r[0] for r in rounds), sum(r[1] for r in rounds)
    print(f"\n{Path(args.recipe).name}, {len(rounds)} rounds: kept sets agree on {agreed} of {total} samples "
          f"({agreed / total:.2%}); largest score difference over the largest score: {max(r[2] for r in rounds):.2e}")
    print("\n| first-epoch step | cosine, in-run's gradient against the update's | ‖difference‖ / ‖update's‖ |")
    print("|---|---|---|")
    for m, pairs in sorted(steps.items()):
        print(f"| {m + 1} | {statistics.mean(p[0] for p in pairs):.4f} (min {min(p[0] for p in pairs):.4f}) | "
              f"{statistics.mean(p[1] for p in pairs):.4f} (max {max(p[1] for p in pairs):.4f}) |")


def compare_every_round(trainer) -> tuple[list[tuple[int, int, float]], dict[int, list[tuple[float, float]]]]:
    """Wrap the trainer's selection so that every round is compared; returns the lists it fills: per round
    (samples both kept or both dropped, samples, largest score difference over the largest score), and per
    first-epoch step m, (cosine, relative difference) of each round."""
    rounds, steps = [], defaultdict(list)
    select = trainer.select
    policy = trainer.accelerator.unwrap_model(trainer.policy)

    def select_and_compare(rollout, advantages):
        selection, first_epoch = select(rollout, advantages)
        in_run, trainer.in_run = trainer.in_run, None
        reference, _ = select(rollout, advantages) if trainer.recipe.iif.target_source == "batch" else (None, None)
        if reference is None:  # the same target rows as the in-run pass
            influence, split_cos = trainer.iif.influence(trainer.policy, trainer.per_sample_losses(rollout, advantages),
                                                         len(rollout), rows=trainer.iif.target_rows)
            reference = trainer.iif.selection(influence, split_cos, len(rollout), preconditioned=False)
        trainer.in_run = in_run
        agreed = int((selection.keep == reference.keep).sum())
        scale = reference.influence.abs().max().clamp(min=1e-30)
        difference = float((selection.influence - reference.influence).abs().max() / scale)
        rounds.append((agreed, len(rollout), difference))
        print(f"round {len(rounds) - 1:>3}: kept sets agree on {agreed}/{len(rollout)}, largest score difference "
              f"{difference:.2e} of the largest score", flush=True)
        kept = selection.keep.nonzero().flatten()
        set_gradients, step = first_epoch.set_gradients, [0]

        def set_and_compare(rows, model, accelerator):
            result = set_gradients(rows, model, accelerator)
            if len(rows):
                expected = minibatch_gradient(trainer, policy, rollout.select(kept[rows]),
                                              advantages.select(kept[rows]))
                ours = torch.cat([policy.get_parameter(n).grad.flatten() for n in expected])
                want = torch.cat([g.flatten() for g in expected.values()])
                steps[step[0]].append((float(torch.nn.functional.cosine_similarity(ours, want, dim=0)),
                                       float((ours - want).norm() / want.norm())))
            step[0] += 1
            return result

        first_epoch.set_gradients = set_and_compare
        return selection, first_epoch

    trainer.select = select_and_compare
    return rounds, steps


def minibatch_gradient(trainer, policy, batch, advantages) -> dict[str, torch.Tensor]:
    """The update's gradient of a minibatch's token-mean loss at the current parameters, by autograd."""
    terms = ppo_terms(*policy(batch.input_ids, batch.attention_mask), batch, advantages.advantages,
                      advantages.returns, trainer.cfg)
    loss = minibatch_loss(terms, batch.response_mask, trainer.cfg.vf_coef)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    return dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()))))


if __name__ == "__main__":
    main()
