"""A method's step as a direction, measured: what one step of an optimizer would do to the
weights, per unit of its learning rate, and the loss along that direction.

Both the estimator-fidelity benchmark (``bench.fidelity``) and the learning-rate calibration
(``runs.calibration``) read a method this way, from outside: whatever its estimator, space and
transforms, a step moves the weights by ``-lr * d``, and ``d`` is what it believes is uphill.
"""

from __future__ import annotations

from typing import Callable

import torch


def group_rates(opt, params: list[torch.Tensor]) -> list[float]:
    """The learning rate each of ``params`` is stepped with: its parameter group's (0 for a
    tensor the optimizer does not hold)."""
    rate = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}
    return [rate.get(id(p), 0.0) for p in params]


@torch.no_grad()
def update_direction(opt, closure: Callable, params: list[torch.Tensor],
                     origin: list[torch.Tensor]) -> list[torch.Tensor]:
    """``d`` with one step of ``opt`` on ``closure`` moving each tensor by ``-lr_g * d``,
    ``lr_g`` the rate of its parameter group (a frozen group's tensors: ``d = 0``). Taken with
    every rate set to 1, so that ``d`` keeps float32's precision whatever the rates.
    ``params`` must be at ``origin`` and are put back there; the optimizer's counters and
    state advance, so use a throwaway optimizer."""
    rates = [g["lr"] for g in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 1.0 if group["lr"] != 0 else 0.0
    try:
        opt.step(closure)
        return torch._foreach_sub(origin, [p.detach() for p in params])
    finally:
        for group, lr in zip(opt.param_groups, rates):
            group["lr"] = lr
        torch._foreach_copy_(params, origin)


@torch.no_grad()
def losses_along(loss: Callable[[], float], params: list[torch.Tensor],
                 origin: list[torch.Tensor], direction: list[torch.Tensor],
                 steps: list[float]) -> list[float]:
    """``loss()`` at ``origin - step * direction`` for each step size; the weights are put
    back at ``origin``."""
    out = []
    try:
        for step in steps:
            torch._foreach_copy_(params, origin)
            torch._foreach_add_(params, direction, alpha=-step)
            out.append(float(loss()))
    finally:
        torch._foreach_copy_(params, origin)
    return out
