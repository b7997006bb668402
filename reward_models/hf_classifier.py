"""Any ``AutoModelForSequenceClassification`` (a hub id or a local directory) as a reward model.

It reads the decoded text with its own tokenizer, so any policy pairs with any reward model. The score of
sample i is one label's ``logit``, ``prob`` or ``log_prob`` (softmax over the labels; a sigmoid for a one-label
model, e.g. one trained with trl's RewardTrainer) on the response alone or on prompt + response. A model
trained with trl's RewardTrainer saw every text end in EOS, so it is scored with ``append_eos``. A reward model
trained on conversations reads them through its own chat template (``chat_template``), as trl's GRPOTrainer
formats conversational input for a reward model; a prompt may then be a message list (trl's conversational format).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_iif.core.errors import MODEL_LOAD_ERRORS, UserError, model_load_problem

OUTPUTS = ("logit", "prob", "log_prob")
INPUTS = ("response", "prompt+response")


class HFClassifierReward:
    """Batched, no-grad classifier scores. ``label`` is an index or a name from the model's ``id2label``;
    it may be left out for a one-label model. ``key`` names the recipe key of ``name_or_path`` in errors, and
    ``section`` the recipe section of the other settings."""

    def __init__(self, name_or_path: str | None, label: int | str | None = None, output: str = "logit",
                 input: str = "prompt+response", append_eos: bool = False, chat_template: bool = False,
                 batch_size: int = 32,
                 max_length: int = 512, device="cpu", dtype: torch.dtype = torch.float32,
                 key: str = "reward.name_or_path", section: str = "reward"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not name_or_path:
            raise UserError(f"{key}: required for {section}.name 'hf-classifier'")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, dtype=dtype, output_loading_info=True)
        except MODEL_LOAD_ERRORS as err:
            raise UserError(f"{key}: cannot load '{name_or_path}' as a sequence classifier "
                            f"({model_load_problem(err, name_or_path)})") from err
        if info["missing_keys"]:
            raise UserError(f"{key}: '{name_or_path}' is not a sequence classifier: its checkpoint "
                            f"has no classification head (missing {sorted(info['missing_keys'])[0]})")
        self.model.to(device).eval()
        self.section = section
        self.label = self._label_index(label, name_or_path)
        self.output, self.input, self.append_eos, self.chat_template = output, input, append_eos, chat_template
        if chat_template and input != "prompt+response":
            raise UserError(f"{section}.chat_template: true reads prompt and response as one conversation; expected "
                            f"{section}.input: prompt+response, got {input}")
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{section}.chat_template: true, but the tokenizer of '{name_or_path}' has no chat "
                            "template; expected a reward model trained on conversations, or chat_template: false")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    def _label_index(self, label: int | str | None, name_or_path: str) -> int:
        names = {int(i): str(name) for i, name in self.model.config.id2label.items()}
        n = self.model.config.num_labels
        if label is None:
            if n != 1:
                raise UserError(f"{self.section}.label: required for '{name_or_path}', which has {n} labels "
                                f"({', '.join(f'{i}={name}' for i, name in sorted(names.items()))})")
            return 0
        if isinstance(label, int) and 0 <= label < n:
            return label
        by_name = {name: i for i, name in names.items()}
        if isinstance(label, str) and label in by_name:
            return by_name[label]
        raise UserError(f"{self.section}.label: '{label}' is not a label of '{name_or_path}' "
                        f"(labels: {', '.join(f'{i}={name}' for i, name in sorted(names.items()))})")

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str], **columns) -> list[float]:
        """One score per response. A prompt is text, or a message list (trl's conversational format)."""
        empty = [i for i, r in enumerate(responses) if not r.strip()]
        if empty and self.input == "response":
            raise UserError(f"{self.section}: response {empty[0]} (of {len(responses)}) is empty, and a classifier "
                            f"cannot score empty text; set ppo.min_new_tokens >= 1 or {self.section}.input: "
                            "prompt+response")
        firsts = None if self.input != "pair" else [prompt_text(p) for p in prompts]
        if self.chat_template:
            texts = [self.tokenizer.apply_chat_template(conversation(p, r), tokenize=False)
                     for p, r in zip(prompts, responses)]
        elif self.input == "prompt+response":
            texts = [prompt_text(p) + r for p, r in zip(prompts, responses)]
        else:
            texts = list(responses)
        if self.append_eos:  # trl's RewardTrainer trains on text + EOS and reads the score there
            texts = [t + self.tokenizer.eos_token for t in texts]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            end = start + self.batch_size
            # input: pair encodes (prompt, response) as a sentence pair, as cross-encoder reward models expect.
            args = (texts[start:end],) if firsts is None else (firsts[start:end], texts[start:end])
            batch = self.tokenizer(*args, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            scores.extend(label_score(self.model(**batch).logits.float(), self.label, self.output).tolist())
        return scores


def prompt_text(prompt) -> str:
    """A prompt as text: itself, or its messages' contents joined by newlines."""
    return prompt if isinstance(prompt, str) else "\n".join(message["content"] for message in prompt)


def conversation(prompt, response: str) -> list[dict]:
    """The messages of ``prompt`` (a user message if it is text) followed by ``response`` as the assistant's."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": response}]


def label_score(logits: torch.Tensor, label: int, output: str) -> torch.Tensor:
    """[B] score of ``label`` from classifier logits [B, num_labels]: the logit, its probability or its
    log-probability (softmax over labels, or a sigmoid when there is one label)."""
    if output == "logit":
        return logits[:, label]
    if logits.shape[1] == 1:
        log_prob = F.logsigmoid(logits[:, 0])
    else:
        log_prob = logits.log_softmax(dim=-1)[:, label]
    return log_prob if output == "log_prob" else log_prob.exp()
