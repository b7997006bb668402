"""Why a trusted margin can rise while the gold score falls: each PPO run's mean log π(chosen) and log π(rejected)
over its trusted triples, under the base model and under the run's final adapter.

    .venv/bin/python benchmarks/trusted_logprobs.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a finished PPO run with a ``trusted`` section (e.g. runs/suite-flawed-rewards/overopt-length/iif/seed-11).
Its recipe.yaml rebuilds the policy and the triples; its final/adapter_model.safetensors is loaded into it. Prints,
per run, the mean summed log-probability of the chosen and of the rejected responses (nats; per token in
brackets) before and after, and the margin between them. A margin that widens because both fall, the rejected
faster, is a policy that grew less likely to write either answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from llm_iif.recipes import recipe_from_dict
from llm_iif.core.errors import UserError
from llm_iif.training import build_trainer


def mean_logprobs(trusted, model) -> tuple[float, float, float, float]:
    """(chosen, rejected) mean summed log-probs, then (chosen, rejected) mean per-token log-probs, over ``trusted``."""
    rows = trusted.rows
    with torch.no_grad():
        logprobs = trusted.sequence_logprobs(model, rows.query_ids, rows.query_mask, rows.response_ids,
                                             rows.response_mask)
    sums, lengths = (logprobs * rows.response_mask).sum(dim=1), rows.response_mask.sum(dim=1)
    half = len(rows) // 2  # the chosen responses, then the rejected ones
    return (sums[:half].mean().item(), sums[half:].mean().item(), (sums[:half] / lengths[:half]).mean().item(),
            (sums[half:] / lengths[half:]).mean().item())


def report(run_dir: Path) -> str:
    adapter = run_dir / "final" / "adapter_model.safetensors"
    if not adapter.is_file():
        raise UserError(f"{run_dir}: no {adapter.relative_to(run_dir)}; expected a finished PPO run")
    raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    if raw.get("algorithm") == "grpo" or not (raw.get("trusted") or {}).get("source"):
        raise UserError(f"{run_dir}: expected a PPO run with a trusted section")
    with tempfile.TemporaryDirectory() as scratch:
        raw["run"]["output_dir"] = scratch  # the trainer claims a directory; the run's own stays untouched
        trainer = build_trainer(recipe_from_dict(raw))
        policy = trainer.accelerator.unwrap_model(trainer.policy).eval()
        before = mean_logprobs(trainer.trusted, policy)
        set_peft_model_state_dict(policy.lm, load_file(adapter))
        after = mean_logprobs(trainer.trusted, policy)
    line = "{:>7.2f} {:>8.2f} ({:.2f} {:.2f}) margin {:.2f}"
    return (f"{run_dir}\n  base:  chosen rejected " + line.format(*before, before[0] - before[1]) +
            "\n  final: chosen rejected " + line.format(*after, after[0] - after[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    for run_dir in parser.parse_args().runs:
        print(report(run_dir), flush=True)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # bad input: one line, exit 2
        sys.exit(f"trusted_logprobs.py: error: {err}")
