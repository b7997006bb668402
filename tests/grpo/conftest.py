"""A GRPO setup small enough for unit tests: a random 2-layer GPT-2 over the adder's character tokenizer."""

import pytest
import torch

from llm_iif.grpo import IIFGRPOTrainer


@pytest.fixture(scope="session")
def random_adder_dir(tmp_path_factory):
    """A randomly initialised tiny GPT-2 and the adder tokenizer, saved like a hub model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llm_iif.lm.addition import adder_tokenizer

    out = tmp_path_factory.mktemp("random-adder")
    tokenizer = adder_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def grpo_args(output_dir, **overrides):
    from trl import GRPOConfig

    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=16,
                    num_generations=4, max_completion_length=4, temperature=1.0, learning_rate=1e-2,
                    logging_steps=1, max_steps=1, seed=0, save_strategy="no", beta=0.0, disable_tqdm=True,
                    bf16=False)  # exact fp32: trl turns bf16 autocast on by default
    settings.update(overrides)
    return GRPOConfig(**settings)


def make_trainer(model_dir, output_dir, lora=True, problems=64, **kwargs):
    """An IIFGRPOTrainer on addition problems; ``kwargs`` go to GRPOConfig unless they are the subclass's."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from llm_iif.lm.addition import addition_problems, exact_match_reward, format_reward

    own = {k: kwargs.pop(k) for k in ("iif", "group_filter", "validation_dataset", "nonfinite_patience",
                                      "reward_funcs", "rollout_func") if k in kwargs}
    own.setdefault("reward_funcs", [exact_match_reward, format_reward])
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM") if lora else None
    return IIFGRPOTrainer(model=str(model_dir), args=grpo_args(output_dir, **kwargs),
                          train_dataset=Dataset.from_list(addition_problems(problems, seed=0)),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft, **own)
