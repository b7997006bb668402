"""Adam-preconditioned influence: score with the direction Adam would step in, not the raw gradient.

Adam moves a parameter by about -η m̂ / (√v̂ + ε), not -η g. To first order, one step on sample i changes the
target f by η ⟨∇f, P ∇L_i⟩ with P = diag(1 / (√v̂ + ε)) from the optimiser's bias-corrected second moments
v̂ = v / (1 - β₂^t). P is diagonal, so ⟨∇L_val, P ∇L_i⟩ = ⟨P ∇L_val, ∇L_i⟩: applying P once to the target keeps
the per-sample cost of scoring unchanged.

Before the first optimiser step Adam has no second moments; `adam_preconditioner` then returns None and the
round is scored with plain gradients (P = I), the only direction known at that point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llm_iif.core.distributed import whole_tensor
from llm_iif.core.errors import UserError

Preconditioner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def check_second_moments(optimizer: torch.optim.Optimizer, key: str = "iif.precondition") -> None:
    """`UserError` naming ``key`` unless ``optimizer`` keeps Adam's second moments (Adam, AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimiser
    if not all("betas" in group for group in inner.param_groups):
        raise UserError(f"{key}: adam needs an optimiser with second moments (Adam, AdamW); "
                        f"got {type(inner).__name__}")


def adam_preconditioner(optimizer: torch.optim.Optimizer, parameters: dict[str, nn.Parameter]
                        ) -> Preconditioner | None:
    """The map target -> P ⊙ target for the named ``parameters`` [name: tensor of the parameter's shape, or
    K targets stacked as [K, *shape]], with P from ``optimizer``'s current state; None before its first step."""
    inner = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    scales = {}
    for name, param in parameters.items():
        state = inner.state.get(param, {})
        if "exp_avg_sq" not in state:
            return None
        group = group_of[id(param)]
        step = float(state["step"])
        second_moment = whole_tensor(state["exp_avg_sq"])  # FSDP2 keeps this process's shard; the target is whole
        v_hat = second_moment.float() / (1.0 - group["betas"][1] ** step)
        scales[name] = 1.0 / (v_hat.sqrt() + group["eps"])

    def precondition(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor * scales[name].to(tensor) for name, tensor in target.items()}

    return precondition
