"""Per-token quantities of responses, from a causal LM's full-sequence outputs.

A sequence is a left-padded prompt of P tokens followed by a right-padded response of T tokens; the output
at position P-1+t predicts response token t.
"""

from __future__ import annotations

import torch


def response_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(y_t | x, y_<t) [B, T] from full-sequence logits [B, P+T, V].

    Logits at position P-1+t predict response token t. They are divided by the sampling temperature, so
    the ratio is taken under the distribution that actually sampled the tokens.
    """
    # Imported here: trl takes seconds to import, which a process that never scores tokens (a bad recipe, a
    # classic run) should not pay.
    from trl.trainer.utils import selective_log_softmax

    response_len = response_ids.shape[1]
    return selective_log_softmax(at_response_positions(logits, response_len) / temperature, response_ids)


def at_response_positions(full: torch.Tensor, response_len: int) -> torch.Tensor:
    """The [B, T, ...] slice of a [B, P+T, ...] tensor whose position predicts each response token."""
    return full[:, -response_len - 1:-1]

