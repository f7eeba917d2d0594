"""Each estimator's mean over many steps equals the gradient of a quadratic (the Gaussian-smoothed
gradient equals the gradient there) times the scale its space implies, within 5 standard errors."""

import pytest
import torch

import zoptim
from zoptim.engine.optimizer import ZOOptimizer
from zoptim.parts import estimators

M, N, SAMPLES = 6, 5, 3000


class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        a = torch.randn(M * N, M * N, generator=g, dtype=torch.float64)
        self.register_buffer("q", a @ a.T / (M * N) + torch.eye(M * N, dtype=torch.float64))
        self.register_buffer("b", torch.randn(M * N, generator=g, dtype=torch.float64))
        self.x = torch.nn.Parameter(torch.randn(M, N, generator=g, dtype=torch.float64))

    def forward(self):
        v = self.x.view(-1)
        return 0.5 * v @ self.q @ v + self.b @ v

    def grad(self):
        return (self.q @ self.x.detach().view(-1) + self.b).view(M, N)


class OneSided(ZOOptimizer):
    def __init__(self, params, lr, eps, directions):
        super().__init__(params, dict(lr=lr, eps=eps), estimators.OneSided(directions), seed=3)


def sparse_mask(x, sparsity):
    flat = x.abs().flatten()
    k = int(torch.tensor((1 - sparsity) * flat.numel()).ceil())
    return (x.abs() <= flat.kthvalue(k).values).double()


CASES = {
    # name: (factory, expected mean as a function of (grad, x0))
    "mezo": (lambda ps, m: zoptim.MeZO(ps, lr=1.0, eps=1e-3, seed=1), lambda g, x: g),
    "mezo-rademacher": (lambda ps, m: zoptim.MeZO(ps, lr=1.0, noise="rademacher", seed=1),
                        lambda g, x: g),
    "mezo-3-queries": (lambda ps, m: zoptim.MeZO(ps, lr=1.0, directions=3, seed=1), lambda g, x: g),
    "one-sided-3-queries": (lambda ps, m: OneSided(ps, lr=1.0, eps=1e-3, directions=3),
                            lambda g, x: g),
    "hizoo": (lambda ps, m: zoptim.HiZOO(ps, lr=1.0, smoothing=0.0, seed=1), lambda g, x: g),
    "forward-gradient": (lambda ps, m: zoptim.ForwardGradient(ps, model=m, lr=1.0, seed=1),
                         lambda g, x: g),
    "sparse-mezo": (lambda ps, m: zoptim.SparseMeZO(ps, lr=1.0, sparsity=0.5, seed=1),
                    lambda g, x: g * sparse_mask(x, 0.5)),
    "subspace-mezo": (lambda ps, m: zoptim.SubspaceMeZO(ps, lr=1.0, rank=3, resample_every=1,
                                                        seed=1), lambda g, x: g * 3 / M),
    "lozo": (lambda ps, m: zoptim.LOZO(ps, lr=1.0, rank=2, resample_every=1, seed=1),
             lambda g, x: g * 2),
    "subzero": (lambda ps, m: zoptim.SubZero(ps, lr=1.0, rank=3, resample_every=1, seed=1),
                lambda g, x: g),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_is_unbiased_for_its_space(name):
    factory, expected = CASES[name]
    model = Quadratic()
    x0 = model.x.detach().clone()
    target = expected(model.grad(), x0).view(-1)
    opt = factory([model.x], model)
    samples = torch.empty(SAMPLES, M * N, dtype=torch.float64)
    for i in range(SAMPLES):
        model.x.data.copy_(x0)
        opt.step(model)
        samples[i] = (x0 - model.x.detach()).view(-1)  # lr = 1: the step is the estimate
    mean, se = samples.mean(0), samples.std(0) / SAMPLES**0.5
    z = (mean - target).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 5.0, f"max z-score {float(z.max()):.2f}"
    # The test has power: twice the target is far outside the tolerance.
    assert float(((mean - 2 * target).abs() / se.clamp_min(1e-12)).max()) > 5.0
