"""The GPU GRPO recipes (Qwen2.5 on GSM8K): their settings, the commands in their headers, and a stand-in run of
each by `llm-iif train` on CPU. Only what a CPU cannot do is overridden: the model (a random tiny GPT-2, hence
its LoRA target modules and, for the 0.5B recipe, no chat template), the hub data (a local GSM8K-format file),
sizes, and bf16 autocast and gradient checkpointing."""

import dataclasses
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llm_iif.recipes import GRPORecipe, load_recipe
from llm_iif.grpo.run import accumulation_steps

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "recipes" / "qwen2.5-0.5b-instruct-gsm8k-grpo.yaml"
LARGE = REPO / "recipes" / "qwen2.5-7b-instruct-gsm8k-grpo-8gpu.yaml"
REWARDS = {"reward_models.math_verifier:answer_reward": 1.0, "reward_models.math_verifier:format_reward": 0.1}


@pytest.mark.parametrize("path", [SMALL, LARGE], ids=["0.5b", "7b-8gpu"])
def test_recipe_settings(path):
    from trl import GRPOConfig

    recipe = load_recipe(path, kind=GRPORecipe)
    assert recipe.model.name_or_path.startswith("Qwen/Qwen2.5-") and "Instruct" in recipe.model.name_or_path
    assert recipe.model.chat_template
    data = recipe.data
    assert (data.source, data.subset, data.split, data.prompt_column) == ("openai/gsm8k", "main", "train", "question")
    # evaluated on the whole test split, with verl's instruction: comparable with published accuracies
    assert (data.eval_source, data.eval_split, data.eval_size) == ("openai/gsm8k", "test", 1319)
    assert data.instruction == 'Let\'s think step by step and output the final answer after "####".'
    assert data.columns == {"answer": "answer"}
    assert recipe.rewards == REWARDS and list(recipe.rewards) == list(REWARDS)  # answer_reward is the curve
    # the best measured GRPO setting (results.md section 20): DAPO with refill; IIF off, at the GRPO default
    assert (recipe.group_filter.kind, recipe.group_filter.refill) == ("dapo", True)
    iif = recipe.iif
    assert (iif.enabled, iif.target_source, iif.folds, iif.mode, iif.p) == (False, "batch", 2, "neg-bottom", 1.0)
    grpo = recipe.grpo
    assert set(grpo) <= {f.name for f in dataclasses.fields(GRPOConfig)}
    assert grpo["bf16"] is True and grpo["gradient_checkpointing"] is True
    assert grpo["model_init_kwargs"] == {"dtype": "bfloat16"}  # trl would load float32
    assert grpo["num_generations"] == 8 and 256 <= grpo["max_completion_length"] <= 512
    assert "use_vllm" not in grpo
    assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # a step is run.batch_size completions on any number of GPUs; one generation batch a step, whatever it is
    assert not {"gradient_accumulation_steps", "steps_per_generation", "generation_batch_size"} & set(grpo)
    run = recipe.run
    assert run.save_every > 0 and run.eval_every > 1 and run.eval_decoding == "greedy"


def test_vllm_option_is_commented_out_with_real_fields():
    from trl import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    for path in (SMALL, LARGE):
        text = path.read_text()
        commented = dict(re.findall(r"^\s*# (use_vllm|vllm_mode|vllm_gpu_memory_utilization): (\S+)$", text, re.M))
        assert commented == {"use_vllm": "true", "vllm_mode": "colocate", "vllm_gpu_memory_utilization": "0.3"}
        assert set(commented) <= fields


@pytest.mark.parametrize("path,batch", [(SMALL, 128), (LARGE, 256)], ids=["0.5b", "7b-8gpu"])
def test_a_step_holds_the_same_completions_on_1_2_4_and_8_gpus(path, batch):
    """The launch lines' N: gradient accumulation follows from it."""
    recipe = load_recipe(path, kind=GRPORecipe)
    grpo = recipe.grpo
    assert recipe.run.batch_size == batch and batch % grpo["num_generations"] == 0  # whole groups
    for gpus in (1, 2, 4, 8):
        micro_batch = grpo["per_device_train_batch_size"]
        assert accumulation_steps(batch, micro_batch, gpus) * micro_batch * gpus == batch


@pytest.mark.parametrize("path", [SMALL, LARGE], ids=["0.5b", "7b-8gpu"])
def test_header_commands_name_real_files(path):
    """The header's `accelerate launch` lines use config files that exist and train this recipe; --resume names
    the recipe's run directory."""
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    launches = [line for line in header if "accelerate launch --config_file" in line]
    assert launches
    configs = set()
    for line in launches:
        config = re.search(r"--config_file (\S+)", line).group(1)
        configs.add(config)
        if "..." not in config:
            assert (REPO / config).is_file(), config
        if " train recipes/" in line:
            assert line.rstrip().endswith(f"train {path.relative_to(REPO)}")
    assert "recipes/accelerate/multi_gpu.yaml" in configs
    resumes = re.findall(r"train --resume ([\w./-]+)", "\n".join(header))
    assert resumes and set(resumes) == {load_recipe(path, kind=GRPORecipe).run.output_dir}
    assert not any("zero3" in c or "fsdp" in c for c in configs)


# ------------------------------------------------------------------------------------------- stand-in runs

def write_gsm8k_like(path: Path, rows: int = 96, seed: int = 0) -> Path:
    """A .jsonl in GSM8K's format (question, answer ending in "#### n") that the tiny adder's character-level
    tokenizer can encode: only digits, '+' and '='. Answers are single digits, so that even a random model's
    last number is sometimes right and the rewards vary."""
    rng = random.Random(seed)
    sums = [(a, b) for a in range(10) for b in range(10) if a + b <= 9]
    triples = [(a, b, c) for a in range(10) for b in range(10) for c in range(10) if a + b + c <= 9]
    operands = sums + rng.sample(triples, rows - len(sums))
    rng.shuffle(operands)
    with path.open("w") as f:
        for ops in operands:
            question, total = "+".join(map(str, ops)) + "=", sum(ops)
            answer = f"{' + '.join(map(str, ops))} = <<{question}{total}>>{total}\n#### {total}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    return write_gsm8k_like(tmp_path_factory.mktemp("gsm8k") / "gsm8k-like.jsonl")


def stand_in(model_dir, data_file, *extra) -> list[str]:
    """Overrides of what a CPU cannot do (and 16 completions a step; the tiny tokenizer reads digits, + and =
    only, so no instruction); everything else (LoRA rank, rewards, DAPO,
    IIF, loss, learning rate, model_init_kwargs dtype bfloat16, score_batch_size) stays as the recipe has it."""
    items = [f"model.name_or_path={model_dir}", f"data.source={data_file}", f"data.eval_source={data_file}",
             "data.subset=null", "data.instruction=null",
             "data.validation_size=8", "data.eval_size=16", "lora.target_modules=[c_attn,c_proj,c_fc]",
             "grpo.bf16=false", "grpo.gradient_checkpointing=false", "grpo.num_generations=4",
             "grpo.max_completion_length=8", "run.eval_batch_size=16", "run.steps=2", "run.report_to=[]",
             "run.batch_size=16", *extra]
    return [a for item in items for a in ("--set", item)]


def llm_iif(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "llm_iif", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def check_run(out: Path, recipe_path: Path, completions_per_step: int, iif: bool) -> list[dict]:
    """The run's metrics, records and adapter: DAPO keeps exactly the groups whose rewards vary (4 completions a
    group), refilling up to 4 batches; with ``iif``, IIF then drops exactly those of negative influence on each
    step it filters (one whose target is unusable, with too few informative groups, keeps DAPO's choice)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert 0 <= m["kept_fraction"] <= 1 and 0 <= m["informative_fraction"] <= 1 and 0 <= m["refill_batches"] <= 4
        assert ("filtered" in m) == iif  # 0 when the round's target is unusable (too few informative groups)
    last = lines[-1]  # eval_every 20 > steps: the held-out evaluation runs after the last step only
    assert 0 <= last["eval/answer_reward"] <= 1 and 0 <= last["eval/format_reward"] <= 1
    assert last["reward_mean"] == last["eval/answer_reward"] and last["eval_completions"] == 16
    assert "eval/answer_reward" not in lines[0]
    for step, metrics in enumerate(lines):
        records = pd.read_parquet(out / "records" / f"round_{step:04d}.parquet")
        assert len(records) == completions_per_step * (1 + metrics["refill_batches"])
        assert records["reward"].between(0.0, 1.1).all()
        rewards = records["reward"].to_numpy().reshape(-1, 4)
        informative = (rewards.max(axis=1) - rewards.min(axis=1) > 1e-6).repeat(4)
        if iif and metrics["filtered"]:  # neg-bottom with p 1 drops the informative ones of negative influence
            assert (records["kept"] == (informative & ~(records["influence"] < 0))).all()
        else:
            assert (records["kept"] == informative).all() and records["influence"].isna().all()
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    recipe = load_recipe(recipe_path, kind=GRPORecipe)
    assert adapter["r"] == recipe.lora.r and adapter["lora_alpha"] == recipe.lora.alpha
    return lines


def test_small_recipe_trains_offline(random_adder_dir, gsm8k_file, tmp_path):
    """The 0.5B recipe on micro-batches of 2: 8 accumulation steps for 16 completions a step."""
    out = tmp_path / "run"
    proc = llm_iif("train", SMALL, "--output-dir", out,
                   *stand_in(random_adder_dir, gsm8k_file, "model.chat_template=false",
                             "grpo.per_device_train_batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(out, SMALL, completions_per_step=16, iif=False)


def test_large_recipe_trains_offline_through_a_chat_template(random_adder_dir, gsm8k_file, tmp_path):
    """The 7B recipe on one process, keeping model.chat_template: true: a copy of the tiny tokenizer gets a chat
    template that writes the messages' text only, so prompts and completions are trl's message lists, as with
    Qwen. Micro-batches of 8: 2 accumulation steps; save_every 2 writes a periodic checkpoint. IIF on, as
    `--set iif.enabled=true` turns it on."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "adder-with-chat-template"
    shutil.copytree(random_adder_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    proc = llm_iif("train", LARGE, "--output-dir", out,
                   *stand_in(model_dir, gsm8k_file, "grpo.per_device_train_batch_size=8", "run.save_every=2",
                             "iif.enabled=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(out, LARGE, completions_per_step=16, iif=True)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"]["chat_template"] is True and saved["grpo"]["model_init_kwargs"] == {"dtype": "bfloat16"}
    assert (out / "checkpoint-2" / "manifest.json").is_file() and (out / "checkpoint-2" / "iif_state.pt").is_file()


def test_chat_template_needs_a_tokenizer_that_has_one(random_adder_dir, gsm8k_file, tmp_path):
    proc = llm_iif("train", SMALL, "--output-dir", tmp_path / "run",
                   *stand_in(random_adder_dir, gsm8k_file, "grpo.per_device_train_batch_size=2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("llm-iif: error: model.chat_template: the tokenizer of ")
    assert "has no chat template" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
