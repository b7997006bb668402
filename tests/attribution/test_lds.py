"""The LDS: exactly 1 on a problem where one SGD step changes the target linearly in the subset."""

import pytest
import torch

from llm_iif.attribution.gradients import LayerGradientCapture
from llm_iif.attribution.lds import (bootstrap_interval, linear_datamodeling_score, random_half_subsets, ranks,
                                     spearman)
from llm_iif.core.errors import UserError


def test_lds_of_an_exactly_linear_problem_is_one():
    """Linear per-sample losses L_i = ⟨a_i, θ⟩ and a linear target f = ⟨b, θ⟩: one SGD step on a subset S changes
    f by -η Σ_{i∈S} ⟨b, a_i⟩, which the hook scores ⟨∇L_val, ∇L_i⟩ = -⟨b, a_i⟩ predict exactly."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(6, 1, bias=False)
    inputs, b = torch.randn(20, 6, generator=generator), torch.randn(6, generator=generator)
    target = {"weight": -b[None, :]}  # ∇L_val with L_val = -f
    with LayerGradientCapture(model, {"weight": model}, target=target) as capture:
        model(inputs).sum().backward()
    scores = capture.scores().detach()
    subsets = random_half_subsets(20, 12, generator)
    start = model.weight.detach().clone()
    actual = []
    for subset in subsets:
        with torch.no_grad():
            model.weight.copy_(start)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.zero_grad()
        model(inputs[subset]).sum().backward()
        optimizer.step()
        actual.append((model.weight.detach() - start).flatten() @ b)
    actual = torch.stack(actual)
    assert linear_datamodeling_score(scores, subsets, actual) == pytest.approx(1.0)
    low, high = bootstrap_interval(scores, subsets, actual, generator, resamples=200)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    assert linear_datamodeling_score(-scores, subsets, actual) == pytest.approx(-1.0)


def test_subsets_are_halves_and_need_two():
    subsets = random_half_subsets(9, 5, torch.Generator().manual_seed(0))
    assert subsets.shape == (5, 9) and (subsets.sum(dim=1) == 4).all()
    with pytest.raises(UserError, match="lds subsets: 1; expected at least 2"):
        random_half_subsets(9, 1, torch.Generator())


def test_ranks_share_ties_and_spearman_matches_its_definition():
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
