"""The parts compose: a method assembled by hand equals its named twin, transforms act as
documented (partial orthogonalization among them), HiZOO's Hessian estimate follows its
formula, FZOO's and evolution strategies' normalized steps follow theirs, per-group settings
apply."""

import pytest
import torch

import zoptim
from zoptim.parts.estimators import Central
from zoptim.noise import mix, noise
from zoptim.parts.transforms import Adam, ClipNorm, Momentum, PartialOrthogonalize


def convex(seed=0, n=30):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.randn(n, generator=g))
    a = torch.rand(n, generator=g) + 0.5
    return x, a, (lambda: 0.5 * (a * x**2).sum())


def test_composed_central_sgd_is_mezo_bit_for_bit():
    x1, _, f1 = convex()
    x2, _, f2 = convex()
    mezo = zoptim.MeZO([x1], lr=1e-2, seed=4)
    composed = zoptim.Composed([x2], Central(1), lr=1e-2, seed=4)
    for _ in range(5):
        assert mezo.step(f1) == composed.step(f2)
    assert torch.equal(x1, x2)


def test_clip_norm_bounds_every_update():
    x, _, f = convex(n=200)
    lr, cap = 0.1, 0.05
    opt = zoptim.Composed([x], Central(1), lr=lr, eps=1e-3, transforms=[ClipNorm(cap)], seed=0)
    for _ in range(10):
        before = x.detach().clone()
        opt.step(f)
        # float32 restore rounding (~1e-7 per entry) blurs the measured step slightly
        assert float((x.detach() - before).norm()) <= lr * cap * (1 + 1e-3)


def test_momentum_and_adam_match_torch_optimizers_on_the_same_estimates():
    # Feed torch.optim the estimates a plain ZO-SGD step reveals (lr = 1, so step = -g) and
    # compare with zoptim's transforms fed the same seeds.
    for transform, reference in [(Momentum(0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                                 (Adam(), lambda p: torch.optim.Adam(p, lr=0.01))]:
        x, _, f = convex()
        probe_x, _, probe_f = convex()
        ref_x = torch.nn.Parameter(x.detach().clone())
        opt = zoptim.Composed([x], Central(1), lr=0.01, transforms=[transform], seed=7)
        probe = zoptim.Composed([probe_x], Central(1), lr=1.0, seed=7)
        ref = reference([ref_x])
        for _ in range(6):
            start = x.detach().clone()
            probe_x.data.copy_(start)
            ref_x.data.copy_(start)
            probe.step(probe_f)
            ref_x.grad = start - probe_x.detach()
            ref.step()
            opt.step(f)
            torch.testing.assert_close(x.detach(), ref_x.detach(), rtol=1e-4, atol=1e-6)


def test_hizoo_hessian_follows_its_update_rule():
    x, a, f = convex(n=12)
    eps, alpha, seed = 1e-2, 0.5, 3
    opt = zoptim.HiZOO([x], lr=1e-9, eps=eps, smoothing=alpha, seed=seed)
    opt.step(f)
    z = noise(mix(mix(mix(seed, 0), 0), 0), x.shape)
    # f(x + eps z) + f(x - eps z) - 2 f(x) = eps^2 sum(a z^2) for this quadratic (H = 1).
    curvature = float((a * z * z).sum()) / 2
    expected = (1 - alpha) + alpha * curvature * z * z
    torch.testing.assert_close(opt.state[x]["hessian"], expected, rtol=1e-3, atol=1e-4)


def test_per_group_settings_apply_to_their_group():
    x, _, fx = convex(0)
    y, _, fy = convex(1)
    opt = zoptim.MeZO([{"params": [x], "lr": 1e-2}, {"params": [y], "lr": 1e-3, "noise": "rademacher"}],
                      lr=5e-2, seed=0)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    y0 = y.detach().clone()
    opt.step(lambda: fx() + fy())
    moved = y.detach() - y0
    # Rademacher steps move every entry by the same magnitude.
    torch.testing.assert_close(moved.abs(), moved.abs()[0].expand_as(moved), rtol=1e-3, atol=1e-7)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-4})
    assert opt.param_groups[-1]["eps"] == 1e-3


def _with_spectrum(values, r=6, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.mT


def test_partial_orthogonalization_keeps_k_directions_and_converges_to_the_svd_truncation():
    m = _with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    u, _, vh = torch.linalg.svd(m)
    truncation = u[:, :3] @ vh[:3]  # the top 3 directions, each at singular value 1
    po = PartialOrthogonalize(3)
    state = {}
    out = po(m, state)  # the first step starts from the exact top-3 vectors
    torch.testing.assert_close(out, truncation)
    # from an arbitrary start, the warm-started sweeps converge to the same
    g = torch.Generator().manual_seed(1)
    state["power_v"] = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64)).Q
    first = po(m, state)
    assert not torch.allclose(first, truncation, atol=1e-3)
    singular = torch.linalg.svdvals(first)
    assert int((singular > 1e-9).sum()) == 3  # exactly k nonzero, the rest dropped
    for _ in range(60):
        out = po(m, state)
    torch.testing.assert_close(out, truncation, atol=1e-8, rtol=0)
    # k beyond the matrix's rank is capped by it, and a zero estimate gives a zero step
    assert torch.linalg.matrix_rank(PartialOrthogonalize(50)(m, {})) == 6
    zero = {}
    for _ in range(2):  # the SVD start, then a sweep
        assert torch.equal(PartialOrthogonalize(3)(torch.zeros(6, 10), zero), torch.zeros(6, 10))


def test_fzoos_step_ignores_the_losss_scale_and_offset():
    steps = []
    for scale, offset in ((1.0, 0.0), (1000.0, -7.0)):
        x, _, f = convex()
        opt = zoptim.FZOO([x], lr=1e-2, directions=4, seed=3)
        for _ in range(5):
            opt.step(lambda: scale * f() + offset)
        steps.append(x.detach().clone())
    torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-3)  # float32 losses
    # and with the spread of the perturbed losses zero it does not move
    x = torch.nn.Parameter(torch.ones(5))
    before = x.detach().clone()
    zoptim.FZOO([x], lr=1.0, seed=0).step(lambda: torch.tensor(2.0))
    torch.testing.assert_close(x.detach(), before, atol=1e-6, rtol=0)  # probes undone


@pytest.mark.parametrize("antithetic, rank_transform", [(False, False), (True, False),
                                                        (False, True)])
def test_an_es_step_is_the_normalized_average_of_its_members_directions(antithetic,
                                                                         rank_transform):
    x, _, _ = convex()
    start = x.detach().clone()
    lr, eps = 0.1, 0.01
    opt = zoptim.ES([x], lr=lr, eps=eps, members=4, antithetic=antithetic,
                    rank_transform=rank_transform, seed=2)
    given = [3.0, -1.0, 0.5, 10.0]  # the members' values, whatever the objective
    seen = []

    def closure():
        seen.append((x.detach() - start) / eps)  # the member's direction
        return torch.tensor(given[len(seen) - 1])

    opt.step(closure)
    assert len(seen) == 4
    if antithetic:
        torch.testing.assert_close(seen[1], -seen[0], atol=1e-4, rtol=0)
    values = torch.tensor(given)
    if rank_transform:
        values = values.argsort().argsort().float() / 3 - 0.5
    scores = (values - values.mean()) / (values.std(unbiased=False) + 1e-8)
    step = -lr * sum(s * z for s, z in zip(scores, seen)) / 4
    torch.testing.assert_close(x.detach() - start, step, atol=1e-5, rtol=1e-4)


def test_es_ranks_share_ties_and_equal_values_take_no_step():
    from zoptim.parts.estimators import centred_ranks

    assert centred_ranks([0.1, 1.1, 0.1, 0.0]) == [0.0, 0.5, 0.0, -0.5]
    for antithetic, rank_transform in ((False, True), (True, True), (False, False)):
        x, _, _ = convex()
        start = x.detach().clone()
        opt = zoptim.ES([x], lr=1.0, eps=0.01, members=4, antithetic=antithetic,
                        rank_transform=rank_transform, seed=0)
        opt.step(lambda: torch.tensor(0.1))  # every member scores the same
        torch.testing.assert_close(x.detach(), start, atol=1e-6, rtol=0)  # probes undone


def test_es_refuses_an_odd_population_of_mirrored_pairs():
    x, _, _ = convex()
    with pytest.raises(ValueError, match="antithetic pairs need an even"):
        zoptim.ES([x], members=5, antithetic=True)
    with pytest.raises(ValueError, match="members"):
        zoptim.ES([x], members=1)


@pytest.mark.parametrize("foreach", [False, True])
def test_an_eggroll_step_is_the_average_of_its_members_rank_r_directions(foreach):
    """The members' perturbations are eps * A_n B_n^T / sqrt(r) of rank r (seen from inside
    the closure), paired +-, and the step, assembled from the factors side by side, is
    -lr * mean_n z_n E_n as for dense ES."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(9, 7, generator=g))
    b = torch.nn.Parameter(torch.randn(7, generator=g))
    start = [w.detach().clone(), b.detach().clone()]
    lr, eps, rank = 0.1, 0.01, 2
    opt = zoptim.EGGROLL([w, b], lr=lr, eps=eps, rank=rank, members=6, seed=4, foreach=foreach)
    given = [3.0, -1.0, 0.5, 10.0, 2.0, 2.5]
    seen = []

    def closure():
        seen.append([(p.detach() - s) / eps for p, s in zip((w, b), start)])
        return torch.tensor(given[len(seen) - 1])

    opt.step(closure)
    assert len(seen) == 6
    for n in range(6):
        direction = seen[n][0].double()
        assert torch.linalg.matrix_rank(direction, atol=1e-3) == rank
        if n % 2:
            torch.testing.assert_close(seen[n][0], -seen[n - 1][0], atol=1e-4, rtol=0)
    # E|E_n|^2 = m n: unit entries on average, as dense noise (a loose check of 1 / sqrt(r))
    mean_square = torch.stack([s[0] for s in seen[::2]]).pow(2).mean()
    assert 0.2 < float(mean_square) < 5
    values = torch.tensor(given)
    scores = (values - values.mean()) / (values.std(unbiased=False) + 1e-8)
    for i, p in enumerate((w, b)):
        step = -lr * sum(z * s[i] for z, s in zip(scores, seen)) / 6
        torch.testing.assert_close(p.detach() - start[i], step, atol=1e-4, rtol=1e-3)


def test_eggroll_refuses_transforms_on_its_matrices():
    from zoptim.engine.plan import PopulationSet, Slot, StepPlan
    from zoptim.parts.spaces import Bilinear
    from zoptim.parts.transforms import Momentum

    w = torch.zeros(4, 3)
    slot = Slot(w, 0, {"lr": 1.0, "eps": 1.0, "weight_decay": 0.0}, Bilinear(2), [Momentum(0.9)])
    with pytest.raises(ValueError, match="take no transforms"):
        StepPlan.build([slot], {w: {}})
    plan = StepPlan.build([Slot(w, 0, slot.group, Bilinear(2), [])], {w: {}})
    assert isinstance(plan.sets[0], PopulationSet)


def test_per_prompt_normalization_scores_each_example_across_the_members():
    """ES's per_prompt option: each example's values z-scored across the members, a member's
    fitness the mean of its examples' scores, then normalized as usual; the closure's
    per-example values are recorded and replay the step bit for bit."""
    from zoptim.parts.estimators import per_example_scores

    table = [[1.0, 5.0, 0.0], [3.0, 5.0, 1.0], [2.0, 5.0, 5.0]]
    by_hand = []
    for row in table:
        total = 0.0
        for b in range(3):
            column = [r[b] for r in table]
            mean = sum(column) / 3
            std = (sum((v - mean) ** 2 for v in column) / 3) ** 0.5
            total += (row[b] - mean) / (std + 1e-8)  # the constant column adds 0
        by_hand.append(total / 3)
    assert per_example_scores(table) == pytest.approx(by_hand)

    x, _, _ = convex()
    start = x.detach().clone()
    lr, eps = 0.1, 0.01
    seen, calls = [], []

    def closure(per_example=False):
        calls.append(per_example)
        seen.append((x.detach() - start) / eps)
        given = torch.tensor(table[len(seen) - 1])
        return given if per_example else given.mean()

    opt = zoptim.ES([x], lr=lr, eps=eps, members=3, per_prompt=True, seed=2)
    opt.step(closure)
    assert calls == [True] * 3 and len(opt.last_values) == 9 and opt.queries == 3
    scores = torch.tensor(by_hand)
    scores = (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-8)
    step = -lr * sum(s * z for s, z in zip(scores, seen)) / 3
    torch.testing.assert_close(x.detach() - start, step, atol=1e-5, rtol=1e-4)
    after = x.detach().clone()
    with torch.no_grad():
        x.copy_(start)
    again = zoptim.ES([x], lr=lr, eps=eps, members=3, per_prompt=True, seed=2)
    again.step(replay=opt.last_values)
    assert torch.equal(x.detach(), after)
