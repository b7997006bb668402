"""The GRPO recipe (``algorithm: grpo``): trl's GRPOConfig keys, the group filters and GRPO's IIF keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from llm_iif.core.errors import UserError
from llm_iif.recipes.common import IIFFilterConfig, LoraConfig, RewardConfig, SEED_EXPECTED, TrackerName, TrustedConfig, _value, check_trusted, is_seed, requirement


# ----------------------------------------------------------------------------------------------------- GRPO
# recipes/*-grpo.yaml (``algorithm: grpo``): trl's GRPOTrainer, through llm_iif.grpo.IIFGRPOTrainer.

GroupFilterName = Literal["dapo", "pods"]


@dataclass
class GRPOModelConfig:
    name_or_path: str
    """A hub id, a local directory, ``builtin:tiny-adder`` for the offline character-level adder or
    ``builtin:tiny-reasoner`` for the offline model of chained sums. Loading options (dtype, attention) go in
    ``grpo.model_init_kwargs``, trl's own field."""
    chat_template: bool = False
    """Wrap each plain-text prompt as a user turn, so that trl prompts the model through the tokenizer's chat
    template (instruct models). Conversational prompts (lists of role/content messages) always go through it.
    Reward functions then receive the prompts and completions as message lists."""


@dataclass
class GRPODataConfig:
    source: str
    """``builtin:addition`` (generated 2-3 digit sums), ``builtin:chain-sums`` (sums of four 2-digit numbers,
    worked out as a chain of running sums), a local .json/.jsonl/.parquet file, such files in a hub
    repo as an ``hf://datasets/...`` path (glob patterns allowed), or a `datasets` hub id (with ``split`` and
    ``subset``), e.g. ``openai/gsm8k``."""
    prompt_column: str = "prompt"
    """The source's prompt column (``a.b`` reads field b of struct column a): plain text, or trl's
    conversational format (a list of role/content messages). Every row needs one; a row without is an error."""
    columns: dict[str, str] = field(default_factory=dict)
    """Name the reward functions read -> the source's column, e.g. ``{answer: solution}``. Empty: every column
    of the source is kept under its own name."""
    split: str = "train"
    """Hub ids: the split read. Held-out rows are drawn from it, not from the hub's other splits."""
    subset: Optional[str] = None
    """Hub ids: the configuration (subset) name, e.g. ``main`` for openai/gsm8k."""
    shuffle_seed: int = 0
    """Seed of the shuffle that draws the held-out rows of a file or hub split: the first validation_size
    shuffled rows are the validation set, the next eval_size the evaluation set, the rest training. It is not
    the run seed, so every seed and method of a comparison is evaluated on the same rows."""
    train_size: int = 4000
    """builtin:addition and builtin:chain-sums: training problems generated (files and hub splits train on all
    rows not held out)."""
    validation_size: int = 256
    """Held-out rows whose prompts build the fresh target (``iif.target_source: fresh``)."""
    eval_size: int = 256
    """Held-out rows evaluated every ``run.eval_every`` steps: one completion each, scored by every reward
    function."""
    eval_source: Optional[str] = None
    """The evaluation rows' own source (a file or hub id, read with ``eval_split``, ``subset`` for a hub id and
    the same columns), e.g. ``openai/gsm8k`` for its test split: its first ``eval_size`` rows. null draws them
    from ``source``, as above."""
    eval_split: str = "test"
    """Hub ids: the split of ``eval_source`` read."""
    system_prompt: Optional[str] = None
    """A system turn put before every prompt (plain-text prompts become system and user messages), through the
    model's chat template: the tokenizer must have one."""
    instruction: Optional[str] = None
    """Text appended, after a space, to every prompt (to its last user turn for message lists), as verl's GSM8K
    preprocessing appends 'Let's think step by step and output the final answer after "####".'"""


@dataclass
class GroupFilterConfig:
    """A group filter: ``dapo`` drops groups whose rewards are all equal (with ``refill``, it generates up to
    ``max_refill_batches`` more batches to fill their place), and IIF, if enabled, then filters among the
    completions it kept; ``pods`` (a baseline, without IIF) keeps the ``keep_per_group`` completions of each
    group whose rewards vary most."""
    kind: Optional[GroupFilterName] = None
    refill: bool = False
    max_refill_batches: int = 4
    keep_per_group: int = 4


@dataclass
class GRPOIIFConfig(IIFFilterConfig):
    """IIF for GRPO: every completion of a generation batch scored at θ(k) against the f_seq target (Σ log-prob ×
    group advantage), then the filter. GRPO reads only these keys; the PPO-only ones are refused."""
    target_source: Literal["batch", "fresh"] = "batch"
    """``batch``: the generation batch is its own target, cross-fitted over ``folds`` folds of whole groups (at
    most the generation batch's number of prompts; no extra generation);
    ``fresh``: ``val_size`` new completions of the validation prompts every generation batch (the paper's source;
    about 4.5× a step on the tiny recipe, docs/results.md section 12)."""
    target: Literal["seq", "preference"] = "seq"
    """``seq``: f_seq, Σ log-prob × group advantage of the target's completions; ``preference``: the margin
    Σ log π(chosen) − log π(rejected) of the ``trusted`` section's triples, all of them every generation batch
    (with ``target_source: fresh``; no generation)."""
    scoring: Literal["auto", "separate", "in-run"] = "auto"
    """``in-run``: the scores come from the update's own backward, and the dropped completions' share leaves the
    accumulated gradient before the optimiser step (`llm_iif.grpo.in_run`; needs num_iterations 1 and
    steps_per_generation equal to gradient_accumulation_steps, among others: docs/grpo.md); ``separate``: a
    scoring pass, a forward and backward over every candidate completion at θ(k), before the update trains on
    the kept ones; ``auto``: in-run where the settings allow it, else separate (logged)."""


@dataclass
class GRPORunConfig:
    steps: int
    """Optimiser steps (trl's max_steps)."""
    batch_size: Optional[int] = None
    """Completions per optimiser step over all processes, as PPO's ``run.batch_size``: it sets trl's
    gradient_accumulation_steps to batch_size / (grpo.per_device_train_batch_size × processes), so a step holds
    the same completions on any number of processes (a launch whose count does not divide it is refused). null
    leaves trl's per-process sizes as the grpo section gives them, and a step grows with the process count."""
    seed: int = 0
    output_dir: str = "runs/grpo"
    report_to: list[TrackerName] = field(default_factory=lambda: ["tensorboard"])
    nonfinite_patience: int = 0
    """Generation batches in a row that may contain NaN/inf rewards (those completions are dropped)."""
    save_every: int = 0
    """Save a checkpoint (trl's checkpoint-N/ plus the IIF and filter state) every N steps, for --resume; a
    multiple of steps_per_generation × num_iterations, so that no generation batch is split. 0 saves only final/."""
    keep_last_n: int = 0
    """Keep only the newest N checkpoint-N/ directories (trl's save_total_limit; final/ always stays); 0 keeps all."""
    eval_every: int = 10
    """Evaluate on the held-out rows after every N steps and after the last step; 0 turns evaluation off."""
    eval_batch_size: int = 64
    """Held-out prompts per generate call on each process (each process evaluates its share of the rows)."""
    eval_decoding: Literal["sampled", "greedy"] = "sampled"
    """``sampled`` at the trainer's temperature, with the same seed at every evaluation, so steps and methods
    compare; ``greedy`` takes the most likely token."""
    log_samples: int = 5
    """Completions of each generation batch written to samples.jsonl with their rewards and influence scores."""


# trl GRPOConfig fields that a GRPO recipe's run section sets; a ``grpo:`` key may not override them.
RUN_OWNED_GRPO_FIELDS = {"output_dir": "run.output_dir", "max_steps": "run.steps", "seed": "run.seed",
                         "data_seed": "run.seed", "report_to": "run.report_to", "save_strategy": "run.save_every",
                         "save_steps": "run.save_every", "save_total_limit": "run.keep_last_n",
                         "logging_steps": "every step is logged", "resume_from_checkpoint": "--resume"}


@dataclass
class GRPORewardModel(RewardConfig):
    """A reward model as a GRPO reward, as trl's ``reward_funcs`` takes one: ``name`` is any reward model of the
    ``reward`` section (e.g. hf-classifier, with its settings), scored on each prompt and completion."""
    weight: float = 1.0


@dataclass
class GRPORecipe:
    algorithm: Literal["grpo"]
    """Marks a GRPO recipe (a PPO recipe has no algorithm key)."""
    model: GRPOModelConfig
    data: GRPODataConfig
    rewards: dict[str, Union[float, GRPORewardModel]]
    """``module:function`` -> weight, for trl reward functions (prompts, completions, **columns) -> floats; or
    NAME -> a reward model: the keys of a PPO recipe's reward section (e.g. name: hf-classifier) plus its weight
    (default 1), logged as ``rewards/NAME``. The first one's held-out mean is the run's curve (``reward_mean``)."""
    run: GRPORunConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    grpo: dict = field(default_factory=dict)
    """Any field of trl's GRPOConfig (num_generations, per_device_train_batch_size, learning_rate, beta,
    loss_type, scale_rewards, steps_per_generation, num_iterations, temperature, ...), passed as given."""
    iif: GRPOIIFConfig = field(default_factory=GRPOIIFConfig)
    group_filter: GroupFilterConfig = field(default_factory=GroupFilterConfig)
    trusted: TrustedConfig = field(default_factory=TrustedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, source: str) -> None:
        require = requirement(self, source)
        require(self.run.steps > 0, "run.steps", "a positive integer")
        for key in ("run.seed", "data.shuffle_seed"):
            require(is_seed(_value(self, key)), key, SEED_EXPECTED)
        require(self.run.nonfinite_patience >= 0, "run.nonfinite_patience", "a non-negative integer")
        require(self.lora.r > 0, "lora.r", "a positive integer")
        require(self.lora.target_modules != [], "lora.target_modules",
                "module names, or null for peft's default for the architecture")
        for key in ("data.train_size", "data.validation_size", "data.eval_size"):
            require(_value(self, key) > 0, key, "a positive integer")
        require(self.iif.score_batch_size is None or self.iif.score_batch_size > 0, "iif.score_batch_size",
                "a positive integer or null")
        require(0.0 <= self.iif.p <= 1.0, "iif.p", "a value in [0, 1]")
        require(self.iif.folds >= 2, "iif.folds", "at least 2")
        require(self.iif.val_size > 0, "iif.val_size", "a positive integer")
        require(self.iif.target != "preference" or self.iif.target_source == "fresh", "iif.target_source",
                "fresh with iif.target preference (the training batch holds no preferences)")
        check_trusted(self, source)
        for key in ("run.save_every", "run.keep_last_n", "run.eval_every", "run.log_samples"):
            require(_value(self, key) >= 0, key, "0 or a positive integer")
        require(self.run.eval_batch_size > 0, "run.eval_batch_size", "a positive integer")
        require(self.run.batch_size is None or self.run.batch_size > 0, "run.batch_size", "a positive integer or null")
        if self.run.batch_size is not None and "gradient_accumulation_steps" in self.grpo:
            raise UserError(f"{source}: grpo.gradient_accumulation_steps: set by run.batch_size (completions per "
                            "step over all processes); remove one of them")
        owned = sorted(set(self.grpo) & set(RUN_OWNED_GRPO_FIELDS))
        if owned:
            raise UserError(f"{source}: grpo.{owned[0]}: set by the run section ({RUN_OWNED_GRPO_FIELDS[owned[0]]}); "
                            "remove it from grpo")
        if not self.rewards:
            raise UserError(f"{source}: rewards: expected at least one module:function: weight")
        for name, entry in self.rewards.items():
            if not isinstance(entry, GRPORewardModel) and name.count(":") != 1:
                raise UserError(f"{source}: rewards.{name}: expected an import path module:function with a weight, "
                                "or a reward model's section (name: hf-classifier, name_or_path: ...)")
            if isinstance(entry, GRPORewardModel) and entry.report:
                raise UserError(f"{source}: rewards.{name}.report: not read in a GRPO recipe; expected another "
                                "entry of rewards with weight 0 for a score logged but not trained on")
        if self.iif.enabled and self.group_filter.kind not in (None, "dapo"):
            raise UserError(f"{source}: group_filter.kind: {self.group_filter.kind} with iif.enabled: true; IIF runs "
                            "after a dapo filter only (set group_filter.kind: dapo or null, or iif.enabled: false)")
