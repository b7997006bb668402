"""Independent references for the pieces every exactness test builds on: the target token weights, written out
by hand on a small mask, and the response log-probs, from an explicit log_softmax over a hand-built batch. A
flipped sign, a wrong last-token index or an off-by-one position fails these, where a test that feeds the
code's own rows to both sides would not."""

import pytest
import torch

from llm_iif.core.tokens import at_response_positions, response_logprobs
from llm_iif.lm.iif import target_token_weights

# Two responses: the first 3 tokens long, the second 2 (right-padded to 4).
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
ADVANTAGES = torch.tensor([[0.5, -1.0, 2.0, 9.0], [3.0, -4.0, 9.0, 9.0]])  # 9: padding, never read
REWARDS = torch.tensor([1.5, -0.5])


@pytest.mark.parametrize("target,expected", [
    # seq: every token of a response carries the advantage at its last token (where the reward lands)
    ("seq", [[2.0, 2.0, 2.0, 0.0], [-4.0, -4.0, 0.0, 0.0]]),
    # return: each token its own advantage
    ("return", [[0.5, -1.0, 2.0, 0.0], [3.0, -4.0, 0.0, 0.0]]),
    # reward: every token the response's (whitened) reward
    ("reward", [[1.5, 1.5, 1.5, 0.0], [-0.5, -0.5, 0.0, 0.0]]),
    # gold: the plain log-likelihood of the reference responses
    ("gold", [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
])
def test_target_token_weights_by_hand(target, expected):
    weights = target_token_weights(target, ADVANTAGES, REWARDS, MASK)
    assert weights.tolist() == expected


def test_response_logprobs_against_an_explicit_log_softmax():
    """Prompt of 2 tokens, response of 3: the logits at position P-1+t predict response token t."""
    torch.manual_seed(0)
    vocab, prompt_len, response = 5, 2, torch.tensor([[3, 1, 4], [0, 2, 2]])
    logits = torch.randn(2, prompt_len + 3, vocab)
    temperature = 0.7
    expected = torch.empty(2, 3)
    for b in range(2):
        for t in range(3):
            position = prompt_len - 1 + t  # the last prompt token predicts the first response token
            expected[b, t] = torch.log_softmax(logits[b, position] / temperature, dim=-1)[response[b, t]]
    assert torch.allclose(response_logprobs(logits, response, temperature), expected, atol=1e-6)
    assert torch.equal(at_response_positions(logits, 3), logits[:, 1:4])
