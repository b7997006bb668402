"""`llm-iif reward train`: a reward model from preference pairs with trl's ``RewardTrainer``.

The model is the base checkpoint with a one-label sequence-classification head, trained on
prompt + chosen vs prompt + rejected (the Bradley-Terry loss of ``RewardTrainer``), optionally through LoRA
adapters that are merged before saving. ``OUTPUT_DIR/model`` is a plain ``from_pretrained`` directory that
the ``hf-classifier`` reward loads as it is (with ``input: prompt+response`` and ``append_eos: true``), and ``OUTPUT_DIR/eval.json``
holds the pairwise accuracy on held-out pairs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from pathlib import Path

from llm_iif.recipes import PreferenceDataConfig
from llm_iif.core.distributed import accelerate_state_kept
from llm_iif.core.errors import MODEL_LOAD_ERRORS, UserError, model_load_problem
from llm_iif.core.fileio import atomic_write_text, write_directory_atomically
from llm_iif.lm.data import column_values, is_messages, load_table
from reward_models.hf_classifier import HFClassifierReward


def load_preference_pairs(recipe, tokenizer) -> tuple[dict[str, list[str]], dict[str, list[str]], bool]:
    """(train, held-out) pairs as {"chosen": [...], "rejected": [...]} texts, the prompt already in front
    (conversational pairs through ``tokenizer``'s chat template), and whether any pair was a conversation."""
    rows, conversational = _pair_texts(recipe.data, tokenizer)
    random.Random(recipe.run.seed).shuffle(rows)
    n_held_out = max(1, int(len(rows) * recipe.data.validation_fraction))
    if n_held_out >= len(rows):
        raise UserError(f"data.source: '{recipe.data.source}' has {len(rows)} pair(s); too few to hold out "
                        f"{recipe.data.validation_fraction:.0%} and train on the rest")

    def as_columns(part):
        return {"chosen": [c for c, _ in part], "rejected": [r for _, r in part]}

    return as_columns(rows[n_held_out:]), as_columns(rows[:n_held_out]), conversational


def _pair_texts(data: PreferenceDataConfig, tokenizer=None) -> tuple[list[tuple[str, str]], bool]:
    """Every (prompt + chosen, prompt + rejected) text pair of ``data``, in file order, and whether any was a
    conversation. A row may be text, or
    conversational as in trl's preference datasets (chosen and rejected message lists, with the prompt's messages
    in front of them or in the prompt column); a conversation becomes text through ``tokenizer``'s chat
    template, and without a ``tokenizer`` it is left out. Rows with an empty or missing value are skipped.
    `UserError` when, with a ``tokenizer``, no row is left."""
    names = [name for name in (data.prompt_column, data.chosen_column, data.rejected_column) if name]
    keys = ["data.prompt_column", "data.chosen_column", "data.rejected_column"][-len(names):]
    table = load_table(data.source, "data.source", data.split)
    columns = [column_values(table, data.source, name, key) for name, key in zip(names, keys)]
    if not data.prompt_column:
        columns.insert(0, [""] * len(columns[0]))
    pairs, conversational = [], False
    for prompt, chosen, rejected in zip(*columns):
        if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            if chosen.strip() and rejected.strip() and (prompt.strip() or not data.prompt_column):
                pairs.append((prompt + chosen, prompt + rejected))
        elif is_messages(chosen) and is_messages(rejected) and (prompt == "" or is_messages(prompt)):
            if tokenizer is not None and not tokenizer.chat_template:
                raise UserError(f"data.source: '{data.source}' holds conversations, and the tokenizer of "
                                "model.name_or_path has no chat template to write them as text; expected a base "
                                "model whose tokenizer has one, or pairs of text")
            conversational = True
            if tokenizer is not None:
                start = prompt or []
                pairs.append(tuple(tokenizer.apply_chat_template(start + answer, tokenize=False)
                                   for answer in (chosen, rejected)))
    if not pairs and tokenizer is not None:
        raise UserError(f"data.source: '{data.source}' has no rows with text, or messages, in column(s) "
                        f"{', '.join(names)}")
    return pairs, conversational


def reward_training_pairs(model_dir: str) -> set[tuple[str, str]] | None:
    """The (prompt + chosen, prompt + rejected) texts the reward model in ``model_dir`` learnt from, when
    `train_reward_model` wrote it (its eval.json, next to the model, names the data); else None."""
    record = Path(model_dir).parent / "eval.json"
    try:
        data = json.loads(record.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(_pair_texts(PreferenceDataConfig(**data))[0])  # its conversations are never text triples


def triples_among_pairs(triples: dict[str, list[str]], pairs: set[tuple[str, str]]) -> int:
    """How many (prompt, chosen, rejected) ``triples`` are among a reward model's training ``pairs``."""
    return sum(isinstance(p, str) and (p + c, p + r) in pairs  # a message-list prompt is no reward-model pair
               for p, c, r in zip(triples["prompt"], triples["chosen"], triples["rejected"]))


def pairwise_accuracy(reward, pairs: dict[str, list[str]]) -> float:
    """Share of pairs whose chosen text the reward model scores above the rejected one."""
    empty = [""] * len(pairs["chosen"])
    chosen, rejected = reward(empty, pairs["chosen"]), reward(empty, pairs["rejected"])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def train_reward_model(recipe, base_model: str) -> dict:
    """Train from ``base_model`` (a hub id or local path: ``recipe.model.name_or_path`` with any ``builtin:``
    name resolved), save OUTPUT_DIR/model atomically, and return (and write) eval.json's content."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    base = base_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        train_pairs, held_out, conversational = load_preference_pairs(recipe, tokenizer)
        torch.manual_seed(recipe.run.seed)  # the new score head's initial weights; unseeded, every build differed
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    except MODEL_LOAD_ERRORS as err:
        raise UserError(f"model.name_or_path: cannot load '{recipe.model.name_or_path}' "
                        f"({model_load_problem(err, base)})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    output_dir = Path(recipe.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = recipe.train
    lora = recipe.lora
    peft_config = (peft.LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                   target_modules=lora.target_modules) if cfg.use_lora else None)
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix=".trainer-", dir=output_dir) as scratch, accelerate_state_kept():
        # trl defaults to bf16 autocast, which on a CPU is slower and less exact: full precision there.
        args = RewardConfig(output_dir=scratch, num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                            per_device_train_batch_size=cfg.batch_size, max_length=cfg.max_length,
                            seed=recipe.run.seed, save_strategy="no", report_to=[], logging_steps=10,
                            use_cpu=not on_gpu, bf16=on_gpu)
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(train_pairs),
                                processing_class=tokenizer, peft_config=peft_config)
        result = trainer.train()
    model = trainer.model
    if isinstance(model, peft.PeftModel):
        model = model.merge_and_unload()
    write_directory_atomically(output_dir / "model",
                               lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))

    reward = HFClassifierReward(str(output_dir / "model"), input="prompt+response", append_eos=True,
                                max_length=cfg.max_length)
    sample = {k: v[:len(held_out["chosen"])] for k, v in train_pairs.items()}
    metrics = {"heldout_accuracy": pairwise_accuracy(reward, held_out),
               "train_accuracy": pairwise_accuracy(reward, sample),
               "train_pairs": len(train_pairs["chosen"]), "heldout_pairs": len(held_out["chosen"]),
               "train_loss": result.training_loss, "use_lora": cfg.use_lora, "chat_template": conversational,
               "data": dataclasses.asdict(recipe.data)}  # for reward_training_pairs
    atomic_write_text(output_dir / "eval.json", json.dumps(metrics, indent=2))
    return metrics
