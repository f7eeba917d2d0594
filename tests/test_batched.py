"""Batched queries: a step's evaluations on one stacked batch, perturbations on activations."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import zoptim
from zoptim.engine.evaluators.batched import per_slice, stack

LOW_RANK = [(zoptim.ZOMuon, dict(rank=4, directions=3)), (zoptim.SubspaceMeZO, dict(rank=4)),
            (zoptim.LOZO, dict(rank=2)), (zoptim.SubZero, dict(rank=2)),
            (zoptim.EGGROLL, dict(rank=2, members=6))]


class Net(torch.nn.Module):
    """Token and position embeddings (the latter shared by the batch, shape (1, T, d)), two
    linear layers with biases and a layer norm."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = torch.nn.Embedding(50, 16)
        self.positions = torch.nn.Embedding(8, 16)
        self.hidden = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.out = torch.nn.Linear(32, 3)
        self.to(dtype)

    def forward(self, ids):
        pos = self.positions(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.out(self.norm(torch.tanh(self.hidden(self.tokens(ids) + pos)))).mean(1)


def make_closure(net, seen=None, calls=None):
    ids = torch.randint(0, 50, (8, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))

    def closure(slices=None):
        if seen is not None:
            seen.append([p.detach().clone() for p in net.parameters()])
        if calls is not None:
            calls.append(slices)
        if slices is None:
            return F.cross_entropy(net(ids).float(), y)
        losses = F.cross_entropy(net(stack(ids, slices)).float(), stack(y, slices),
                                 reduction="none")
        return per_slice(losses, slices)

    return closure


def reset(net, snapshot):
    with torch.no_grad():
        for p, s in zip(net.parameters(), snapshot):
            p.copy_(s)


@pytest.mark.parametrize("linear", ["materialized", "corrected"])
@pytest.mark.parametrize("cls,settings", LOW_RANK, ids=lambda v: getattr(v, "__name__", ""))
def test_batched_steps_match_in_place_steps(cls, settings, linear, monkeypatch):
    # a linear layer's perturbed slices through their own weights, or its output corrected
    monkeypatch.setattr(zoptim.engine.evaluators.batched, "_materializes",
                        lambda mod, x, slices: linear == "materialized")
    net = Net()
    closure = make_closure(net)
    start = [p.detach().clone() for p in net.parameters()]
    runs = {}
    for batched in (False, True):
        reset(net, start)
        # eps 1e-2: the float32 losses' last-bit differences, divided by eps, stay below 1e-5
        opt = cls(net.parameters(), lr=1e-2, eps=1e-2, seed=3, model=net, batched=batched,
                  **settings)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="batched queries")
            for _ in range(3):
                opt.step(closure)
        assert (opt.batched is not None) == batched
        runs[batched] = (opt.last_values, [p.detach().clone() for p in net.parameters()])
    (v0, p0), (v1, p1) = runs[False], runs[True]
    assert v0 == pytest.approx(v1, abs=1e-5)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(start, p1))  # the steps moved


@pytest.mark.parametrize("norm", ["without bias", "frozen gain"])
def test_layer_norms_with_a_missing_or_frozen_parameter_match_in_place(norm):
    net = Net()
    if norm == "without bias":
        net.norm = torch.nn.LayerNorm(32, bias=False)
        groups = [{"params": list(net.parameters())}]
    else:
        rest = [p for p in net.parameters() if p is not net.norm.weight]
        groups = [{"params": rest}, {"params": [net.norm.weight], "lr": 0.0}]
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)  # not all ones, so a gain that stays is seen
    closure = make_closure(net)
    start = [p.detach().clone() for p in net.parameters()]
    values = {}
    for batched in (False, True):
        reset(net, start)
        opt = zoptim.ZOMuon(groups, lr=1e-2, eps=1e-2, rank=4, directions=3, seed=5, model=net,
                            batched=batched)
        for _ in range(2):
            opt.step(closure)
        assert (opt.batched is not None) == batched
        values[batched] = opt.last_values
    assert values[False] == pytest.approx(values[True], abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batched_evaluation_never_writes_the_parameters(dtype):
    net = Net(dtype)
    seen = []
    closure = make_closure(net, seen)
    opt = zoptim.ZOMuon(net.parameters(), lr=1e-2, rank=4, directions=3, seed=0, model=net)
    for _ in range(4):
        before = [p.detach().clone() for p in net.parameters()]
        state = copy.deepcopy(opt.state_dict())
        seen.clear()
        opt.step(closure)
        assert len(seen) == 1  # one forward pass for the baseline and the three queries
        assert all(torch.equal(a, b) for a, b in zip(seen[0], before))
    # and the update is the only write: redoing the last step from its values, without
    # evaluating anything, gives the same bits
    after = [p.detach().clone() for p in net.parameters()]
    reset(net, before)
    replayed = zoptim.ZOMuon(net.parameters(), lr=1e-2, rank=4, directions=3, model=net)
    replayed.load_state_dict(state)
    replayed.step(replay=opt.last_values)
    assert all(torch.equal(a, b) for a, b in zip(after, net.parameters()))


def test_in_place_probing_does_write_the_parameters_in_half_precision():
    """What batched mode avoids: in place, evaluations see shifted weights and a probe's
    round trip W + d - d is not W in fp16."""
    net = Net(torch.float16)
    seen = []
    opt = zoptim.ZOMuon(net.parameters(), lr=1e-2, rank=4, directions=3, seed=0, vector_lr=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step(make_closure(net, seen))
    assert len(seen) == 4 and any(not torch.equal(a, b) for a, b in zip(seen[1], before))


@pytest.mark.parametrize("cls, settings, chunks", [
    (zoptim.ZOMuon, dict(rank=4, directions=4), [5, 2, 2, 1]),
    (zoptim.EGGROLL, dict(rank=2, members=5, antithetic=False), [5, 2, 2, 1])],
    ids=["zo-muon", "eggroll"])
def test_max_slices_splits_the_stack_into_micro_batches(cls, settings, chunks):
    net = Net()
    sizes = []
    closure = make_closure(net, calls=sizes)
    start = [p.detach().clone() for p in net.parameters()]
    whole = cls(net.parameters(), lr=1e-2, seed=0, model=net, **settings)
    whole.step(closure)
    after = [p.detach().clone() for p in net.parameters()]
    reset(net, start)
    split = cls(net.parameters(), lr=1e-2, seed=0, model=net, max_slices=2, **settings)
    split.step(closure)
    assert sizes == chunks
    assert whole.last_values == pytest.approx(split.last_values, abs=1e-6)
    for a, b in zip(after, net.parameters()):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)


def test_an_unsupported_layer_falls_back_to_in_place_and_says_so():
    class Scaled(Net):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(3, 3))  # owned by a module with children

        def forward(self, ids):
            return super().forward(ids) @ self.gain

    net = Scaled()
    calls = []
    closure = make_closure(net, calls=calls)
    opt = zoptim.ZOMuon(net.parameters(), lr=1e-2, rank=2, directions=2, seed=0, model=net)
    with pytest.warns(UserWarning, match=r"gain .*cannot be perturbed through activations"):
        opt.step(closure)
    assert opt.batched is None and calls == [None, None, None]


def test_a_closure_that_ignores_the_slices_gets_a_clear_error():
    net = Net()
    base = make_closure(net)
    opt = zoptim.ZOMuon(net.parameters(), lr=1e-2, rank=4, directions=2, seed=0, model=net)
    with pytest.raises(ValueError, match="one loss per slice|stack"):
        opt.step(lambda slices=None: base(None))


def test_batched_mode_needs_the_model():
    with pytest.raises(ValueError, match="pass model="):
        zoptim.ZOMuon(Net().parameters(), batched=True)


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_zoptim_train_runs_a_real_transformer_with_batched_queries(scheme):
    from zoptim.runs import config
    from zoptim.runs.run import build, step_loss

    from conftest import MR_PATH

    cfg = config.build({"task": {"train": 16, "dev": 8, "test": 8, "path": MR_PATH},
                        "model": {"scheme": scheme, "max_length": 32},
                        "method": {"name": "zo-muon",
                                   "settings": {"lr": 1e-2, "rank": 4, "directions": 2}}})
    run = build(cfg)
    examples = run.splits.train[:4]
    start = {n: p.detach().clone() for n, p in run.params.items()}
    values = {}
    for batched in (True, False):
        with torch.no_grad():
            for n, p in run.params.items():
                p.copy_(start[n])
        opt = type(run.opt)(list(run.params.values()), seed=0, model=run.clf, batched=batched,
                            **cfg.method.settings)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="batched queries")
            opt.step(step_loss(run, examples))
        values[batched] = opt.last_values
    assert run.opt.batched is not None  # on by default in zoptim train
    assert values[True] == pytest.approx(values[False], abs=1e-5)
