"""A GRPO setup small enough for unit tests: IIFGRPOTrainer on addition problems over a tiny model directory
(the ``random_adder_dir`` fixture of tests/conftest.py: a random 2-layer GPT-2 with the adder's tokenizer)."""

from llm_iif.grpo import IIFGRPOTrainer


def grpo_args(output_dir, **overrides):
    from trl import GRPOConfig

    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=16,
                    num_generations=4, max_completion_length=4, temperature=1.0, learning_rate=1e-2,
                    logging_steps=1, max_steps=1, seed=0, save_strategy="no", beta=0.0, disable_tqdm=True,
                    bf16=False)  # exact fp32: trl turns bf16 autocast on by default
    settings.update(overrides)
    return GRPOConfig(**settings)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")


def make_trainer(model_dir, output_dir, lora=True, problems=64, model=None, tokenizer=None, conversational=False,
                 **kwargs):
    """An IIFGRPOTrainer on addition problems; ``kwargs`` go to GRPOConfig unless they are the subclass's.
    ``model``: a model to train instead of a new LoRA adapter on the one in ``model_dir``; ``tokenizer``: one
    instead of ``model_dir``'s; ``conversational``: the prompts as one user turn each (for a chat template)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llm_iif.lm.addition import addition_problems, exact_match_reward, format_reward

    own = {k: kwargs.pop(k) for k in ("iif", "group_filter", "validation_dataset", "nonfinite_patience",
                                      "reward_funcs", "rollout_func", "trusted") if k in kwargs}
    own.setdefault("reward_funcs", [exact_match_reward, format_reward])
    peft = lora_config() if lora and model is None else None
    rows = addition_problems(problems, seed=0)
    if conversational:
        rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows]
    return IIFGRPOTrainer(model=model or str(model_dir), args=grpo_args(output_dir, **kwargs),
                          train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer or AutoTokenizer.from_pretrained(model_dir), peft_config=peft,
                          **own)
