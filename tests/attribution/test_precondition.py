"""Adam-preconditioned scores equal a brute-force ⟨P ∇L_val, ∇L_i⟩ with P from the optimiser's state."""

import pytest
import torch
from torch import nn

from llm_iif.attribution.gradients import scored_parameters
from llm_iif.attribution.influence import influence_scores
from llm_iif.attribution.precondition import adam_preconditioner, check_second_moments
from llm_iif.core.errors import UserError


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def per_sample_loss(x, y):
    def loss(model, rows):
        return nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none")
    return loss


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_preconditioned_scores_equal_brute_force(optimizer_class):
    model = small_model()
    optimizer = optimizer_class(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    params = scored_parameters(model)
    assert adam_preconditioner(optimizer, params) is None  # no second moments before the first step
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    x, y = torch.randn(6, 4, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    target = {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}
    precondition = adam_preconditioner(optimizer, params)
    scores = influence_scores(model, per_sample_loss(x, y), 6, precondition(target), 4, "cpu")

    expected = []
    for i in range(6):
        grads = torch.autograd.grad(per_sample_loss(x, y)(model, torch.tensor([i])).sum(), list(params.values()))
        total = 0.0
        for (name, p), g in zip(params.items(), grads):
            state = optimizer.state[p]
            v_hat = state["exp_avg_sq"] / (1 - 0.95 ** float(state["step"]))
            total += (target[name] / (v_hat.sqrt() + 1e-6) * g).sum()
        expected.append(total)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_an_optimiser_without_second_moments_is_a_one_line_error():
    with pytest.raises(UserError, match="iif.precondition: adam needs an optimiser with second moments .* got SGD"):
        check_second_moments(torch.optim.SGD(small_model().parameters(), lr=0.1))
