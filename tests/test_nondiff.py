"""Networks and objectives without a useful gradient, trained from forward passes alone on
scikit-learn's digits (chance: 0.10). Each threshold sits about 0.08 below the accuracy one
seed measured (noted beside it)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoptim
from zoptim.integrations.nondiff import (
    HardThreshold,
    Int8Linear,
    SpikingLIF,
    Staircase,
    error_rate,
    one_minus_macro_f1,
)

BUDGET = 6000


def net(kind):
    torch.manual_seed(0)
    if kind == "hard-threshold":
        return nn.Sequential(nn.Linear(64, 64), HardThreshold(), nn.Linear(64, 10))
    if kind == "int8":
        return nn.Sequential(Int8Linear(64, 32), nn.Tanh(), Int8Linear(32, 10))
    if kind == "spiking":
        return nn.Sequential(nn.Linear(64, 64), SpikingLIF(), nn.Linear(64, 10))
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def train(model, opt, xs, ys, objective, batch=128):
    while opt.queries < BUDGET:
        g = torch.Generator().manual_seed(opt.steps)
        idx = torch.randint(0, len(xs), (batch,), generator=g)
        xb, yb = xs[idx], ys[idx]
        opt.step(lambda: objective(model(xb), yb))
    return model


def accuracy(model, xs, ys):
    with torch.no_grad():
        return float((model(xs).argmax(1) == ys).float().mean())


@pytest.mark.parametrize("kind", ["hard-threshold", "int8"])
def test_backpropagation_gives_no_signal(kind, digits):
    xtr, ytr, _, _ = digits
    model = net(kind)
    F.cross_entropy(model(xtr[:64]), ytr[:64]).backward()
    first = model[0].weight.grad
    if kind == "hard-threshold":  # the graph does not reach the first layer; the last gets one
        assert first is None and float(model[2].weight.grad.abs().max()) > 0
    else:  # rounding: zero except at the one weight that sets the layer's scale
        for layer in (model[0], model[2]):
            assert int((layer.weight.grad != 0).sum()) <= 1


CASES = {  # (network, method, objective, eps, lr, stated accuracy; measured)
    "hard-threshold, mezo": ("hard-threshold", zoptim.MeZO, F.cross_entropy, 5e-2, 1e-2,
                             0.75),  # 0.835
    "hard-threshold, rank": ("hard-threshold", zoptim.ZORankSGD, F.cross_entropy, 5e-2, 1e-2,
                             0.70),  # 0.798
    "int8, mezo": ("int8", zoptim.MeZO, F.cross_entropy, 1e-2, 1e-2, 0.83),  # 0.911
    "spiking, mezo": ("spiking", zoptim.MeZO, F.cross_entropy, 1e-2, 1e-2, 0.80),  # 0.881
    "error rate, rank": ("mlp", zoptim.ZORankSGD, error_rate, 5e-2, 1e-2, 0.74),  # 0.817
    "1 - macro F1, rank": ("mlp", zoptim.ZORankSGD, one_minus_macro_f1, 5e-2, 1e-2, 0.78),  # 0.861
}


@pytest.mark.parametrize("case", CASES)
def test_zeroth_order_trains_without_gradients(case, digits):
    kind, cls, objective, eps, lr, target = CASES[case]
    xtr, ytr, xte, yte = digits
    model = net(kind)
    opt = cls(list(model.parameters()), lr=lr, eps=eps, seed=1)
    batch = 256 if objective is not F.cross_entropy else 128
    train(model, opt, xtr, ytr, objective, batch=batch)
    acc = accuracy(model, xte, yte)
    assert acc >= target, f"{case}: test accuracy {acc:.3f}"


def test_layers_compute_what_they_say():
    x = torch.tensor([-1.0, 0.0, 0.3, 0.7, 2.0])
    assert HardThreshold()(x).tolist() == [0, 0, 1, 1, 1]
    assert Staircase(4)(x).tolist() == [0, 0, 0.25, 0.5, 1.0]
    rate = SpikingLIF(beta=1.0, steps=4)(torch.tensor([0.5, 1.0, 0.0]))
    assert rate.tolist() == [0.5, 1.0, 0.0]
    layer = Int8Linear(4, 2)
    w = layer.weight.detach()
    assert len(torch.unique(torch.round(zoptim.integrations.nondiff._int8(w) / (w.abs().max() / 127)))) <= 8
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert float(error_rate(logits, torch.tensor([0, 0, 0]))) == pytest.approx(1 / 3)
    assert float(one_minus_macro_f1(logits, torch.tensor([0, 1, 0]))) == 0.0


def polystep_run(steps, opt=None, model=None, xs=None, ys=None, start=0):
    from zoptim.methods.polystep import PolyStep

    model = model or nn.Sequential(nn.Linear(64, 32), HardThreshold(), nn.Linear(32, 10))
    opt = opt or PolyStep(list(model.parameters()), model=model, rank=2, temperature=0.1,
                          step_radius=2.0, probe_radius=1.0, seed=0)
    for s in range(start, start + steps):
        idx = torch.randint(0, len(xs), (256,), generator=torch.Generator().manual_seed(s))
        xb, yb = xs[idx], ys[idx]
        opt.step(lambda: F.cross_entropy(model(xb), yb))
    return model, opt


def test_polystep_trains_a_hard_threshold_mlp(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model, opt = polystep_run(100, xs=xtr, ys=ytr)
    # measured 0.846 after 100 steps (64,000 queries: 40 blocks x 16 vertices a step)
    assert accuracy(model, xte, yte) >= 0.76
    assert opt.queries == 100 * 40 * 16


def test_polystep_resumes_from_its_state_dict(digits):
    import copy

    from zoptim.methods.polystep import PolyStep

    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model, opt = polystep_run(3, xs=xtr, ys=ytr)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    polystep_run(2, opt=opt, model=model, xs=xtr, ys=ytr, start=3)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(64, 32), HardThreshold(), nn.Linear(32, 10))
    other.load_state_dict(saved_model)
    opt2 = PolyStep(list(other.parameters()), model=other, rank=2, temperature=0.1,
                    step_radius=2.0, probe_radius=1.0, seed=99)
    opt2.load_state_dict(saved_opt)
    polystep_run(2, opt=opt2, model=other, xs=xtr, ys=ytr, start=3)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_polystep_refuses_bad_settings():
    from zoptim.methods.polystep import PolyStep

    model = net("mlp")
    with pytest.raises(ValueError, match="temperature"):
        PolyStep(model.parameters(), model=model, temperature=0)
    with pytest.raises(ValueError, match="belong to the model"):
        PolyStep([nn.Parameter(torch.zeros(3))], model=model)


def test_nondiff_benchmark_runs(tmp_path):
    import json

    from zoptim.bench import nondiff

    out = tmp_path / "nondiff.json"
    assert nondiff.main(["--queries", "200", "--polystep-queries", "640", "--methods",
                         "mezo,polystep", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["mezo", "polystep", "adamw (surrogate gradients)"]
    assert rows[0]["int8"]["queries"] == 200 and rows[1]["tanh"]["queries"] == 640
    # the surrogate-gradient ceiling learns in 200 steps where chance is 0.10
    assert all(rows[2][k]["test_accuracy"] > 0.5 for k in nondiff.NETWORKS)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def test_deepzero_trains_a_cnn_from_scratch(digits):
    from zoptim.methods.deepzero import DeepZero

    xtr, ytr, xte, yte = (t.view(-1, 1, 8, 8) if t.dim() == 2 else t for t in digits)
    model = small_cnn()
    opt = DeepZero(model, F.cross_entropy, lr=0.05, sparsity=0.5, seed=0)
    for s in range(150):
        idx = torch.randint(0, len(xtr), (128,), generator=torch.Generator().manual_seed(s))
        opt.step(xtr[idx], ytr[idx])
    # measured 0.904 after 150 steps (142,630 queries, each a partial forward pass)
    assert accuracy(model, xte, yte) >= 0.82
    # the prior keeps about half the coordinates, layer by layer
    sizes = [p.numel() for p in model.parameters()]
    kept = sum(d * n for d, n in zip(opt.density, sizes)) / sum(sizes)
    assert 0.45 <= kept <= 0.6


def test_feature_reuse_equals_a_full_forward(digits):
    from zoptim.methods.deepzero import DeepZero

    xtr, ytr = digits[0][:32].view(-1, 1, 8, 8), digits[1][:32]
    model = small_cnn()
    opt = DeepZero(model, F.cross_entropy, seed=0)
    with torch.no_grad():
        feats = opt._features(xtr)
        layer3 = model[3].weight.view(-1)
        layer3[5] += 0.01
        reused = opt._loss_from(3, feats, ytr)
        full = float(F.cross_entropy(model(xtr), ytr))
    assert reused == full


def test_forward_parallelism_equals_one_query_at_a_time(digits):
    """``parallel`` coordinate queries in one vectorized forward give the estimates of the
    one-by-one loop (up to rounding), with the same query count."""
    from zoptim.methods.deepzero import DeepZero

    x, y = digits[0][:64].view(-1, 1, 8, 8), digits[1][:64]
    runs = []
    for parallel in (1, 16):
        model = small_cnn()
        opt = DeepZero(model, F.cross_entropy, lr=0.05, sparsity=0.5, parallel=parallel, seed=3)
        for _ in range(2):
            opt.step(x, y)
        runs.append((opt, [p.detach().clone() for p in model.parameters()]))
    (one, p1), (many, p16) = runs
    assert one.queries == many.queries and one.density == many.density
    # A coordinate's estimate divides the forward's rounding (about 1e-7 of the loss, which
    # differs between a batched and a single convolution) by mu: lr * 1e-7 * loss / mu a step.
    for a, b in zip(p1, p16):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="parallel=0"):
        DeepZero(small_cnn(), F.cross_entropy, parallel=0)


def test_deepzero_needs_a_sequential_model():
    from zoptim.methods.deepzero import DeepZero

    with pytest.raises(ValueError, match="nn.Sequential"):
        DeepZero(nn.Linear(3, 3), F.cross_entropy)


def test_zo_grasp_keeps_the_scores_of_largest_magnitude_as_deepzero_does():
    # DeepZero's code prunes by |-theta * Hg| (L1Unstructured on the scores): a layer whose
    # scores are large and negative keeps them, one whose scores are near zero loses them
    from zoptim.methods.deepzero import layer_densities

    strong_negative = -torch.linspace(1.0, 2.0, 10)
    weak = torch.linspace(0.0, 0.1, 10)
    dense, sparse = layer_densities([strong_negative, weak], sparsity=0.5)
    assert dense == 1.0 and sparse == pytest.approx(0.1)
