"""A sequence-classification model (e.g. one trained with trl's RewardTrainer) as a reward model.

It reads prompt + response with its own tokenizer, so it need not share the policy's vocabulary.
One logit is the score; with two labels the score is logit[1] - logit[0].
"""

from __future__ import annotations

import torch


class HFClassifierReward:
    def __init__(self, name_or_path: str | None, batch_size: int = 32, device="cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from llm_iif.errors import UserError

        if not name_or_path:
            raise UserError("reward.name_or_path: required for reward.name 'hf-classifier'")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(device).eval()
        except OSError as err:
            raise UserError(f"reward.name_or_path: cannot load '{name_or_path}' "
                            f"(not a local model directory, and not reachable on the hub)") from err
        if self.model.config.num_labels not in (1, 2):
            raise UserError(f"reward.name_or_path: '{name_or_path}' has {self.model.config.num_labels} labels; "
                            "expected 1 (a score) or 2 (negative, positive)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
        texts = [p + r for p, r in zip(prompts, responses)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits.float()
            score = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            scores.extend(score.tolist())
        return scores
