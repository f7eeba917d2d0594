"""Ranking and comparison oracles, and ask/tell: the objective answers outside the step."""

import copy
import json
import math

import pytest
import torch

import zoptim

STEPS = 3


def quadratic(dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(dim, generator=g)
    x = torch.nn.Parameter(torch.zeros(dim))
    return x, target, (lambda: float(((x - target) ** 2).sum()))


def small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(16, 5)
    y = torch.randint(0, 2, (16,))
    return net, (lambda: float(torch.nn.functional.cross_entropy(net(x), y)))


FORMS = {
    "mezo": lambda ps: zoptim.MeZO(ps, lr=1e-2, directions=2, seed=1),
    "zo-rank-sgd": lambda ps: zoptim.ZORankSGD(ps, lr=1e-2, candidates=5, seed=1),
    "zo-comparison": lambda ps: zoptim.ZOComparison(ps, lr=1e-2, pairs=2, seed=1),
    "zo-muon": lambda ps: zoptim.ZOMuon(ps, lr=1e-2, rank=2, directions=3, seed=1, batched=False),
    "hizoo": lambda ps: zoptim.HiZOO(ps, lr=1e-2, seed=1),
}


@pytest.mark.parametrize("method", FORMS)
def test_ask_tell_equals_the_closure_form(method):
    net_a, loss_a = small_net()
    net_b = copy.deepcopy(net_a)
    net_c = copy.deepcopy(net_a)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(4))

    def loss(net):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(net(x), y))

    opt_a = FORMS[method](list(net_a.parameters()))
    opt_b = FORMS[method](list(net_b.parameters()))
    opt_c = FORMS[method](list(net_c.parameters()))
    for _ in range(STEPS):
        opt_a.step(lambda: loss(net_a))
        # ask, put the model at each candidate, tell the values
        points = opt_b.ask()
        values = [loss(net_b) for _ in opt_b.candidates()]
        assert len(values) == len(points)
        opt_b.tell(values)
        # ask and tell values found elsewhere (no candidate visited here)
        opt_c.ask()
        opt_c.tell(list(opt_a.last_values))
        assert opt_b.last_values == opt_a.last_values
    for a, b, c in zip(net_a.parameters(), net_b.parameters(), net_c.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert opt_a.queries == opt_b.queries == opt_c.queries


def test_rank_sgd_descends_from_rankings_alone():
    x, target, f = quadratic()
    opt = zoptim.ZORankSGD([x], lr=0.05, eps=0.1, candidates=4, seed=0)
    start = f()
    for _ in range(150):
        opt.ask()
        seen = [f() for _ in opt.candidates()]  # the oracle's private values
        ranking = sorted(range(len(seen)), key=seen.__getitem__)
        opt.tell(ranking=ranking)  # only the order reaches the optimizer
    assert f() < 0.2 * start


def test_comparison_oracle_descends_from_comparisons_alone():
    x, target, f = quadratic()
    opt = zoptim.ZOComparison([x], lr=0.03, eps=0.1, pairs=2, seed=0)
    start = f()
    for _ in range(150):
        opt.ask()
        seen = [f() for _ in opt.candidates()]
        opt.tell(better=[0 if seen[i] <= seen[i + 1] else 1 for i in range(0, len(seen), 2)])
    assert f() < 0.2 * start


def test_rank_weights_follow_the_paper():
    """A full ranking weights z_k by (2 r_k - m + 1) / (m (m - 1) / 2)."""
    x = torch.nn.Parameter(torch.zeros(6))
    opt = zoptim.ZORankSGD([x], lr=1.0, eps=1.0, candidates=3, seed=0)
    points = opt.ask()
    opt.tell(ranking=[2, 0, 1])  # candidate 2 best, then 0, then 1
    places = {2: 0, 0: 1, 1: 2}
    expect = torch.zeros(6)
    for k, (seed, _) in enumerate(points):
        z = zoptim.noise.noise(zoptim.noise.mix(seed, 0), (6,))
        expect -= (2 * places[k] - 3 + 1) / 3 * z  # lr 1; m (m - 1) / 2 = 3 pairs
    torch.testing.assert_close(x.detach(), expect, rtol=1e-5, atol=1e-6)


def test_bad_answers_are_refused_and_leave_the_step_open():
    x, _, f = quadratic()
    opt = zoptim.ZORankSGD([x], lr=0.1, candidates=3, seed=0)
    opt.ask()
    with pytest.raises(ValueError, match="order all 3"):
        opt.tell(ranking=[0, 0, 1])
    with pytest.raises(ValueError, match="one of"):
        opt.tell()
    with pytest.raises(ValueError, match="3 candidates"):
        opt.tell([1.0, 2.0])
    with pytest.raises(RuntimeError, match="tell"):
        opt.step(f)
    opt.tell(ranking=[1, 0, 2])
    with pytest.raises(RuntimeError, match="ask"):
        opt.tell([1.0, 2.0, 3.0])


def test_methods_without_an_ask_tell_form_say_so():
    net, _ = small_net()
    with pytest.raises(RuntimeError, match="after its update"):
        zoptim.ZOSGDConservative(net.parameters()).ask()
    with pytest.raises(RuntimeError, match="batched=False"):
        zoptim.ZOMuon(net.parameters(), rank=2, model=net).ask()


def scripted_person(target, answers_log):
    """Reads the prompt's colours and ranks them by distance to the colour it wants; its
    first answer is malformed, as a person's might be."""
    import re

    def ask(prompt):
        answers_log.append(prompt)
        if len(answers_log) == 1:
            return "0 0 banana"
        shown = [tuple(int(v) for v in m) for m in
                 re.findall(r"rgb\((\d+), (\d+), (\d+)\)", prompt)]
        dist = [sum((a - b) ** 2 for a, b in zip(c, target)) for c in shown]
        return " ".join(str(i) for i in sorted(range(len(shown)), key=dist.__getitem__))

    return ask


def test_interactive_ranking_steers_towards_the_persons_colour(tmp_path, monkeypatch, capsys):
    from zoptim.cli import main

    target = (230, 40, 60)
    prompts = []
    monkeypatch.setattr("builtins.input", scripted_person(target, prompts))
    state = tmp_path / "session.json"
    assert main(["rank", "--rounds", "25", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "please give each index" in out  # the malformed answer was asked again
    first = json.loads(state.read_text())
    assert first["rounds"] == 25
    # a second run continues from the saved session
    assert main(["rank", "--rounds", "25", "--state", str(state)]) == 0
    assert "continuing from round 25" in capsys.readouterr().out
    final = colour_of(json.loads(state.read_text())["x"])
    start = (128, 128, 128)
    dist = lambda c: sum((a - b) ** 2 for a, b in zip(c, target)) ** 0.5  # noqa: E731
    assert dist(final) < 0.35 * dist(start)


def test_interactive_ranking_without_answers_fails_cleanly(tmp_path, monkeypatch, capsys):
    from zoptim.cli import main

    def no_more(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_more)
    assert main(["rank", "--rounds", "2"]) == 2
    assert "no answer" in capsys.readouterr().err


def colour_of(x):
    return tuple(round(255 / (1 + math.exp(-v))) for v in x)
