"""Where an LM round's time goes: standard PPO against IIF with each target source, measured side by side.

    .venv/bin/python benchmarks/round_cost.py [--settings tiny,gpt2-124m,overopt] [--rounds 4]

Per setting, seven trainers (standard, and IIF with the fresh, cached and batch target sources, each with
``iif.scoring`` separate and in-run) run the same recipe and seed, alternating one round each, so that a slowdown of the machine part-way hits all alike. The
first round of each is a warm-up and is not counted. Prints the median seconds of every phase, the median
round-time ratio IIF / standard, and beside it the ratio `predicted_ratio` gives from the standard round's
phase shares: the cost model that tells what the ratio becomes elsewhere (a GPU, where generation dominates).

Settings:
  tiny       recipes/tiny-sentiment.yaml as it ships (batch 64, 256 validation responses, 16 new tokens);
  gpt2-124m  a GPT-2 built from its config (12 layers, width 768, 124M parameters, random weights) with the
             tiny tokenizer: batch 32, 64 new tokens, 64 validation responses, LoRA r 16 on c_attn;
  overopt    recipes/tiny-overopt.yaml as it ships: standard PPO against IIF's preference target on all 256
             trusted triples (scored separately and in-run), on the first 64, and on a fresh draw of 64 of the
             256 each round (trusted.target_draw). Every method logs the trusted margin, outside time_round_s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from llm_iif.recipes import TARGET_SOURCES, recipe_from_dict
from llm_iif.lm.builtin import ensure_tiny_model
from llm_iif.training import build_trainer

REPO = Path(__file__).resolve().parents[1]
PHASES = {  # timings key -> column
    "time_generate_s": "generate", "time_reward_s": "reward", "time_forward_s": "rollout forward",
    "time_val_generate_s": "val generate", "time_val_reward_s": "val reward", "time_val_forward_s": "val forward",
    "time_target_s": "target", "time_scoring_s": "scoring", "time_update_s": "update", "time_round_s": "round",
}
METHODS = {"standard": {"enabled": False},
           **{f"iif-{s}{suffix}": {"enabled": True, "target_source": s, "scoring": scoring}
              for s in TARGET_SOURCES for suffix, scoring in (("", "separate"), ("-in-run", "in-run"))}}
# The overopt setting's methods: recipe sections updated per method
TRUSTED_METHODS = {"standard": {"iif": {"enabled": False}}, "iif": {}, "iif-in-run": {"iif": {"scoring": "in-run"}},
                   "iif-64": {"trusted": {"size": 64}}, "iif-draw-64": {"trusted": {"target_draw": 64}}}


def predicted_ratio(source: str, generation: float, forward: float, epochs: int, val_per_sample: float,
                    kept: float, refresh_every: int = 4, scoring_cost: float = 1.0, in_run: bool = False) -> float:
    """IIF round time / standard round time, from the standard round's shares.

    generation, forward: the shares of a standard round spent generating (with reward) and in the rollout's
    forward; the rest, u = 1 - generation - forward, is the update's ``epochs`` passes. The scoring pass over
    a batch costs ``scoring_cost`` × u / epochs: for fresh and cached, one forward and backward with the
    hooks, and the target gradient over V rows costs V/B of it; for batch, the one fused pass that gives the
    target and the scores (one forward, two backward passes). val_per_sample: V / B, validation responses per
    training sample; kept: the fraction IIF keeps, which the update time scales with.

        fresh:  1 - (1-κ)u + (V/B)(generation + forward) + (V/B + 1)·s
        cached: 1 - (1-κ)u + (V/B)(generation / refresh_every + forward) + (V/B + 1)·s
        batch:  1 - (1-κ)u + s
    with s = scoring_cost · u / epochs. With ``in_run`` the pass also makes the first epoch
    (`llm_iif.training.in_run`), whose own pass over the kept samples, κu / epochs, is no longer run.
    """
    update = 1.0 - generation - forward
    scoring = scoring_cost * update / epochs
    base = 1.0 - (1.0 - kept) * update - (kept * update / epochs if in_run else 0.0)
    if source == "batch":
        return base + scoring
    sampled = generation / refresh_every if source == "cached" else generation
    return base + val_per_sample * (sampled + forward) + (val_per_sample + 1.0) * scoring


def methods_of(setting: str) -> list[str]:
    return list(TRUSTED_METHODS if setting == "overopt" else METHODS)


def recipe_for(setting: str, method: str, output_dir: Path, model_dir: Path | None) -> dict:
    if setting == "overopt":
        raw = yaml.safe_load((REPO / "recipes" / "tiny-overopt.yaml").read_text())
        for section, values in TRUSTED_METHODS[method].items():
            raw[section].update(values)
    else:
        raw = yaml.safe_load((REPO / "recipes" / "tiny-sentiment.yaml").read_text())
        raw["iif"].update(METHODS[method])
    raw["run"].update(output_dir=str(output_dir / method), report_to=[], log_samples=0)
    if setting == "gpt2-124m":
        raw["model"]["name_or_path"] = str(model_dir)
        raw["lora"] = {"r": 16, "alpha": 32, "target_modules": ["c_attn"]}
        raw["ppo"].update(max_new_tokens=64, min_new_tokens=64, mini_batch_size=8, generation_batch_size=64,
                          forward_batch_size=32)
        raw["iif"].update(val_size=64, score_batch_size=16)
        raw["run"]["batch_size"] = 32
    return raw


def build_gpt2_124m(directory: Path) -> Path:
    """A 124M-parameter GPT-2 from its config, random weights, with the tiny tokenizer (saved with it)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"gpt2-124m: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    return directory


def measure(setting: str, rounds: int) -> dict[str, list[dict]]:
    """Per method, the metrics of each timed round (round 0 is the warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_gpt2_124m(tmp / "gpt2-124m") if setting == "gpt2-124m" else None
        trainers = {}
        for method in methods_of(setting):
            raw = recipe_for(setting, method, tmp / "runs", model_dir)
            raw["run"]["rounds"] = rounds + 1
            trainers[method] = build_trainer(recipe_from_dict(raw))
            trainers[method].outputs.start()
        timed = {method: [] for method in trainers}
        for k in range(rounds + 1):
            for method, trainer in trainers.items():  # alternating: one round of each in turn
                metrics = trainer.run_round(k)
                if k > 0:
                    timed[method].append(metrics)
        return timed


def report(setting: str, timed: dict[str, list[dict]], epochs: int, val_per_sample: float) -> None:
    medians = {method: {key: statistics.median(m.get(key, 0.0) for m in rounds) for key in PHASES}
               for method, rounds in timed.items()}
    print(f"\n### {setting}: median seconds per phase over {len(timed['standard'])} timed rounds\n")
    print("| phase | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for key, name in PHASES.items():
        print(f"| {name} | " + " | ".join(f"{medians[method][key]:.3f}" for method in METHODS) + " |")
    standard = medians["standard"]
    generation = (standard["time_generate_s"] + standard["time_reward_s"]) / standard["time_round_s"]
    forward = standard["time_forward_s"] / standard["time_round_s"]
    update_epoch = standard["time_update_s"] / epochs
    print(f"\nstandard round shares: generation + reward {generation:.2f}, rollout forward {forward:.2f}, "
          f"update {1 - generation - forward:.2f}")
    print("\n| method | kept | round / standard (measured) | (cost model) | scoring pass / update epoch |")
    print("|---|---|---|---|---|")
    for method in list(METHODS)[1:]:
        kept = statistics.median(m["kept_fraction"] for m in timed[method])
        measured = statistics.median(m["time_round_s"] / s["time_round_s"]
                                     for m, s in zip(timed[method], timed["standard"]))
        scoring_cost = medians[method]["time_scoring_s"] / update_epoch
        model = cost_model(method, generation, forward, epochs, val_per_sample, kept, scoring_cost)
        print(f"| {method} | {kept:.2f} | {measured:.2f} | {model:.2f} | {scoring_cost:.2f} |")
    print("\ncost model where generation takes a larger share of a standard round (forward 0.05, each "
          "method's measured kept fraction and scoring cost in this setting):\n")
    shares = (0.5, 0.7, 0.9)
    print("| method | " + " | ".join(f"generation {g:.0%}" for g in shares) + " |")
    print("|---|" + "---|" * len(shares))
    for method in list(METHODS)[1:]:
        kept = statistics.median(m["kept_fraction"] for m in timed[method])
        scoring_cost = medians[method]["time_scoring_s"] / update_epoch
        print(f"| {method} | " + " | ".join(
            f"{cost_model(method, g, 0.05, epochs, val_per_sample, kept, scoring_cost):.2f}" for g in shares) + " |")


def cost_model(method: str, generation: float, forward: float, epochs: int, val_per_sample: float, kept: float,
               scoring_cost: float) -> float:
    """`predicted_ratio` for one of `METHODS`."""
    settings = METHODS[method]
    return predicted_ratio(settings["target_source"], generation, forward, epochs, val_per_sample, kept,
                           scoring_cost=scoring_cost, in_run=settings["scoring"] == "in-run")


def report_trusted(timed: dict[str, list[dict]]) -> None:
    """The overopt setting: each method's median round time, its target gradient's, and the ratio to standard."""
    phases = {"time_generate_s": "generate", "time_forward_s": "rollout forward", "time_target_s": "target",
              "time_scoring_s": "scoring", "time_update_s": "update", "time_round_s": "round",
              "time_trusted_s": "trusted margin (not in the round)"}
    print(f"\n### overopt: median seconds over {len(timed['standard'])} timed rounds, alternating methods\n")
    print("| method | " + " | ".join(phases.values()) + " | kept | round / standard |")
    print("|---|" + "---|" * (len(phases) + 2))
    for method, rounds in timed.items():
        ratio = statistics.median(m["time_round_s"] / s["time_round_s"] for m, s in zip(rounds, timed["standard"]))
        print(f"| {method} | " + " | ".join(f"{statistics.median(m.get(key, 0.0) for m in rounds):.3f}"
                                          for key in phases)
              + f" | {statistics.median(m.get('kept_fraction', 1.0) for m in rounds):.2f} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="tiny,gpt2-124m,overopt")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per method, after one warm-up round")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for setting in args.settings.split(","):
        if setting == "overopt":
            report_trusted(measure(setting, args.rounds))
            continue
        raw = recipe_for(setting, "iif-fresh", Path("unused"), Path("unused"))
        report(setting, measure(setting, args.rounds), raw["ppo"]["epochs"],
               raw["iif"]["val_size"] / raw["run"]["batch_size"])


if __name__ == "__main__":
    main()
