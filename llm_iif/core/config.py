"""Recipes: YAML files with the sections model, lora, data, reward, ppo, iif, eval and run.

`load_recipe(path, overrides)` reads a YAML file, applies `--set section.key=value` overrides (any depth) and
validates everything against the dataclasses below. Any problem raises `UserError` with one line
naming the file and the key, e.g. ``recipes/x.yaml: ppo.learning_rate: expected a float, got 'fast'``.
The dataclass defaults are the documented defaults; a recipe only lists what it changes.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from llm_iif.core.errors import UserError, first_line

# Each enumeration is defined once, as the Literal type recipes are checked against; the tuple of its values
# is what code that is not handed a recipe checks against.
TrackerName = Literal["tensorboard", "wandb", "trackio"]
FilterMode = Literal["neg-bottom", "bottom", "neg-random", "matched-random", "random", "none"]
TargetName = Literal["seq", "return", "reward", "gold", "preference"]
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
TargetSourceName = Literal["fresh", "cached", "batch"]
ClassicTargetName = Literal["return"]
ClassicGuard = Literal["none", "positive-advantage", "rewarded"]
FILTER_MODES: tuple[str, ...] = typing.get_args(FilterMode)
TARGETS: tuple[str, ...] = typing.get_args(TargetName)
TARGET_SOURCES: tuple[str, ...] = typing.get_args(TargetSourceName)
CLASSIC_TARGETS: tuple[str, ...] = typing.get_args(ClassicTargetName)
CLASSIC_GUARDS: tuple[str, ...] = typing.get_args(ClassicGuard)

SEED_EXPECTED = "a non-negative integer below 2**31"


def is_seed(value: int) -> bool:
    """Whether ``value`` can seed a run. numpy takes seeds in [0, 2**32), and a run adds its process index to its
    seed (accelerate's ``set_seed(device_specific=True)``); [0, 2**31) leaves room for that."""
    return 0 <= value < 2 ** 31


@dataclass
class ModelConfig:
    name_or_path: str
    """A hub id, a local directory, or ``builtin:tiny-sentiment`` for the offline tiny GPT-2."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    detach_value_head: bool = False
    """Stop value-loss gradients at the value head so they do not reach the shared LoRA backbone."""
    chat_template: bool = False
    """Wrap each prompt as a user turn in the tokenizer's chat template before generating (instruct models).
    Reward models and records still see the plain prompt."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass instead of keeping them (less memory)."""
    quantization: Optional[Literal["8bit", "4bit"]] = None
    """Load the frozen base model in 8 or 4 bits with bitsandbytes (GPU; `pip install llm_iif[quantization]`)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    """None means peft's default for the architecture (e.g. c_attn for GPT-2, q_proj/v_proj for Llama)."""


@dataclass
class DataConfig:
    source: str
    """``builtin:review-prompts``, a local .json/.jsonl/.parquet/.txt file, or a `datasets` hub id."""
    prompt_column: str = "prompt"
    split: str = "train"
    validation_fraction: float = 0.1
    min_prompt_tokens: int = 1
    max_prompt_tokens: int = 64
    """Prompts outside [min_prompt_tokens, max_prompt_tokens] tokens are dropped, not truncated."""
    truncate_prompt_tokens: int = 0
    """Cut every prompt to its first N tokens before the length limits apply (0: off), e.g. to prompt with
    the opening words of long reviews."""
    filters: list[str] = field(default_factory=list)
    """Keep only rows meeting every condition ``COLUMN OP NUMBER`` (OP one of > >= < <= == !=), e.g.
    ``prompt.toxicity > 0.3``. A dotted column reads a field of a struct column, in filters and in
    prompt_column alike."""


@dataclass
class RewardConfig:
    name: str
    """A reward model registered in `reward_models` (``vader``, ``hf-classifier``, ``callable``,
    ``conservative-ensemble``)."""
    name_or_path: Optional[str] = None
    """hf-classifier: a hub id or a local directory of a sequence-classification model."""
    members: list[str] = field(default_factory=list)
    """conservative-ensemble: two or more hf-classifier models (hub ids, directories or builtin: names), read
    with this section's other hf-classifier settings; the reward is their mean minus their standard deviation."""
    label: Optional[Union[int, str]] = None
    """hf-classifier: the scored label, an index or a name from id2label (optional for a one-label model)."""
    output: Literal["logit", "prob", "log_prob"] = "logit"
    input: Literal["response", "prompt+response", "pair"] = "prompt+response"
    """hf-classifier: what it reads: the response, the prompt and response as one text, or the two as a
    tokenizer sentence pair (cross-encoder reward models such as OpenAssistant's)."""
    append_eos: bool = False
    """hf-classifier: end every text with the tokenizer's EOS, as trl's RewardTrainer does in training
    (true for reward models from `llm-iif reward train`)."""
    chat_template: bool = False
    """hf-classifier: read prompt and response as a user and an assistant message through the reward model's chat
    template, as trl does for a reward model on conversational data (needs input: prompt+response)."""
    batch_size: int = 32
    max_length: int = 512
    device: Optional[str] = None
    """hf-classifier: where it runs (default: the policy's device)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    function: Optional[str] = None
    """callable: module:function taking (prompts, responses) and the prompts' other dataset columns as keywords,
    and returning one float per response."""
    report: dict = field(default_factory=dict)
    """Scores logged every round as reward/NAME but not trained on: NAME -> module:function, e.g. the hidden
    rule a learned reward model approximates."""


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
class IIFFilterConfig:
    """The keys of the ``iif`` section that every trainer reads (`llm_iif.attribution.stage.IIFStage`); each
    trainer's section adds ``target_source``, with the sources it offers, and its own keys."""
    enabled: bool = False
    mode: FilterMode = "neg-bottom"
    p: float = 1.0
    """Fraction dropped: of the negative-score samples (neg-*, and matched-random, which drops that many
    samples chosen at random from the whole batch) or of all samples (bottom, random)."""
    folds: int = 2
    """batch: each sample is scored against the target built from the other folds' samples."""
    val_size: int = 256
    """Validation responses generated per round (prompts are cycled when there are fewer)."""
    score_batch_size: Optional[int] = None
    """Rows per batched backward of the scoring pass, which sets its memory (docs/scaling.md); the scores do not
    depend on it. null: the training micro-batch (ppo.mini_batch_size, or GRPO's per_device_train_batch_size),
    whose forward and backward the run already fits."""
    min_split_cos: Optional[float] = None
    """Filter only in rounds whose target_split_cos reaches this; None filters every round."""
    precondition: Literal["none", "adam"] = "none"
    """``adam`` scores with ⟨P ∇L_val, ∇L_i⟩, P = diag(1 / (√v̂ + ε)) from the optimiser's bias-corrected second
    moments (the direction Adam steps in); the first round, before any step, is scored with plain gradients."""


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
class TrustedConfig:
    """A small set of (prompt, chosen, rejected) preferences you trust more than the reward model. Every round
    the run logs the policy's margin and accuracy on all of them (``trusted/margin``, ``trusted/accuracy``), so
    that any run can ship the round they rank best; ``iif.target: preference`` scores samples against their
    margin, and ``dpo_coef`` adds a DPO loss on them to the update. The margin reads the whole set every round,
    the target the whole set or a fresh draw (``target_draw``)."""
    source: Optional[str] = None
    """A local .json/.jsonl/.parquet file, an ``hf://datasets/...`` path, a `datasets` hub id (with ``split``
    and ``subset``) or a built-in set, e.g. builtin:trusted-preferences; null: no trusted set. Each of prompt, chosen and rejected is
    text or trl's conversational format (a list of role/content messages; chosen and rejected hold the
    assistant's turn). A row with a missing (null or NaN) value is dropped whole, with a warning."""
    split: str = "train"
    subset: Optional[str] = None
    columns: dict[str, str] = field(default_factory=dict)
    """prompt, chosen or rejected -> the source's column, e.g. ``{prompt: question}``; unnamed ones are read
    from the column of their own name."""
    size: Optional[int] = None
    """Use the first ``size`` rows; null uses them all."""
    length_normalised: bool = False
    """Compare mean rather than summed response log-probs, so that a longer response is not penalised for its
    length (the margin, its accuracy, the preference target and the DPO loss)."""
    dpo_coef: float = 0.0
    """Add dpo_coef × the DPO loss of a mini-batch of trusted triples to every optimiser step (RPO-style
    regularisation); 0 turns it off."""
    dpo_beta: float = 0.1
    """DPO's β: the scale of the implicit reward β·(log π − log π_ref)."""
    target_draw: Optional[int] = None
    """The preference target's triples each round, over all processes: a fresh draw of this many (each process
    draws its even share of its own triples, with the generator that checkpoints save), so the target's gradient
    costs that many triples' forward and backward; null: every triple, every round."""


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
class EvalConfig:
    """Held-out evaluation of the policy during training, logged as ``eval/<name>``."""
    every: int = 0
    """Evaluate after every N rounds' updates and after the last round; 0 turns evaluation off."""
    data: Optional[DataConfig] = None
    """The evaluation prompts (all of them, after filters; validation_fraction is ignored)."""
    size: int = 64
    """The first ``size`` prompts are evaluated, one sampled response each, split over the processes."""
    rewards: dict[str, RewardConfig] = field(default_factory=dict)
    """Name -> reward model scoring the responses; each is logged as the mean ``eval/<name>``."""


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


# ---------------------------------------------------------------------------------------------- reward models
# recipes/*-reward-model.yaml: `llm-iif reward train`, a sequence classifier trained on preference pairs.

@dataclass
class ClassifierBaseConfig:
    name_or_path: str
    """The model the reward model starts from (a one-label classification head is added): a hub id, a local
    directory, or builtin:tiny-sentiment."""


@dataclass
class PreferenceDataConfig:
    source: str
    """builtin:tiny-preferences, a local .json/.jsonl/.parquet file, or a `datasets` hub id."""
    split: str = "train"
    prompt_column: Optional[str] = "prompt"
    """null for pairs without a prompt; otherwise the prompt is put before both responses."""
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    validation_fraction: float = 0.1
    """Held-out pairs for the pairwise accuracy."""


@dataclass
class RewardTrainingConfig:
    epochs: float = 1.0
    learning_rate: float = 1.0e-3
    batch_size: int = 32
    max_length: int = 128
    """Pairs with a longer chosen or rejected text (in tokens) are left out, as trl's RewardTrainer does."""
    use_lora: bool = False
    """Train LoRA adapters (shaped by the lora section) plus the head, then merge them into the saved model."""


@dataclass
class RewardRunConfig:
    output_dir: str = "runs/reward-model"
    seed: int = 0


@dataclass
class RewardTrainRecipe:
    model: ClassifierBaseConfig
    data: PreferenceDataConfig
    train: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RewardRunConfig = field(default_factory=RewardRunConfig)

    def check(self, source: str) -> None:
        require = _requirement(self, source)
        require(0.0 < self.data.validation_fraction < 1.0, "data.validation_fraction", "a value in (0, 1)")
        require(is_seed(self.run.seed), "run.seed", SEED_EXPECTED)
        for key in ("train.epochs", "train.learning_rate", "train.batch_size", "train.max_length", "lora.r"):
            require(_value(self, key) > 0, key, "a positive number")


# ---------------------------------------------------------------------------------------------- classic RL
# recipes/classic/*.yaml: Stable-Baselines3 PPO (+ IIF) on a gymnasium environment. Defaults are the paper's.

@dataclass
class ClassicEnvConfig:
    id: str
    """A gymnasium environment id, e.g. FrozenLake-v1."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for gymnasium.make, e.g. {is_slippery: false}."""
    wrapper: Optional[str] = None
    """A gymnasium wrapper class applied to every environment, as module:Class, e.g.
    minigrid.wrappers:ImgObsWrapper."""
    n_envs: int = 1


@dataclass
class ClassicPPOConfig:
    policy: Literal["MlpPolicy", "CnnPolicy"] = "MlpPolicy"
    features_extractor: Literal["default", "small-cnn"] = "default"
    """default: SB3's for the policy; small-cnn: the paper's MiniGrid CNN (conv 16 3x3, conv 32 3x3, linear 64)."""
    n_steps: int = 2048
    """Transitions per environment per round; the buffer holds n_steps × n_envs."""
    batch_size: int = 64
    n_epochs: int = 10
    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = 5.0e-3
    ent_coef: float = 0.0
    clip_range: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass
class ClassicIIFConfig:
    mode: FilterMode = "neg-bottom"
    p: float = 0.5
    target: ClassicTargetName = "return"
    precondition: Literal["none", "adam"] = "none"
    """``adam`` (with ``ppo.optimizer: adam``) preconditions the target with the optimiser's second moments, as
    the LM recipes' ``iif.precondition``."""
    average_identical: bool = False
    """Score each transition by the mean score of its identical records (same observation, action, log-prob and
    raw advantage), as the paper's code does."""
    guard: ClassicGuard = "none"
    """Transitions never dropped, whatever their score: ``positive-advantage`` (raw GAE advantage > 0) or
    ``rewarded`` (reward > 0); ``none`` filters on the scores alone."""


@dataclass
class ClassicRunConfig:
    rounds: int
    seed: int = 0
    eval_episodes: int = 100
    """Episodes of the stochastic policy played after every round for the test return."""
    output_dir: str = "runs/classic"


@dataclass
class ClassicRecipe:
    env: ClassicEnvConfig
    run: ClassicRunConfig
    ppo: ClassicPPOConfig = field(default_factory=ClassicPPOConfig)
    iif: ClassicIIFConfig = field(default_factory=ClassicIIFConfig)

    def check(self, source: str) -> None:
        require = _requirement(self, source)
        for key in ("env.n_envs", "ppo.n_steps", "ppo.batch_size", "ppo.n_epochs", "run.rounds", "run.eval_episodes"):
            require(_value(self, key) > 0, key, "a positive integer")
        for key in ("ppo.learning_rate", "ppo.clip_range", "ppo.max_grad_norm"):
            require(_value(self, key) > 0, key, "a positive number")
        require(0.0 <= self.ppo.gamma <= 1.0, "ppo.gamma", "a value in [0, 1]")
        require(0.0 <= self.ppo.gae_lambda <= 1.0, "ppo.gae_lambda", "a value in [0, 1]")
        require(is_seed(self.run.seed), "run.seed", SEED_EXPECTED)
        require(0.0 <= self.iif.p <= 1.0, "iif.p", "a value in [0, 1]")
        if self.env.wrapper is not None:
            require(self.env.wrapper.count(":") == 1, "env.wrapper", "an import path module:Class")
        require(self.ppo.features_extractor == "default" or self.ppo.policy == "CnnPolicy", "ppo.features_extractor",
                "default with MlpPolicy (small-cnn needs ppo.policy: CnnPolicy)")
        require(self.iif.precondition == "none" or self.ppo.optimizer == "adam", "iif.precondition",
                "none with ppo.optimizer: sgd (adam preconditioning needs Adam's second moments)")


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
        require = _requirement(self, source)
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
        _check_trusted(self, source)
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


def recipe_kind(path: str | Path) -> type:
    """`GRPORecipe` for a recipe file that says ``algorithm: grpo``, `ClassicRecipe` for one with an ``env``
    section (recipes/classic/), else `Recipe` (PPO)."""
    try:
        raw = read_yaml_mapping(Path(path), "recipe")
    except UserError:
        return Recipe  # load_recipe reports the problem
    if raw.get("algorithm") == "grpo":
        return GRPORecipe
    return ClassicRecipe if "env" in raw else Recipe


def load_recipe(path: str | Path, overrides: list[str] = (), kind: type = Recipe):
    """Read, override and validate a recipe of ``kind`` (`Recipe`, `ClassicRecipe` or `RewardTrainRecipe`).

    Raises `UserError` naming the file and key on bad input."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe")
    for item in overrides:
        _apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path), kind=kind)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>", kind: type = Recipe):
    """Validate a nested dict into a recipe of ``kind``."""
    recipe = _build(kind, raw, source, prefix="")
    recipe.check(source)
    return recipe


def _apply_override(raw: dict, item: str) -> None:
    """``--set a.b=value`` or deeper (``eval.data.source=...``): the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise UserError(f"--set {item}: expected section.key=value")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"--set {item}: '{'.'.join(parts[:depth + 1])}' is not a mapping")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {item}: the value {value!r} is not valid YAML ({_yaml_problem(err, where=False)})"
                        ) from err


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file (a recipe, a suite) holds, {} for an empty one; a `UserError` naming the file when
    it is missing, unreadable, not UTF-8 (`read_text`), not valid YAML or not a mapping. ``what`` names the kind
    of file in the errors."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: {_yaml_problem(err)}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def read_text(path: Path, key: str | None = None) -> str:
    """The text of the UTF-8 file ``path``. Otherwise a `UserError` naming ``key`` (the recipe key that names
    the file, if any), the file, and the offset and line of its first byte that is not UTF-8."""
    where = f"{key}: {path}" if key else str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{where}: cannot read ({err.strerror or first_line(err)})") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{where}: not UTF-8 text: byte {err.start} (line {line}) is 0x{data[err.start]:02x}; "
                        "expected a UTF-8 file") from err


def _yaml_problem(err: yaml.YAMLError, where: bool = True) -> str:
    """``line L, column C: not valid YAML (problem)`` from a PyYAML error (lines and columns count from 1)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or first_line(err)
    if mark is None or not where:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({problem})"


def _build(cls: type, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise UserError(f"{source}: {prefix}{key}: unknown key (expected one of: {known})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{source}: {key}: required key is missing")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] if raw[name] is not None else {}, source, key + ".")
        else:
            values[name] = _coerce(raw[name], hint, source, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, source: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and sections:  # a mapping is a section: its own errors name the key at fault
            return _build(sections[0], value, source, key + ".")
        for option in options:
            try:
                return _coerce(value, option, source, key)
            except UserError:
                if len(options) == 1:
                    raise
        raise UserError(f"{source}: {key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {value!r}")
        if not args:
            return value
        return {name: _coerce(v, args[1], source, f"{key}.{name}") for name, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept any string that is a plain number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported recipe field type {hint!r}")
    if not ok:
        raise UserError(f"{source}: {key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _value(recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _requirement(recipe, source: str):
    """``require(ok, key, expected)``: raise a UserError naming the file, ``key`` and its value unless ``ok``."""
    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UserError(f"{source}: {key}: expected {expected}, got {_value(recipe, key)!r}")
    return require


def _check_values(recipe: Recipe, source: str) -> None:
    """Range checks that types alone cannot express."""

    require = _requirement(recipe, source)

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
    _check_trusted(recipe, source)
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


def _check_trusted(recipe: Recipe | GRPORecipe, source: str) -> None:
    """The ``trusted`` section's values, and that ``iif.target: preference`` has one to read."""
    trusted, where = recipe.trusted, f"{source}: trusted"
    if trusted.source is None:
        if recipe.iif.target == "preference":
            raise UserError(f"{where}.source: iif.target preference needs trusted (prompt, chosen, rejected) "
                            "triples; expected a source, e.g. builtin:trusted-preferences")
        if trusted.dpo_coef:
            raise UserError(f"{where}.source: trusted.dpo_coef {trusted.dpo_coef} needs trusted (prompt, chosen, "
                            "rejected) triples; expected a source, e.g. builtin:trusted-preferences")
        return
    for column in trusted.columns:
        if column not in PREFERENCE_COLUMNS:
            raise UserError(f"{where}.columns.{column}: unknown column (expected prompt, chosen or rejected)")
    if trusted.size is not None and trusted.size < 2:
        raise UserError(f"{where}.size: expected at least 2 triples (the target is split in halves) or null, "
                        f"got {trusted.size}")
    if trusted.dpo_coef < 0:
        raise UserError(f"{where}.dpo_coef: expected a non-negative number, got {trusted.dpo_coef}")
    if trusted.dpo_beta <= 0:
        raise UserError(f"{where}.dpo_beta: expected a positive number, got {trusted.dpo_beta}")


FILTER_OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
                    ">": operator.gt, "<": operator.lt}


def parse_filter(text: str, key: str) -> tuple[str, Callable[[Any, float], bool], float]:
    """``"prompt.toxicity > 0.3"`` -> ("prompt.toxicity", operator.gt, 0.3); `UserError` naming ``key`` if
    the text is not ``COLUMN OP NUMBER``."""
    match = re.fullmatch(r"\s*([\w.\-]+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*", text)
    try:
        number = float(match.group(3)) if match else None
    except ValueError:
        number = None
    if number is None:
        raise UserError(f"{key}: expected 'COLUMN OP NUMBER' with OP one of > >= < <= == !=, got {text!r}")
    return match.group(1), FILTER_OPERATORS[match.group(2)], number
