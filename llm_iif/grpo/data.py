"""The data of a GRPO recipe: its ``data`` section read into trl-ready (train, validation, evaluation) datasets.

Sources (``data.source``):
- ``builtin:addition``: generated 2-3 digit sums (`llm_iif.lm.addition.addition_problems`), and
  ``builtin:chain-sums``: sums of four 2-digit numbers to be worked out as a chain of running sums
  (`llm_iif.lm.reasoning.chain_problems`), and ``builtin:equal-length-reviews``: review prompts of one token
  length, answered freely (`llm_iif.lm.reviews.equal_length_review_prompts`, for a sentiment reward);
  ``train_size``, ``validation_size`` and ``eval_size`` of them, each split from its own fixed seed;
- a local .json/.jsonl/.parquet (or .txt, one prompt per line) file, such files in a hub repo as an
  ``hf://datasets/...`` path, or a `datasets` hub id read with ``data.split`` and ``data.subset``, e.g.
  ``openai/gsm8k`` with subset ``main``. These are read by `llm_iif.lm.data.load_table`, as on the PPO side.

Every dataset row has ``prompt`` (from ``data.prompt_column``) and the columns the reward functions read:
``data.columns`` maps their names to the source's columns, or, when it is empty, every source column is kept
under its own name. A prompt is plain text or trl's conversational format (a list of role/content messages);
with ``model.chat_template`` plain text is wrapped as one user message, so that trl applies the tokenizer's
chat template. A row without a prompt (None, empty, or neither kind) is an error naming the first such row,
not skipped: the held-out rows are drawn from the file's rows, and silently dropping some would change them.

The held-out rows of a file or hub split come from a shuffle seeded with ``data.shuffle_seed``, not the run
seed: the first ``validation_size`` shuffled rows are the validation set (the fresh IIF target), the next
``eval_size`` the evaluation set, and the rest are trained on, so every seed and method of a comparison sees
the same held-out rows wherever they sit in the file.
"""

from __future__ import annotations

import dataclasses
import random

from llm_iif.recipes import GRPODataConfig
from llm_iif.core.errors import UserError
from llm_iif.lm.addition import addition_problems
from llm_iif.lm.reviews import equal_length_review_prompts
from llm_iif.lm.data import column_values, load_table, source_kind
from llm_iif.lm.reasoning import chain_problems

BUILTIN_ADDITION = "builtin:addition"
BUILTIN_CHAIN_SUMS = "builtin:chain-sums"
BUILTIN_REVIEWS = "builtin:equal-length-reviews"
# The generated problem sets: each source's (num, seed) -> rows with "prompt" and "answer".
GENERATED_SOURCES = {BUILTIN_ADDITION: addition_problems, BUILTIN_CHAIN_SUMS: chain_problems,
                     BUILTIN_REVIEWS: equal_length_review_prompts}
# Seeds of the generated problem sets: the same problems for every run seed, disjoint draws per split.
SPLIT_SEEDS = {"train": 1, "validation": 2, "eval": 3}


def grpo_datasets(data: GRPODataConfig, model_chat_template: bool = False):
    """(train, validation, evaluation) `datasets.Dataset`s of ``data``, each with a ``prompt`` column (a str, or
    a list of {"role", "content"} dicts) and the reward functions' columns. ``model_chat_template`` wraps
    plain-text prompts as user messages. Raises a one-line `UserError` for any problem with the data."""
    from datasets import Dataset

    if data.source in GENERATED_SOURCES:
        splits = tuple(Dataset.from_dict(grpo_columns(table, data, model_chat_template))
                       for table in _generated_tables(data))
    else:
        rows = Dataset.from_dict(grpo_columns(_read_source(data), data, model_chat_template))
        held_out = data if data.eval_source is None else dataclasses.replace(data, eval_size=0)
        splits = tuple(rows.select(indices) for indices in held_out_split(len(rows), held_out))
    if data.eval_source is None:
        return splits
    return (*splits[:2], _evaluation_rows(data, model_chat_template))


def _evaluation_rows(data: GRPODataConfig, model_chat_template: bool):
    """The first ``eval_size`` rows of ``data.eval_source`` (its ``eval_split``), with the columns and prompt
    formatting of the training rows."""
    from datasets import Dataset

    hub = source_kind(data.eval_source) == "hub"
    source = dataclasses.replace(data, source=data.eval_source, split=data.eval_split,
                                 subset=data.subset if hub else None)
    rows = Dataset.from_dict(grpo_columns(_read_source(source, "data.eval_source"), source, model_chat_template))
    return rows.select(range(min(data.eval_size, len(rows))))


def _read_source(data: GRPODataConfig, key: str = "data.source"):
    """The whole table of a file or hub ``data.source`` (`load_table`), after the checks only GRPO makes; ``key``
    names the source in errors."""
    kind = source_kind(data.source)
    if kind == "builtin":  # the PPO side's built-in sets have no answers to reward
        raise UserError(f"{key}: unknown built-in data set '{data.source}' (expected "
                        f"{', '.join(GENERATED_SOURCES)}, a .json/.jsonl/.parquet file or a hub id)")
    if data.subset is not None and kind != "hub":
        raise UserError(f"data.subset: '{data.subset}' names a configuration of a hub id, but {key} "
                        f"'{data.source}' is a file (expected data.subset: null)")
    return load_table(data.source, key, data.split, data.subset, text_column=data.prompt_column)


def _generated_tables(data: GRPODataConfig) -> list[dict[str, list]]:
    """A generated source's train, validation and evaluation rows, each ``{"prompt": [...], "answer": [...]}``
    (prompts alone for the reviews) (``train_size``, ``validation_size`` and ``eval_size`` of them, from the split's seed in `SPLIT_SEEDS`)."""
    sizes = {"train": data.train_size, "validation": data.validation_size, "eval": data.eval_size}
    tables = []
    for split in ("train", "validation", "eval"):
        rows = GENERATED_SOURCES[data.source](sizes[split], SPLIT_SEEDS[split])
        tables.append({name: [row[name] for row in rows] for name in rows[0]})
    return tables


def grpo_columns(table, data: GRPODataConfig, model_chat_template: bool = False) -> dict[str, list]:
    """The dataset columns of ``table`` (from `load_table`: a `datasets.Dataset` or a dict of column lists):
    ``prompt`` from ``data.prompt_column``, checked and, with ``model_chat_template``, plain text wrapped as a
    user message; then ``data.columns`` (name -> source column), or every other source column as it is."""
    prompts = column_values(table, data.source, data.prompt_column, "data.prompt_column")
    _check_prompts(prompts, data)
    if data.instruction:
        prompts = [with_instruction(prompt, data.instruction) for prompt in prompts]
    if model_chat_template or data.system_prompt:
        prompts = [as_messages(prompt) for prompt in prompts]
    if data.system_prompt:
        prompts = [with_system_turn(prompt, data.system_prompt, data.source) for prompt in prompts]
    columns = {"prompt": prompts}
    if not data.columns:
        names = table.column_names if hasattr(table, "column_names") else list(table)
        # The source's own "prompt" column, if any, gives way to data.prompt_column.
        columns.update({name: list(table[name]) for name in names if name != "prompt"})
        return columns
    for name, column in data.columns.items():
        if name == "prompt":
            raise UserError(f"data.columns.prompt: the prompt comes from data.prompt_column; expected the names "
                            f"the reward functions read besides it, got prompt: {column}")
        columns[name] = column_values(table, data.source, column, f"data.columns.{name}")
    return columns


def prompt_kind(prompt) -> str | None:
    """``"text"`` for a non-blank string, ``"messages"`` for trl's conversational format (a non-empty list of
    dicts with "role" and "content"), None for anything else (None, blank, malformed)."""
    if isinstance(prompt, str):
        return "text" if prompt.strip() else None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and m.get("role") and "content" in m
                                                   for m in prompt):
        return "messages"
    return None


def _check_prompts(prompts: list, data: GRPODataConfig) -> None:
    """A one-line `UserError` unless every prompt is text or messages, and all of one kind (trl decides from the
    first row whether a batch is conversational)."""
    kinds = [prompt_kind(prompt) for prompt in prompts]
    missing = [i for i, kind in enumerate(kinds) if kind is None]
    if missing:
        raise UserError(f"data.prompt_column: {len(missing)} of {len(prompts)} rows of '{data.source}' have no "
                        f"prompt in column '{data.prompt_column}' (None, blank, or neither text nor a list of "
                        f"role/content messages), the first row {missing[0]} (counting from 0); expected one "
                        "in every row")
    if len(set(kinds)) > 1:
        first = {kind: kinds.index(kind) for kind in ("text", "messages")}
        raise UserError(f"data.prompt_column: '{data.source}' mixes plain-text prompts (row {first['text']}) "
                        f"and conversational ones (row {first['messages']}); expected one kind")


def as_messages(prompt) -> list[dict]:
    """A plain-text prompt as trl's conversational format, one user turn; a message list as it is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def with_instruction(prompt, instruction: str):
    """``prompt`` with ``instruction`` appended after a space: to the text, or to a message list's last user
    turn."""
    if isinstance(prompt, str):
        return f"{prompt} {instruction}"
    last_user = max(i for i, message in enumerate(prompt) if message["role"] == "user")
    return [{**m, "content": f"{m['content']} {instruction}"} if i == last_user else m for i, m in enumerate(prompt)]


def with_system_turn(messages: list[dict], system_prompt: str, source: str) -> list[dict]:
    """``messages`` after a system turn of ``system_prompt``; `UserError` if they already start with one."""
    if messages[0]["role"] == "system":
        raise UserError(f"data.system_prompt: the prompts of '{source}' already start with a system turn "
                        f"({messages[0]['content'][:40]!r}); expected prompts without one, or no data.system_prompt")
    return [{"role": "system", "content": system_prompt}, *messages]


def held_out_split(num_rows: int, data: GRPODataConfig) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, evaluation) row indices of ``num_rows`` rows: shuffled with ``data.shuffle_seed``, the
    first ``validation_size`` are validation, the next ``eval_size`` evaluation, the rest training."""
    held_out = data.validation_size + data.eval_size
    if num_rows <= held_out:
        raise UserError(f"data.source: {data.source} has {num_rows} rows; expected more than "
                        f"data.validation_size + data.eval_size = {held_out}")
    order = list(range(num_rows))
    random.Random(data.shuffle_seed).shuffle(order)
    return order[held_out:], order[:data.validation_size], order[data.validation_size:held_out]


def is_conversational(dataset) -> bool:
    """Whether the prompts of ``dataset`` (from `grpo_datasets`) are message lists; all rows are of one kind."""
    return len(dataset) > 0 and isinstance(dataset[0]["prompt"], list)


def check_chat_template(tokenizer, needed: bool, name: str | None = None) -> None:
    """A one-line `UserError` if a chat template is ``needed`` (``model.chat_template`` is true or the prompts
    are conversational: see `is_conversational`) and ``tokenizer`` has none. ``name`` is the model's
    ``name_or_path`` (default: the tokenizer's own)."""
    if needed and not tokenizer.chat_template:
        name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"model.chat_template: the tokenizer of '{name}' has no chat template, which "
                        "model.chat_template: true or conversational prompts need (expected a model whose "
                        "tokenizer has one, or plain-text prompts with model.chat_template: false)")
