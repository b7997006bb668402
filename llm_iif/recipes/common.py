"""What every recipe kind shares: the enumerations, the model, LoRA, data, reward, trusted and evaluation
sections, IIF's filter keys, and the value checks' helpers."""

from __future__ import annotations

import operator
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from llm_iif.core.errors import UserError

if TYPE_CHECKING:
    from llm_iif.recipes.grpo import GRPORecipe
    from llm_iif.recipes.ppo import Recipe

# Each enumeration is defined once, as the Literal type recipes are checked against; the tuple of its values
# is what code that is not handed a recipe checks against.
TrackerName = Literal["tensorboard", "wandb", "trackio"]
FilterMode = Literal["neg-bottom", "bottom", "neg-random", "matched-random", "random", "none"]
TargetName = Literal["seq", "return", "reward", "gold", "preference"]
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
TargetSourceName = Literal["fresh", "cached", "batch"]
FILTER_MODES: tuple[str, ...] = typing.get_args(FilterMode)
TARGETS: tuple[str, ...] = typing.get_args(TargetName)
TARGET_SOURCES: tuple[str, ...] = typing.get_args(TargetSourceName)

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


def _value(recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def requirement(recipe, source: str):
    """``require(ok, key, expected)``: raise a UserError naming the file, ``key`` and its value unless ``ok``."""
    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UserError(f"{source}: {key}: expected {expected}, got {_value(recipe, key)!r}")
    return require


def check_trusted(recipe: Recipe | GRPORecipe, source: str) -> None:
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
