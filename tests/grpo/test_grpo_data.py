"""The GRPO data path (`llm_iif.grpo.data`): sources, column mapping, prompt formats, held-out rows and errors.
Nothing here trains a model or reaches the network."""

import json

import pytest

from llm_iif.recipes import GRPODataConfig
from llm_iif.core.errors import UserError
from llm_iif.grpo.data import (BUILTIN_ADDITION, BUILTIN_CHAIN_SUMS, SPLIT_SEEDS, check_chat_template,
                               grpo_datasets, is_conversational)
from llm_iif.lm.addition import adder_tokenizer, addition_problems
from llm_iif.lm.reasoning import chain_problems

# A chat template of the ChatML shape, enough for apply_chat_template to render a user turn.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def gsm8k_rows(n):
    """GSM8K-shaped rows: a word problem and a worked answer ending in ``#### <number>``."""
    return [{"question": f"Ann has {i} apples and buys {i + 3} more. How many apples does she have?",
             "answer": f"She has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3}"} for i in range(n)]


def config(source, **kwargs):
    kwargs.setdefault("validation_size", 4)
    kwargs.setdefault("eval_size", 6)
    return GRPODataConfig(source=str(source), **kwargs)


def all_rows(splits):
    return [row for split in splits for row in split.to_list()]


def test_local_jsonl_with_a_column_mapping(tmp_path):
    rows = [{"problem": f"{i}+{i}=", "solution": str(2 * i), "difficulty": i % 3} for i in range(30)]
    source = write_jsonl(tmp_path / "sums.jsonl", rows)
    train, validation, evaluation = grpo_datasets(config(source, prompt_column="problem",
                                                         columns={"answer": "solution"}))
    assert (len(train), len(validation), len(evaluation)) == (20, 4, 6)
    for split in (train, validation, evaluation):
        assert split.column_names == ["prompt", "answer"]  # only the mapped names: no difficulty, no problem
    # Every source row appears once, its prompt still paired with its own answer.
    assert sorted((r["prompt"], r["answer"]) for r in all_rows((train, validation, evaluation))) == \
        sorted((r["problem"], r["solution"]) for r in rows)


def test_parquet_with_a_struct_field_mapped(tmp_path):
    import datasets

    path = tmp_path / "sums.parquet"
    rows = [{"text": f"{i}+1=", "meta": {"answer": str(i + 1), "source": "gen"}} for i in range(25)]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    splits = grpo_datasets(config(path, prompt_column="text", columns={"answer": "meta.answer"}))
    assert [len(s) for s in splits] == [15, 4, 6]
    assert sorted((r["prompt"], r["answer"]) for r in all_rows(splits)) == \
        sorted((r["text"], r["meta"]["answer"]) for r in rows)


def test_gsm8k_shaped_jsonl(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(40))
    train, validation, evaluation = grpo_datasets(config(source, prompt_column="question",
                                                         columns={"answer": "answer"}))
    assert len(train) == 30 and train.column_names == ["prompt", "answer"]
    expected = {r["question"]: r["answer"] for r in gsm8k_rows(40)}
    for row in all_rows((train, validation, evaluation)):
        assert row["answer"] == expected[row["prompt"]]  # the worked answer arrives whole, "#### n" included
        assert row["answer"].rsplit("#### ", 1)[1].isdigit()


def test_without_a_mapping_every_column_is_kept(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(20))
    train, _, _ = grpo_datasets(config(source, prompt_column="question"))
    assert train.column_names == ["prompt", "question", "answer"]
    assert all(row["prompt"] == row["question"] for row in train)


def test_builtin_addition_is_unchanged():
    data = GRPODataConfig(source=BUILTIN_ADDITION, train_size=12, validation_size=3, eval_size=5)
    train, validation, evaluation = grpo_datasets(data)
    assert train.to_list() == addition_problems(12, SPLIT_SEEDS["train"])
    assert validation.to_list() == addition_problems(3, SPLIT_SEEDS["validation"])
    assert evaluation.to_list() == addition_problems(5, SPLIT_SEEDS["eval"])


def test_builtin_chain_sums_are_the_generated_problems():
    data = GRPODataConfig(source=BUILTIN_CHAIN_SUMS, train_size=12, validation_size=3, eval_size=5)
    splits = grpo_datasets(data)
    for split, size, seed in zip(splits, (12, 3, 5), SPLIT_SEEDS.values()):
        assert split.to_list() == chain_problems(size, seed)


def test_conversational_prompts_pass_through(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Answer with a number."},
                        {"role": "user", "content": f"{i}+2="}], "answer": str(i + 2)} for i in range(20)]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    for chat_template in (False, True):  # wrapping leaves message lists as they are
        train, validation, evaluation = grpo_datasets(config(source), model_chat_template=chat_template)
        assert is_conversational(train) and is_conversational(evaluation)
        assert sorted(json.dumps(r["prompt"]) for r in all_rows((train, validation, evaluation))) == \
            sorted(json.dumps(r["prompt"]) for r in rows)


def test_chat_template_wraps_plain_prompts_for_trl(tmp_path):
    from trl.data_utils import is_conversational as trl_is_conversational

    source = write_jsonl(tmp_path / "sums.jsonl", [{"prompt": f"{i}+5=", "answer": str(i + 5)} for i in range(20)])
    plain, _, _ = grpo_datasets(config(source))
    wrapped, _, _ = grpo_datasets(config(source), model_chat_template=True)
    assert not is_conversational(plain) and not trl_is_conversational(plain[0])
    assert trl_is_conversational(wrapped[0])  # so trl prompts through the tokenizer's chat template
    assert [row["prompt"] for row in wrapped] == [[{"role": "user", "content": row["prompt"]}] for row in plain]
    assert list(wrapped["answer"]) == list(plain["answer"])
    tokenizer = adder_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(wrapped[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert text == f"<|user|>{plain[0]['prompt']}<|end|><|assistant|>"
    builtin, _, _ = grpo_datasets(GRPODataConfig(source=BUILTIN_ADDITION, train_size=4), model_chat_template=True)
    assert builtin[0]["prompt"] == [{"role": "user", "content": addition_problems(1, SPLIT_SEEDS["train"])[0]
                                     ["prompt"]}]


def test_a_tokenizer_without_a_chat_template_is_refused():
    tokenizer = adder_tokenizer()
    assert tokenizer.chat_template is None
    check_chat_template(tokenizer, needed=False, name="builtin:tiny-adder")  # plain prompts need none
    with pytest.raises(UserError) as err:
        check_chat_template(tokenizer, needed=True, name="builtin:tiny-adder")
    message = str(err.value)
    assert message.startswith("model.chat_template: the tokenizer of 'builtin:tiny-adder' has no chat template")
    assert "\n" not in message
    tokenizer.chat_template = CHAT_TEMPLATE
    check_chat_template(tokenizer, needed=True, name="builtin:tiny-adder")


def test_held_out_rows_come_from_a_seeded_shuffle(tmp_path):
    source = write_jsonl(tmp_path / "ids.jsonl", [{"prompt": f"row {i}", "id": i} for i in range(60)])

    def ids(**kwargs):
        return [list(split["id"]) for split in grpo_datasets(config(source, validation_size=5, eval_size=7, **kwargs))]

    train, validation, evaluation = ids()
    assert (len(train), len(validation), len(evaluation)) == (48, 5, 7)
    assert sorted(train + validation + evaluation) == list(range(60))  # disjoint, and nothing lost
    # Not the file's last rows (the old rule), and not any other contiguous block either.
    held_out = sorted(validation + evaluation)
    assert held_out != list(range(48, 60)) and held_out[-1] - held_out[0] > len(held_out)
    assert ids() == [train, validation, evaluation]  # every call (every run seed) holds out the same rows
    other = ids(shuffle_seed=1)
    assert sorted(other[1] + other[2]) != held_out
    assert sorted(sum(other, [])) == list(range(60))


def test_too_few_rows(tmp_path):
    source = write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"{i}="} for i in range(10)])
    with pytest.raises(UserError, match=r"has 10 rows; expected more than data.validation_size \+ "
                                        r"data.eval_size = 10$"):
        grpo_datasets(config(source))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "data.prompt_column: 'prompt' is not a column of '{source}' (columns: question, answer)"),
    ({"prompt_column": "question", "columns": {"answer": "solution"}},
     "data.columns.answer: 'solution' is not a column of '{source}' (columns: question, answer)"),
    ({"prompt_column": "question", "columns": {"prompt": "answer"}},
     "data.columns.prompt: the prompt comes from data.prompt_column"),
])
def test_missing_columns(tmp_path, kwargs, message):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(20))
    with pytest.raises(UserError) as err:
        grpo_datasets(config(source, **kwargs))
    assert str(err.value).startswith(message.format(source=source)) and "\n" not in str(err.value)


def test_a_row_without_a_prompt_is_an_error(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]
    rows[13]["prompt"], rows[17]["prompt"] = None, "   "
    source = write_jsonl(tmp_path / "holes.jsonl", rows)
    with pytest.raises(UserError) as err:
        grpo_datasets(config(source))
    assert str(err.value) == (
        f"data.prompt_column: 2 of 20 rows of '{source}' have no prompt in column 'prompt' (None, blank, or "
        "neither text nor a list of role/content messages), the first row 13 (counting from 0); expected one in "
        "every row")


def test_mixed_prompt_kinds_are_an_error(tmp_path):
    rows = [{"prompt": f"{i}+1="} for i in range(20)]
    rows[5]["prompt"] = [{"role": "user", "content": "5+1="}]
    source = tmp_path / "mixed.json"
    source.write_text(json.dumps(rows))  # a JSON array, which datasets reads with mixed types unlike jsonl
    with pytest.raises(UserError, match=r"mixes plain-text prompts \(row 0\) and conversational ones \(row 5\)"):
        grpo_datasets(config(source))


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "data.source: {source} is empty"),
    ("blank.jsonl", "\n\n", "data.source: {source} has no rows"),
    ("empty.json", "[]", "data.source: {source} has no rows"),
])
def test_empty_files(tmp_path, name, content, message):
    source = tmp_path / name
    source.write_text(content)
    with pytest.raises(UserError) as err:
        grpo_datasets(config(source))
    assert str(err.value) == message.format(source=source)


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), source)
    with pytest.raises(UserError) as err:
        grpo_datasets(config(source))
    assert str(err.value) == f"data.source: {source} has no rows"


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "missing.jsonl"}, "data.source: file not found: missing.jsonl"),
    ({"source": "builtin:review-prompts"}, "data.source: unknown built-in data set 'builtin:review-prompts' "
                                           "(expected builtin:addition, builtin:chain-sums,"),
])
def test_bad_sources(kwargs, message):
    with pytest.raises(UserError) as err:
        grpo_datasets(GRPODataConfig(**kwargs))
    assert str(err.value).startswith(message)


def test_subset_applies_to_hub_ids_only(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(20))
    with pytest.raises(UserError, match=r"^data.subset: 'main' names a configuration of a hub id, but data.source"):
        grpo_datasets(config(source, prompt_column="question", subset="main"))


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable: the environment variables, and the flags datasets and huggingface_hub read from them
    at import (they may have been imported before this test)."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "openai/gsm8k", "subset": "main", "prompt_column": "question"},
     "data.source: cannot load 'openai/gsm8k' (subset 'main'): "),
    ({"source": "hf://datasets/no-such-org/no-such-dataset/data/train-*.parquet"},
     "data.source: cannot load 'hf://datasets/no-such-org/no-such-dataset/data/train-*.parquet': "),
])
def test_unreachable_hub_sources_offline(offline, kwargs, message):
    with pytest.raises(UserError) as err:
        grpo_datasets(GRPODataConfig(**kwargs))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_evaluation_rows_from_their_own_source(tmp_path):
    """GSM8K's test split as practitioners evaluate on it: the evaluation rows are the first eval_size rows of
    data.eval_source, and none of the training source's rows is held out for evaluation."""
    train_file = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(20))
    test_rows = [{**row, "question": "Test: " + row["question"]} for row in gsm8k_rows(8)]
    test_file = write_jsonl(tmp_path / "test.jsonl", test_rows)
    train, validation, evaluation = grpo_datasets(
        config(train_file, prompt_column="question", columns={"answer": "answer"}, eval_source=test_file))
    assert [row["prompt"] for row in evaluation] == [row["question"] for row in test_rows[:6]]
    assert evaluation.column_names == ["prompt", "answer"]
    assert len(validation) == 4 and len(train) == 16  # 20 rows: 4 validation, the rest trained on
    assert not {row["prompt"] for row in evaluation} & {row["prompt"] for row in train}


def test_an_instruction_and_a_system_prompt_reach_every_prompt(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(12))
    instruction = 'Let\'s think step by step and output the final answer after "####".'
    splits = grpo_datasets(config(source, prompt_column="question", instruction=instruction,
                                  system_prompt="You solve maths problems."))
    for row in all_rows(splits):
        system, user = row["prompt"]
        assert system == {"role": "system", "content": "You solve maths problems."}
        assert user["role"] == "user" and user["content"].endswith(f"? {instruction}")
    text = grpo_datasets(config(source, prompt_column="question", instruction="Think."))
    assert all(row["prompt"].endswith("apples does she have? Think.") for row in all_rows(text))


def test_a_system_prompt_over_prompts_that_have_one_is_an_error(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+1="}]}
            for i in range(12)]
    with pytest.raises(UserError, match="data.system_prompt: the prompts of .* already start with a system turn"):
        grpo_datasets(config(write_jsonl(tmp_path / "chat.jsonl", rows), system_prompt="Be kind."))
