"""Networks and objectives without a useful gradient, which zeroth-order methods train as they
are: backpropagation through them gives zero (or undefined) gradients almost everywhere.

Layers:

- ``HardThreshold``: the Heaviside step, ``1[x > 0]``.
- ``Staircase``: ``floor(x * levels) / levels``, a quantized activation.
- ``Int8Linear``: a linear layer whose weights and inputs are rounded to int8 (symmetric,
  one scale per tensor) in every forward pass; the float weights are the ones optimized.
- ``SpikingLIF``: leaky integrate-and-fire neurons with a hard threshold, run for ``steps``
  time steps on a constant input; the output is the spike rate.

Objectives (lower is better): ``error_rate`` and ``one_minus_macro_f1`` of logits against
labels, to optimize a metric directly.

Each layer has a ``surrogate`` switch (``use_surrogates(model)``) for the first-order
baseline: the forward pass is unchanged, and backpropagation goes through a smooth stand-in
(a sigmoid's slope for thresholds and spikes, the identity for rounding: straight-through).
"""

from __future__ import annotations

import torch


def _through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard``'s values with ``soft``'s gradient."""
    return soft + (hard - soft).detach()


def _step(x: torch.Tensor, surrogate: bool) -> torch.Tensor:
    hard = (x > 0).to(x.dtype)
    return _through(hard, torch.sigmoid(4 * x)) if surrogate else hard


class HardThreshold(torch.nn.Module):
    surrogate = False

    def forward(self, x):
        return _step(x, self.surrogate)


class Staircase(torch.nn.Module):
    surrogate = False

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        c = x.clamp(0, 1)
        hard = torch.floor(c * self.levels) / self.levels
        return _through(hard, c) if self.surrogate else hard


def _int8(x: torch.Tensor, surrogate: bool = False) -> torch.Tensor:
    """``x`` rounded to 255 levels of its largest magnitude (symmetric int8), as floats."""
    scale = x.abs().amax().clamp_min(1e-12) / 127
    hard = torch.round(x / scale).clamp(-127, 127) * scale
    return _through(hard, x) if surrogate else hard


class Int8Linear(torch.nn.Linear):
    surrogate = False

    def forward(self, x):
        return torch.nn.functional.linear(_int8(x, self.surrogate),
                                          _int8(self.weight, self.surrogate), self.bias)


class SpikingLIF(torch.nn.Module):
    """Leaky integrate-and-fire: ``v <- beta v + x``; a spike when ``v >= 1``, which then
    subtracts 1 from ``v``. Returns the spike rate over ``steps`` steps."""

    surrogate = False

    def __init__(self, beta: float = 0.9, steps: int = 8):
        super().__init__()
        self.beta, self.steps = beta, steps

    def forward(self, x):
        v = torch.zeros_like(x)
        spikes = torch.zeros_like(x)
        for _ in range(self.steps):
            v = self.beta * v + x
            s = (v >= 1.0).to(x.dtype)
            if self.surrogate:
                s = _through(s, torch.sigmoid(4 * (v - 1.0)))
            v = v - s
            spikes = spikes + s
        return spikes / self.steps


def use_surrogates(model: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Switch every layer of this module's kinds in ``model`` to (or from) its surrogate
    gradient."""
    for m in model.modules():
        if isinstance(m, (HardThreshold, Staircase, Int8Linear, SpikingLIF)):
            m.surrogate = on
    return model


def error_rate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) != labels).float().mean()


def one_minus_macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pred = logits.argmax(-1)
    classes = int(max(labels.max(), pred.max())) + 1
    f1 = []
    for c in range(classes):
        tp = ((pred == c) & (labels == c)).sum().float()
        fp = ((pred == c) & (labels != c)).sum().float()
        fn = ((pred != c) & (labels == c)).sum().float()
        if tp + fp + fn > 0:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return 1 - torch.stack(f1).mean()
