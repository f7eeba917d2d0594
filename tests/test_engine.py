"""The step engine: a step's operator calls do not grow with depth, evaluators combine by one
table, and a skipped step (a redraw included) leaves parameters and state as they were."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import zoptim
from zoptim.engine.evaluators import EngineError, choose
from zoptim.parts.estimators import Central
from zoptim.parts.spaces import LowRank, Projected
from zoptim.parts.transforms import Adam, Momentum, newton_schulz


class Deep(torch.nn.Module):
    """``layers`` blocks of a linear layer and a layer norm: four tensors a block."""

    def __init__(self, layers: int, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))
            for _ in range(layers))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def closure_of(model):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 16, generator=g), torch.randint(0, 3, (4,), generator=g)

    def closure(slices=None):
        if slices is None:
            return F.cross_entropy(model(x), y)
        losses = F.cross_entropy(model(zoptim.stack(x, slices)), zoptim.stack(y, slices),
                                 reduction="none")
        return zoptim.per_slice(losses, slices)

    return closure


def top_level_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def extra_calls(layers: int, batched: bool) -> int:
    """Top-level calls of a ZO-Muon step beyond those of the forward passes it evaluates."""
    model = Deep(layers)
    closure = closure_of(model)
    opt = zoptim.ZOMuon(model.parameters(), lr=1e-2, rank=4, directions=3, seed=0,
                        vector_lr=1e-3, model=model if batched else None, batched=batched)
    with torch.no_grad():
        for _ in range(2):
            opt.step(closure)
        step = top_level_calls(lambda: opt.step(closure))
        forwards = top_level_calls((lambda: closure(4)) if batched else
                                   (lambda: [closure() for _ in range(4)]))
    return step - forwards


@pytest.mark.parametrize("batched", [False, True], ids=["in place", "batched"])
def test_a_steps_operator_calls_grow_by_a_few_per_added_block(batched):
    # Per added block (two tensors a matrix and two vectors): in place, one write per
    # matrix per move (4 moves and the update); batched, the linear layer's and the layer
    # norm's few extra calls and one write per matrix. Walking tensor by tensor (draws,
    # lifts, Newton-Schulz and writes per tensor) cost 10 to 50 times more.
    per_block = (extra_calls(8, batched) - extra_calls(2, batched)) / 6
    assert per_block <= (8 if not batched else 16), per_block


@pytest.mark.parametrize("batched", [False, True], ids=["in place", "batched"])
def test_foreach_writes_equal_tensor_by_tensor_writes(batched):
    results = []
    for foreach in (False, True):
        model = Deep(3)
        opt = zoptim.ZOMuon(model.parameters(), lr=1e-2, rank=4, directions=3, seed=2,
                            vector_lr=1e-3, foreach=foreach,
                            model=model if batched else None, batched=batched)
        for _ in range(3):
            opt.step(closure_of(model))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_table_refuses_what_does_not_combine():
    from zoptim.engine.evaluators.offload import Offload, OffloadError

    class TwoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    model = TwoBlocks()
    opt = zoptim.MeZO(model.parameters(), lr=1e-3)
    offload = Offload(model, device="cpu")
    with pytest.raises(EngineError, match="offloading and distributed training cannot be"):
        choose(opt, offload=offload, parallel=object())
    forward = zoptim.ForwardGradient(model.parameters(), model=model)
    with pytest.raises(OffloadError, match="forward-mode derivatives"):
        offload.attach(forward)
    with pytest.raises(RuntimeError, match="forward-mode derivatives; it has no ask/tell"):
        forward.ask()


def test_a_skipped_first_step_leaves_no_state_behind():
    # the first step draws every set's factors; skipped, they are all taken back
    model = Deep(2)
    closure = closure_of(model)
    opt = zoptim.ZOMuon(model.parameters(), lr=1e-2, rank=2, directions=2, seed=0)
    opt.step(lambda: closure() * float("nan"))
    assert all(not opt.state[p] for p in model.parameters())
    opt.step(closure)
    assert opt.last_skip is None and opt.state[model.head.weight]["factor_epoch"] == 0


def test_a_closure_that_raises_leaves_parameters_and_state_as_they_were():
    model = Deep(2)
    closure = closure_of(model)
    opt = zoptim.ZOMuon(model.parameters(), lr=1e-2, rank=2, directions=3, seed=0,
                        batched=False)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return closure()

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)
    assert all(not opt.state[p] for p in model.parameters()) and opt.steps == 0


def test_a_model_moved_to_another_dtype_keeps_stepping():
    model = Deep(2)
    opt = zoptim.SubspaceMeZO(model.parameters(), lr=1e-3, rank=2, seed=0)
    opt.step(closure_of(model))
    model.double()
    x = torch.randn(4, 16, dtype=torch.float64)
    opt.step(lambda: F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)))
    assert opt.state[model.head.weight]["P"].dtype == torch.float64


def test_a_skipped_redraw_step_leaves_factors_and_momentum_as_they_were():
    model = Deep(2)
    closure = closure_of(model)
    opt = zoptim.LOZO(model.parameters(), lr=1e-3, rank=2, resample_every=2, momentum=0.9,
                      seed=0)
    for _ in range(2):
        opt.step(closure)
    weight = model.blocks[0][0].weight
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[weight].items()}
    params = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: closure() * float("nan"))  # step 2 redraws V, and is skipped
    assert opt.last_skip == "non-finite loss"
    for k, v in state.items():
        now = opt.state[weight][k]
        assert torch.equal(now, v) if torch.is_tensor(v) else now == v, k
    for a, b in zip(params, model.parameters()):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)  # probes undone
    opt.step(closure)  # and the redraw happens on the next step
    assert opt.state[weight]["factor_epoch"] == 1


def test_zo_muons_momentum_is_carried_into_the_new_subspace_when_p_is_redrawn():
    model = Deep(1)
    closure = closure_of(model)
    opt = zoptim.ZOMuon(model.parameters(), lr=1e-3, rank=2, resample_every=2, momentum=0.9,
                        seed=0)
    weight = model.blocks[0][0].weight
    for _ in range(2):
        opt.step(closure)
    old_p = opt.state[weight]["P"].clone()
    old_m = opt.state[weight]["momentum_buffer"].clone()
    assert float(old_m.norm()) > 0
    before = weight.detach().clone()
    opt.step(lambda: closure().detach() * 0 + 1.0)  # step 2 redraws P; a flat loss: G = 0
    new_p = opt.state[weight]["P"]
    assert not torch.equal(new_p, old_p)
    carried = 0.9 * new_p.mT @ (old_p @ old_m)
    torch.testing.assert_close(opt.state[weight]["momentum_buffer"], carried)
    # and the step is the carried average, orthogonalized, in the new subspace
    moved = weight.detach() - before
    expected = -1e-3 * new_p @ newton_schulz(carried)
    torch.testing.assert_close(moved, expected, atol=1e-6, rtol=1e-3)


def test_adam_restarts_its_moments_when_the_factors_are_redrawn():
    model = Deep(1)
    closure = closure_of(model)
    lr = 1e-3
    opt = zoptim.Composed(model.parameters(), Central(1), lr=lr, seed=0,
                          space=lambda g: Projected(2, 3), transforms=[Adam()])
    weight = model.blocks[0][0].weight
    for _ in range(3):
        opt.step(closure)
    assert opt.state[weight]["adam_step"] == 3
    before = weight.detach().clone()
    opt.step(closure)  # step 3 redraws P: Adam starts again, as on its first step
    assert opt.state[weight]["adam_step"] == 1
    g = opt.state[weight]["exp_avg"] / 0.1  # (1 - beta1) g after one step
    torch.testing.assert_close(opt.state[weight]["exp_avg_sq"], 0.001 * g * g)
    # a first step of Adam moves each coordinate by about lr: |P X| = |X| <= lr sqrt(r n)
    assert float((weight.detach() - before).norm()) <= lr * (2 * 16) ** 0.5 * 1.01


def test_lozos_perturbation_is_rank_times_dense_noise():
    # the learning-rate note of LOZO's docstring: E|U V^T|^2 = r m n, unscaled
    space, m, n, r = LowRank(4, 1), 12, 10, 4
    norms = []
    for key in range(300):
        v = space.draw([key], m, n, r, torch.float64, "cpu")["V"]
        u = torch.randn(1, m, r, dtype=torch.float64, generator=torch.Generator().manual_seed(key))
        a, b, s = space.lift({"V": v}, u)
        norms.append(float((s * a @ b).square().sum()))
    assert sum(norms) / len(norms) == pytest.approx(r * m * n, rel=0.1)


def test_momentum_state_is_one_stack_whose_rows_are_the_tensors_state():
    model = Deep(3)
    opt = zoptim.Composed(model.parameters(), Central(1), lr=1e-3, seed=0,
                          space=lambda g: Projected(2, 50), transforms=[Momentum(0.9)])
    opt.step(closure_of(model))
    bufs = [opt.state[b[0].weight]["momentum_buffer"] for b in model.blocks]
    assert bufs[0]._base is not None and all(b._base is bufs[0]._base for b in bufs)
    # a loaded state is stacked again and continues as the original would
    twin = Deep(3)
    twin.load_state_dict(model.state_dict())
    again = zoptim.Composed(twin.parameters(), Central(1), lr=1e-3, seed=0,
                            space=lambda g: Projected(2, 50), transforms=[Momentum(0.9)])
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict aliases tensors
    opt.step(closure_of(model))
    again.step(closure_of(twin))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
