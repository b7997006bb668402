"""The policy: a causal LM with a LoRA adapter and a scalar value head on its last hidden state.

The reference policy is the same module with the adapter disabled (`reference_logits`), never a copy.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_iif.recipes import LoraConfig, ModelConfig
from llm_iif.core.errors import MODEL_LOAD_ERRORS, UserError, first_line, model_load_problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PolicyWithValueHead(nn.Module):
    """``forward`` returns (logits [B, L, V], values [B, L]) for input ids [B, L].

    The value head reads the LM's last hidden state, so value-loss gradients reach the shared LoRA
    backbone unless ``detach_value_head`` stops them there.
    """

    def __init__(self, lm: nn.Module, detach_value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.detach_value_head = detach_value_head
        self.value_head = nn.Linear(lm.config.get_text_config().hidden_size, 1, dtype=torch.float32)
        # Start from V = 0 so the first advantages are the raw rewards, not noise from a random head.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        if self.detach_value_head:
            hidden = hidden.detach()
        return out.logits, self.value_head(hidden).squeeze(-1)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] of the base model: the same weights with the LoRA adapter switched off."""
        with self.lm.disable_adapter():
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask)).logits


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: [0 0 1 2 …] for mask [0 1 1 1 …], matching what `generate` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_tokenizer(name_or_path: str):
    """Tokenizer with left padding and a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except MODEL_LOAD_ERRORS as err:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from '{name_or_path}' "
                        f"(not a local model directory, and not reachable on the hub)") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> tuple[PolicyWithValueHead, object]:
    """Load the base model and tokenizer, wrap the model with a fresh LoRA adapter and add the value head.

    ``model_cfg.name_or_path`` is a hub id or a local directory (`llm_iif.models.builtins` resolves
    ``builtin:`` names before this is called)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    path = model_cfg.name_or_path
    tokenizer = load_tokenizer(path)
    if model_cfg.chat_template and not tokenizer.chat_template:
        raise UserError(f"model.chat_template: the tokenizer of '{model_cfg.name_or_path}' has no chat template")
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model_cfg.dtype],
                                                    **quantization_kwargs(model_cfg))
    except MODEL_LOAD_ERRORS as err:
        raise UserError(f"model.name_or_path: cannot load '{model_cfg.name_or_path}' as a causal LM "
                        f"({model_load_problem(err, path)})") from err
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    peft_config = PeftLoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM",
        # GPT-2 style Conv1D layers store weights transposed.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in base.modules()))
    try:
        lm = get_peft_model(base, peft_config)
    except ValueError as err:
        raise UserError(f"lora.target_modules: {first_line(err)}") from err
    policy = PolicyWithValueHead(lm, detach_value_head=model_cfg.detach_value_head)
    # Rollout, scoring and update all run in eval mode: no dropout, as in the paper.
    policy.eval()
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return policy, tokenizer


def quantization_kwargs(model_cfg: ModelConfig) -> dict:
    """``from_pretrained`` arguments that load the frozen base weights in 8 or 4 bits (bitsandbytes)."""
    if model_cfg.quantization is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401  (an optional extra)
    except ImportError as err:
        raise UserError(f"model.quantization: '{model_cfg.quantization}' needs bitsandbytes; "
                        "pip install 'llm_iif[quantization]' (CUDA GPUs)") from err
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=DTYPES[model_cfg.dtype])}


def enable_gradient_checkpointing(policy: PolicyWithValueHead) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    transformers only checkpoints a layer whose module is in training mode, and the policy runs in eval
    mode (no dropout). So only the layer modules themselves are switched to training mode; their dropout
    submodules stay in eval mode. The attribution hooks store by overwrite, so the recomputation's second
    forward call is harmless.
    """
    base = policy.lm.get_base_model()
    if not base.supports_gradient_checkpointing:
        raise UserError(f"model.gradient_checkpointing: {type(base).__name__} does not support it")
    base.activation_checkpointing_enable({"use_reentrant": False})
    for module in base.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def prompt_formatter(tokenizer, chat_template: bool):
    """The text the policy is prompted with: the prompt itself, or the prompt as a user turn in the
    tokenizer's chat template followed by the assistant's turn header."""
    if not chat_template:
        return lambda prompt: prompt
    return lambda prompt: tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
