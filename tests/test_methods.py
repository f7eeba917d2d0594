"""Every method learns, is deterministic, restores exactly from its state_dict and counts its
queries."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import mlp
from methods import METHODS, make, per_step, resampling

# Stated accuracy on the digits test split after 6,000 queries (batch 128). With these
# settings the lowest of three seeds measured was (mezo 0.915, rademacher 0.909, momentum
# 0.909, sign 0.841, conservative 0.815, adam 0.906, forward gradient 0.922, sparse 0.513,
# hizoo 0.881, lozo 0.715, lozo-m 0.683, subzero 0.894, subspace-mezo 0.902, zo-muon 0.915,
# zo-muon-svd 0.917, zo-muon-momentum 0.915, zo-mopi 0.922, fzoo 0.863, es 0.924,
# eggroll 0.909, zo-rank-sgd 0.927, zo-comparison 0.917); each threshold sits about 0.05
# below. Chance is 0.10.
DIGITS_TARGET = {
    "mezo": 0.86, "mezo-rademacher": 0.86, "zo-sgd-momentum": 0.86, "zo-sign-sgd": 0.79,
    "zo-sgd-conservative": 0.76, "zo-adam": 0.85, "forward-gradient": 0.87,
    "sparse-mezo": 0.45, "hizoo": 0.83, "lozo": 0.65, "lozo-m": 0.62, "subzero": 0.84,
    "subspace-mezo": 0.85, "zo-muon": 0.86, "zo-muon-svd": 0.86, "zo-rank-sgd": 0.87,
    "zo-comparison": 0.86, "zo-muon-momentum": 0.86, "zo-mopi": 0.87, "fzoo": 0.81,
    "es": 0.87, "eggroll": 0.86,
}
DIGITS_BUDGET = 6000


def digits_closure(model, xs, ys, step, batch=128):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, len(xs), (batch,), generator=g)
    xb, yb = xs[idx], ys[idx]
    return lambda: F.cross_entropy(model(xb), yb)


def test_every_method_is_covered():
    import zoptim

    covered = {type(make(n, mlp())) for n in METHODS}
    # GRZO's closures evaluate per-example points (batched queries): test_grzo covers it
    assert covered == set(zoptim.METHODS.values()) - {zoptim.GRZO}


@pytest.mark.parametrize("name", list(METHODS))
def test_trains_an_mlp_on_digits(name, digits):
    xtr, ytr, xte, yte = digits
    model = mlp()
    opt = make(name, model)
    with torch.no_grad():
        before = float((model(xte).argmax(1) == yte).float().mean())
    while opt.queries < DIGITS_BUDGET:
        opt.step(digits_closure(model, xtr, ytr, opt.steps))
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    assert before < 0.2
    assert acc >= DIGITS_TARGET[name], f"{name}: test accuracy {acc:.3f}"


class Convex(torch.nn.Module):
    """A smooth, strongly convex objective over a matrix and a vector."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 6, generator=g))
        self.b = torch.nn.Parameter(torch.randn(6, generator=g))
        self.register_buffer("tw", torch.randn(8, 6, generator=g))
        self.register_buffer("tb", torch.randn(6, generator=g))
        self.register_buffer("scale", torch.rand(8, 6, generator=g) + 0.5)

    def forward(self):
        return 0.5 * ((self.w - self.tw) ** 2 * self.scale).sum() + 0.5 * ((self.b - self.tb) ** 2).sum()


# LOZO's unscaled rank-4 directions have a larger variance than the others' at equal lr; sign
# steps have a fixed length, so they need a longer one to cover the distance in 400 steps.
CONVEX_LR = {"lozo": 2e-3, "lozo-m": 2e-3, "zo-sign-sgd": 3e-2}
# Sparse-MeZO tunes only entries with |w| <= its first-step threshold, so the part of the
# minimum it can reach is smaller: it must still decrease the objective clearly.
CONVEX_FRACTION = {"sparse-mezo": 0.9}


@pytest.mark.parametrize("name", list(METHODS))
def test_decreases_a_convex_objective(name):
    model = Convex()
    opt = make(name, model, **({"lr": CONVEX_LR[name]} if name in CONVEX_LR else {}))
    with torch.no_grad():
        start = float(model())
        for _ in range(400):
            opt.step(model)
        assert float(model()) < CONVEX_FRACTION.get(name, 0.5) * start


def run(name, steps, seed=1, model=None, opt=None, **kw):
    model = model or mlp(0)
    opt = opt or make(name, model, seed=seed, **kw)
    xs = torch.rand(256, 64, generator=torch.Generator().manual_seed(5))
    ys = torch.arange(256) % 10
    for _ in range(steps):
        opt.step(digits_closure(model, xs, ys, opt.steps, batch=32))
    return model, opt


@pytest.mark.parametrize("name", list(METHODS))
def test_same_seed_same_parameters(name):
    a, _ = run(name, 12)
    b, _ = run(name, 12)
    c, _ = run(name, 12, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("name", list(METHODS))
def test_state_dict_round_trip_continues_bit_identically(name):
    # Resampling every 5 steps puts factor changes on both sides of the checkpoint.
    kw = {"resample_every": 5} if resampling(name) else {}
    model, opt = run(name, 8, **kw)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(name, 9, model=model, opt=opt)

    resumed = mlp(0)
    resumed.load_state_dict(saved_model)
    opt2 = make(name, resumed, seed=99, **kw)  # the seed comes back with the state
    opt2.load_state_dict(saved_opt)
    assert opt2.queries == saved_opt["zo"]["queries"]
    run(name, 9, model=resumed, opt=opt2)
    for pa, pb in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert opt.queries == opt2.queries


@pytest.mark.parametrize("name", list(METHODS))
def test_queries_count_every_evaluation(name):
    calls = []
    model = Convex()
    opt = make(name, model)

    def closure():
        calls.append(1)
        return model()

    for _ in range(3):
        opt.step(closure)
    assert opt.queries == len(calls) == 3 * per_step(name)


@pytest.mark.parametrize("name", list(METHODS))
def test_replaying_recorded_values_reproduces_the_run_bit_for_bit(name):
    kw = {"resample_every": 3} if resampling(name) else {}
    model, opt = mlp(0), None
    opt = make(name, model, **kw)
    xs = torch.rand(64, 64, generator=torch.Generator().manual_seed(5))
    ys = torch.arange(64) % 10
    journal = []
    for _ in range(7):
        opt.step(digits_closure(model, xs, ys, opt.steps, batch=16))
        journal.append(list(opt.last_values))
    replayed = mlp(0)
    opt2 = make(name, replayed, **kw)
    for values in journal:
        opt2.step(replay=values)  # no closure: the model is never run
    for pa, pb in zip(model.parameters(), replayed.parameters()):
        assert torch.equal(pa, pb)
    assert opt2.queries == opt.queries


def test_replaying_values_of_another_method_is_refused():
    model = mlp(0)
    opt = make("zo-muon", model)
    with pytest.raises(ValueError, match="fewer values"):
        opt.step(replay=[0.5, 0.4])  # ZO-Muon evaluates 5 values a step
    opt2 = make("mezo", mlp(0))
    with pytest.raises(ValueError, match="more values"):
        opt2.step(replay=[0.5, 0.4, 0.3, 0.2, 0.1])
