import pytest
import torch

import zoptim


def regression(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
    x = torch.randn(w[0].numel(), 40, generator=g, dtype=torch.float64)
    y = torch.randn(shape[0], 40, generator=g, dtype=torch.float64)
    return w, lambda: ((w.view(shape[0], -1) @ x - y) ** 2).mean()


@pytest.mark.parametrize("ortho", ["newton_schulz", "svd"])
@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (16, 3, 3, 3)])
def test_update_is_orthogonal_inside_the_subspace(ortho, shape):
    w, loss = regression(shape)
    lr, rank = 0.1, 8
    opt = zoptim.ZOMuon([w], lr=lr, rank=rank, directions=4, ortho=ortho, seed=0)
    before = w.detach().clone()
    opt.step(loss)
    delta = ((before - w.detach()) / lr).view(shape[0], -1)
    p = opt.state[w]["P"]
    assert p.shape == (shape[0], rank)
    torch.testing.assert_close(p.T @ p, torch.eye(rank, dtype=p.dtype), atol=1e-10, rtol=0)
    inside = p.T @ delta
    torch.testing.assert_close(p @ inside, delta, atol=1e-9, rtol=0)  # nothing outside span(P)
    sv = torch.linalg.svdvals(inside)
    assert len(sv) == rank
    if ortho == "svd":
        torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-5, rtol=0)
    else:  # the quintic iteration leaves singular values in about [0.68, 1.14]
        assert float(sv.min()) > 0.6 and float(sv.max()) < 1.2


def test_subspace_is_redrawn_on_schedule():
    w, loss = regression((20, 30))
    opt = zoptim.ZOMuon([w], lr=0.01, rank=4, resample_every=3, seed=0)
    drawn = []
    for _ in range(7):
        opt.step(loss)
        drawn.append(opt.state[w]["P"].clone())
    assert torch.equal(drawn[0], drawn[2]) and torch.equal(drawn[3], drawn[5])
    assert not torch.equal(drawn[2], drawn[3]) and not torch.equal(drawn[5], drawn[6])


def test_vectors_take_dense_steps_at_their_own_rate():
    layer = torch.nn.Linear(12, 10)
    x, y = torch.randn(64, 12), torch.randn(64, 10)
    loss = lambda: ((layer(x) - y) ** 2).mean()  # noqa: E731
    frozen = zoptim.ZOMuon(layer.parameters(), lr=0.05, rank=4, vector_lr=0.0, seed=0)
    bias = layer.bias.detach().clone()
    weight = layer.weight.detach().clone()
    for _ in range(3):
        frozen.step(loss)
    assert torch.equal(layer.bias, bias) and not torch.equal(layer.weight, weight)
    assert frozen.queries == 3 * 5
    moving = zoptim.ZOMuon(layer.parameters(), lr=0.05, rank=4, vector_lr=1e-3, seed=0)
    moving.step(loss)
    assert not torch.equal(layer.bias, bias)
    kinds = sorted(g["matrix"] for g in moving.param_groups)
    assert kinds == [False, True]


def test_rank_is_capped_by_the_matrix():
    w, loss = regression((5, 30))
    opt = zoptim.ZOMuon([w], lr=0.01, rank=64, seed=0)
    opt.step(loss)
    assert opt.state[w]["P"].shape == (5, 5)


def test_learning_rate_zero_freezes_a_group():
    w, loss = regression((16, 24))
    v, _ = regression((16, 24), seed=1)
    opt = zoptim.ZOMuon([{"params": [w]}, {"params": [v], "lr": 0.0}], lr=0.05, rank=4, seed=0)
    before_w, before_v = w.detach().clone(), v.detach().clone()
    for _ in range(4):
        opt.step(loss)
    assert torch.equal(v, before_v)  # never perturbed, never updated
    assert not torch.equal(w, before_w)
    assert "P" not in opt.state[v]


def test_groups_added_later_are_split_too():
    layer = torch.nn.Linear(6, 4)
    opt = zoptim.ZOMuon([torch.nn.Parameter(torch.randn(5, 7))], lr=0.01, rank=2, vector_lr=0.5)
    opt.add_param_group({"params": layer.parameters(), "lr": 0.02})
    added = opt.param_groups[1:]
    assert [(g["matrix"], g["lr"]) for g in added] == [(True, 0.02), (False, 0.5)]
    x = torch.randn(8, 6)
    opt.step(lambda: layer(x).pow(2).mean())
    assert opt.state[layer.weight]["P"].shape == (4, 2)


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (3, 2, 2)])
@pytest.mark.parametrize("ortho", ["newton_schulz", "svd"])
def test_orthogonalizing_a_stack_equals_one_by_one(ortho, shape):
    from zoptim.parts.transforms import Orthogonalize, StateStack

    g = torch.Generator().manual_seed(0)
    stack = torch.randn(5, *shape, generator=g)
    t = Orthogonalize(ortho)
    together = t.stacked(stack.clone(), StateStack([{} for _ in range(5)]))
    assert together.shape == stack.shape
    for g_, out in zip(stack, together):
        torch.testing.assert_close(out, t(g_.clone(), {}), rtol=1e-5, atol=1e-6)
