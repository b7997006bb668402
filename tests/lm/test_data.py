"""Prompt loading from local files, length limits and the train/validation split."""

import json

import pytest

from llm_iif.recipes import DataConfig
from llm_iif.lm.data import load_prompts
from llm_iif.core.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from llm_iif.lm.policy import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


PROMPTS = [f"the movie was {'very ' * (i % 6)}" .strip() for i in range(40)]


def test_struct_columns_and_filters(tmp_path, tokenizer):
    """RealToxicityPrompts-style rows: the text and its score are fields of a struct column."""
    path = tmp_path / "rtp.jsonl"
    rows = [{"prompt": {"text": p, "toxicity": i / 40 if i % 7 else None}} for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(path), prompt_column="prompt.text", filters=["prompt.toxicity > 0.5"],
                     validation_fraction=0.0)
    kept = load_prompts(cfg, tokenizer, seed=0).train
    assert sorted(kept) == sorted(p for i, p in enumerate(PROMPTS) if i % 7 and i / 40 > 0.5)
    with pytest.raises(UserError,
                       match=r"data.prompt_column: 'prompt.words' is not a field of .* \(fields: text, toxicity\)"):
        load_prompts(DataConfig(source=str(path), prompt_column="prompt.words"), tokenizer, seed=0)
    with pytest.raises(UserError, match="data.filters: 'score' is not a column"):
        load_prompts(DataConfig(source=str(path), prompt_column="prompt.text", filters=["score > 1"]), tokenizer, 0)
    with pytest.raises(UserError, match="that pass the filters"):
        load_prompts(DataConfig(source=str(path), prompt_column="prompt.text", filters=["prompt.toxicity > 5"]),
                     tokenizer, 0)


def test_jsonl_with_custom_column(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PROMPTS)))
    splits = load_prompts(DataConfig(source=str(path), prompt_column="text", validation_fraction=0.25),
                          tokenizer, seed=0)
    assert len(splits.validation) == 10 and len(splits.train) == 30
    assert sorted(splits.train + splits.validation) == sorted(PROMPTS)


def test_split_is_seeded(tmp_path, tokenizer):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS))
    cfg = DataConfig(source=str(path))
    assert load_prompts(cfg, tokenizer, seed=1).train == load_prompts(cfg, tokenizer, seed=1).train
    assert load_prompts(cfg, tokenizer, seed=1).train != load_prompts(cfg, tokenizer, seed=2).train


def test_parquet(tmp_path, tokenizer):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"prompt": PROMPTS}).to_parquet(str(path))
    splits = load_prompts(DataConfig(source=str(path), validation_fraction=0.0), tokenizer, seed=0)
    assert len(splits.train) == 40 and splits.validation == []


def test_length_limits_drop_long_prompts(tmp_path, tokenizer):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS))
    # "the movie was" is 3 tokens; every "very" adds one.
    splits = load_prompts(DataConfig(source=str(path), max_prompt_tokens=4, validation_fraction=0.0),
                          tokenizer, seed=0)
    assert set(splits.train) == {"the movie was", "the movie was very"}
    assert splits.dropped_by_length == 40 - len(splits.train)


@pytest.mark.parametrize("cfg, message", [
    (DataConfig(source="missing.jsonl"), "data.source: file not found: missing.jsonl"),
    (DataConfig(source="builtin:nope"), "data.source: unknown built-in data set"),
    (DataConfig(source="no-such-org/no-such-dataset"), "data.source: cannot load 'no-such-org/no-such-dataset'"),
])
def test_bad_sources(cfg, message, tokenizer):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_prompts(cfg, tokenizer, seed=0)


def test_missing_column(tmp_path, tokenizer):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question": p} for p in PROMPTS]))
    with pytest.raises(UserError, match="data.prompt_column: 'prompt' is not a column"):
        load_prompts(DataConfig(source=str(path)), tokenizer, seed=0)


def test_builtin_prompts(tokenizer):
    splits = load_prompts(DataConfig(source="builtin:review-prompts"), tokenizer, seed=0)
    assert len(splits.train) > 400 and len(splits.validation) > 40


def test_truncated_prompts_keep_their_first_tokens(tmp_path, tokenizer):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in ["the movie was very very good", "great fun", "x"]))
    cfg = DataConfig(source=str(path), prompt_column="text", truncate_prompt_tokens=3, min_prompt_tokens=2,
                     validation_fraction=0.0)
    kept = load_prompts(cfg, tokenizer, seed=0).train
    assert sorted(kept) == sorted(["the movie was", "great fun"])  # "x" is 1 token: below the minimum


def test_equal_length_review_prompts_are_one_token_length_and_seeded(tiny_model_dir):
    from transformers import AutoTokenizer

    from llm_iif.lm.reviews import equal_length_review_prompts

    rows = equal_length_review_prompts(300, seed=1)
    assert rows == equal_length_review_prompts(300, seed=1) != equal_length_review_prompts(300, seed=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # one length, so trl's left padding shifts no positions of the tiny GPT-2
    assert {len(tokenizer(row["prompt"])["input_ids"]) for row in rows} == {7}
    assert len({row["prompt"] for row in rows}) > 150 and set(rows[0]) == {"prompt"}
