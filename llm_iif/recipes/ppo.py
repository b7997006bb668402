"""The PPO recipe (`llm-iif train` on an LM recipe): its ppo, iif and run sections, and its value checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from llm_iif.recipes.common import DataConfig, EvalConfig, IIFFilterConfig, LoraConfig, ModelConfig, RewardConfig, SEED_EXPECTED, TargetName, TargetSourceName, TrackerName, TrustedConfig, check_trusted, is_seed, parse_filter, requirement


@dataclass
class PPOConfig:
    learning_rate: float = 1e-4
    epochs: int = 4
    mini_batch_size: int = 16
    forward_batch_size: int = 64
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    target_kl: float = 6.0
    kl_horizon: int = 10000
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    min_new_tokens: int = 1
    generation_batch_size: int = 64
    """Prompts per `generate` call on each process, separate from the training mini_batch_size."""


@dataclass
class IIFConfig(IIFFilterConfig):
    """Iterative influence-based filtering: score every rollout sample against a target, drop the worst."""
    target: TargetName = "seq"
    """What the kept samples should improve, measured on validation responses generated each round:
    ``seq`` Σ log-prob × last-token advantage (the paper's RLHF target), ``return`` token-level
    advantage-weighted log-prob, ``reward`` Σ log-prob × whitened reward, ``gold`` log-likelihood of
    reference responses (needs ``val_prompts`` with prompt and response columns), ``preference`` the margin
    Σ log π(chosen) − log π(rejected) of the ``trusted`` section's triples (all of them, every round)."""
    target_source: TargetSourceName = "fresh"
    """Where the target's responses come from: ``fresh`` responses to the validation prompts every round (the
    paper); ``cached`` ones, generated every ``refresh_every`` rounds and reweighted in between to the current
    policy by self-normalised, truncated per-sequence importance ratios; ``batch`` the round's own training
    samples, cross-fitted over ``folds`` folds so that no sample is scored against its own gradient (no extra
    generation)."""
    refresh_every: int = 4
    """cached: generate fresh validation responses every N rounds."""
    val_prompts: Optional[str] = None
    """Validation prompt source (same formats as data.source); None uses the data's validation split."""
    train_grad: Literal["policy", "full"] = "policy"
    """Per-sample training gradient: the policy term of the PPO loss, or the full loss (policy + vf_coef ×
    value, as the paper's RLHF code). The target has no value term, so the value gradient only adds noise
    to the scores; on the tiny recipe ``policy`` reached standard PPO's peak sooner (docs/results.md, section 3)."""
    scoring: Literal["separate", "in-run"] = "separate"
    """``separate``: a scoring pass, a forward and backward over every sample at θ(k), then the PPO epochs on the
    kept samples; ``in-run``: the same pass keeps every sample's gradient, and the first epoch's steps are made
    from the kept ones, so the first epoch needs no pass of its own (`llm_iif.training.in_run`: the scores are
    exact, the first epoch's steps after its first take their gradients at θ(k))."""
    lds_rounds: list[int] = field(default_factory=list)
    """Rounds (0-based) at which to check the scores (one process only): the round's update is redone on
    ``lds_subsets`` random half-subsets of the batch and the linear datamodeling score (LDS) of plain,
    preconditioned and random scores is logged (``lds_*`` metrics, lds/round_XXXX.json). Training is unchanged."""
    lds_subsets: int = 16
    """Random half-subsets per checked round; at least 2."""


@dataclass
class RunConfig:
    rounds: int
    seed: int = 0
    batch_size: int = 64
    """Rollouts per round across all processes; must divide evenly by the number of processes."""
    output_dir: str = "runs/default"
    save_every: int = 0
    """Save a checkpoint every N rounds; 0 saves only the final one."""
    report_to: list[TrackerName] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers that receive every round's metrics; [] logs to the JSONL files only."""
    keep_last_n: int = 0
    """Keep only the newest N checkpoint-N/ directories (final/ always stays); 0 keeps them all."""
    log_samples: int = 5
    """Responses per round written to samples.jsonl."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    """Autocast the policy's forward passes; None takes the `accelerate launch` setting. Influence scores
    are always accumulated in fp32."""
    nonfinite_patience: int = 0
    """Rounds in a row that may contain NaN/inf rewards, log-probs, values, advantages, influence scores or
    gradients; the affected samples or optimiser steps are skipped and counted (``nonfinite_*`` metrics).
    One more such round stops the run; 0 stops at the first NaN or inf."""


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    reward: RewardConfig
    run: RunConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    iif: IIFConfig = field(default_factory=IIFConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trusted: TrustedConfig = field(default_factory=TrustedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, source: str) -> None:
        _check_values(self, source)


def _check_values(recipe: Recipe, source: str) -> None:
    """Range checks that types alone cannot express."""

    require = requirement(recipe, source)

    require(recipe.lora.r > 0, "lora.r", "a positive integer")
    require(recipe.lora.target_modules != [], "lora.target_modules",
            "module names, or null for peft's default for the architecture")
    require(0.0 <= recipe.lora.dropout < 1.0, "lora.dropout", "a value in [0, 1)")
    require(0.0 <= recipe.data.validation_fraction < 1.0, "data.validation_fraction", "a value in [0, 1)")
    require(recipe.data.min_prompt_tokens >= 1, "data.min_prompt_tokens", "at least 1")
    require(recipe.data.max_prompt_tokens >= recipe.data.min_prompt_tokens, "data.max_prompt_tokens",
            "at least data.min_prompt_tokens")
    require(recipe.data.truncate_prompt_tokens >= 0, "data.truncate_prompt_tokens", "0 (off) or a positive integer")
    require(recipe.reward.batch_size > 0, "reward.batch_size", "a positive integer")
    require(recipe.reward.max_length > 0, "reward.max_length", "a positive integer")
    ppo = recipe.ppo
    require(ppo.learning_rate > 0, "ppo.learning_rate", "a positive number")
    for name in ("epochs", "mini_batch_size", "forward_batch_size", "kl_horizon", "max_new_tokens"):
        require(getattr(ppo, name) > 0, f"ppo.{name}", "a positive integer")
    require(0.0 <= ppo.gamma <= 1.0, "ppo.gamma", "a value in [0, 1]")
    require(0.0 <= ppo.lam <= 1.0, "ppo.lam", "a value in [0, 1]")
    for name in ("clip_range", "clip_range_value", "max_grad_norm", "target_kl", "temperature"):
        require(getattr(ppo, name) > 0, f"ppo.{name}", "a positive number")
    require(ppo.vf_coef >= 0, "ppo.vf_coef", "a non-negative number")
    require(ppo.init_kl_coef >= 0, "ppo.init_kl_coef", "a non-negative number")
    require(ppo.top_k >= 0, "ppo.top_k", "0 (off) or a positive integer")
    require(0.0 < ppo.top_p <= 1.0, "ppo.top_p", "a value in (0, 1]")
    require(0 <= ppo.min_new_tokens <= ppo.max_new_tokens, "ppo.min_new_tokens",
            "a value in [0, ppo.max_new_tokens]")
    iif = recipe.iif
    require(0.0 <= iif.p <= 1.0, "iif.p", "a value in [0, 1]")
    require(iif.val_size >= 2, "iif.val_size", "at least 2 (the target is split in halves)")
    require(iif.score_batch_size is None or iif.score_batch_size > 0, "iif.score_batch_size",
            "a positive integer or null")
    if iif.score_batch_size is None:  # the rows an update's forward and backward already hold
        iif.score_batch_size = ppo.mini_batch_size
    require(iif.min_split_cos is None or -1.0 <= iif.min_split_cos <= 1.0, "iif.min_split_cos",
            "a value in [-1, 1] or null")
    require(iif.refresh_every >= 1, "iif.refresh_every", "a positive integer")
    require(2 <= iif.folds <= recipe.run.batch_size, "iif.folds", f"an integer in [2, run.batch_size={recipe.run.batch_size}]")
    require(iif.lds_subsets >= 2, "iif.lds_subsets", "at least 2 (a rank correlation needs two subsets)")
    require(all(0 <= k < recipe.run.rounds for k in iif.lds_rounds), "iif.lds_rounds",
            f"rounds in [0, run.rounds={recipe.run.rounds})")
    require(iif.target_source != "batch" or iif.target != "gold", "iif.target_source",
            "fresh or cached with iif.target gold (the training batch has no reference responses)")
    require(iif.target_source != "batch" or iif.target != "preference", "iif.target_source",
            "fresh or cached with iif.target preference (the training batch holds no preferences)")
    check_trusted(recipe, source)
    run = recipe.run
    require(run.rounds > 0, "run.rounds", "a positive integer")
    require(is_seed(run.seed), "run.seed", SEED_EXPECTED)
    require(run.batch_size > 0, "run.batch_size", "a positive integer")
    require(run.save_every >= 0, "run.save_every", "0 (final only) or a positive integer")
    require(run.log_samples >= 0, "run.log_samples", "a non-negative integer")
    require(run.keep_last_n >= 0, "run.keep_last_n", "0 (keep all) or a positive integer")
    require(run.nonfinite_patience >= 0, "run.nonfinite_patience", "a non-negative integer")
    require(ppo.generation_batch_size > 0, "ppo.generation_batch_size", "a positive integer")
    for text in recipe.data.filters:
        parse_filter(text, f"{source}: data.filters")
    evaluation = recipe.eval
    require(evaluation.every >= 0, "eval.every", "0 (off) or a positive integer")
    require(evaluation.size > 0, "eval.size", "a positive integer")
    if evaluation.every:
        require(evaluation.data is not None, "eval.data", "a prompt set (same keys as data) when eval.every > 0")
        require(bool(evaluation.rewards), "eval.rewards", "at least one NAME: reward model when eval.every > 0")
        for text in evaluation.data.filters:
            parse_filter(text, f"{source}: eval.data.filters")
