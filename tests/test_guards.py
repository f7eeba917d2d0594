import math

import pytest
import torch

import zoptim
from zoptim.train import LossGuard


def quadratic():
    x = torch.nn.Parameter(torch.linspace(-1, 1, 50))
    return x, (lambda: (x**2).sum())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["mezo", "zo-muon", "hizoo", "zo-adam"])
def test_a_non_finite_step_leaves_weights_and_state_untouched(bad, name):
    w = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
    f = lambda: (w**2).sum()  # noqa: E731
    opt = {"mezo": lambda: zoptim.MeZO([w], lr=1e-2), "zo-muon": lambda: zoptim.ZOMuon([w], rank=2),
           "hizoo": lambda: zoptim.HiZOO([w], lr=1e-2), "zo-adam": lambda: zoptim.ZOAdam([w])}[name]()
    opt.step(f)
    before = w.detach().clone()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[w].items()}
    calls = []

    def poisoned():
        calls.append(1)
        return torch.tensor(bad) if len(calls) == 2 else f()

    opt.step(poisoned)
    assert opt.last_skip == "non-finite loss" and opt.skipped == 1
    torch.testing.assert_close(w.detach(), before, atol=1e-6, rtol=0)  # probe undone, no update
    for k, v in state.items():
        assert torch.equal(opt.state[w][k], v) if torch.is_tensor(v) else opt.state[w][k] == v
    opt.step(f)
    assert opt.last_skip is None and not torch.equal(w.detach(), before)


def test_the_guard_can_be_switched_off():
    x, f = quadratic()
    opt = zoptim.MeZO([x], lr=1e-2)
    opt.guard = None
    opt.step(lambda: torch.tensor(float("nan")))
    assert torch.isnan(x).all()


def test_loss_guard_skips_spikes_after_a_history():
    guard = LossGuard(spike=10.0, window=8)
    for v in [0.7, 0.69, 0.71, 0.68, 0.7]:
        assert guard.decide([v, v]) is None
        guard.observe([v, v], None)
    assert "above 10 x median" in guard.decide([0.7, 9.0])
    assert guard.decide([0.7, 6.0]) is None
    assert guard.decide([math.nan]) == "non-finite loss"
    assert LossGuard(spike=0.0, window=8, history=[0.7] * 8).decide([1e9]) is None
