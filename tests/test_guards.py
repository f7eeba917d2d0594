import math

import pytest
import torch

import zoptim
from zoptim.runs.guard import LossGuard


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
    assert "above 10 x the highest recent" in guard.decide([8.0, 9.0, 9.5])
    assert guard.decide([0.7, 6.0, 6.5]) is None
    assert guard.decide([math.nan]) == "non-finite loss"
    assert LossGuard(spike=0.0, window=8, history=[0.7] * 8).decide([1e9]) is None


def test_one_blown_up_query_is_not_a_spike():
    # the step's level is its median: one bad direction among good ones decides nothing
    guard = LossGuard(spike=10.0, window=8, history=[0.7] * 8, first=0.7)
    assert guard.decide([0.7, 0.71, 0.69, 0.7, 40.0]) is None


def test_late_in_an_easy_task_a_hard_batch_is_not_a_spike():
    guard = LossGuard(spike=10.0, window=20)
    guard.observe([0.69, 0.7], None)  # the first step: the loss of an untrained head
    for _ in range(30):
        guard.observe([0.02, 0.021], None)  # easy batches, late in training
    assert guard.decide([0.55, 0.6, 0.58]) is None  # a hard batch, 25 times the median
    assert guard.decide([50.0, 60.0, 55.0]) is not None  # a diverged model


def test_replay_follows_the_recorded_decision_and_keeps_the_guard():
    x, f = quadratic()
    opt = zoptim.MeZO([x], lr=1e-2, seed=0)
    guard = opt.guard
    before = x.detach().clone()
    opt.step(replay=[1.0, 2.0], skip="recorded skip")
    assert opt.guard is guard and opt.last_skip == "recorded skip"
    torch.testing.assert_close(x.detach(), before, atol=1e-6, rtol=0)  # probes undone only
    opt.step(replay=[float("nan"), 2.0], skip=None)  # recorded as applied: applied
    assert opt.last_skip is None and torch.isnan(x).all()


def test_a_run_stops_after_consecutive_failures_with_its_last_good_state_saved(tmp_path,
                                                                               monkeypatch):
    import json

    from safetensors.torch import load_file

    from conftest import MR_PATH
    from zoptim.runs import config
    from zoptim.integrations.classifier import PromptClassifier
    from zoptim.runs.run import Diverged, train

    sets = ["task.train=16", "task.dev=8", "task.test=8", f"task.path={json.dumps(MR_PATH)}",
            "batch_size=4", "eval_batch_size=8", "model.scheme=\"lora\"", "model.max_length=32",
            "method.name=\"mezo\"", "method.settings={lr = 1e-3, eps = 1e-2}", "save_every=100",
            "guard.max_consecutive=2"]
    quiet = dict(progress=False, log=lambda *_: None)
    train(config.load(None, sets + ["steps=3"]), tmp_path / "good", **quiet)

    real_loss, calls = PromptClassifier.loss, []

    def failing(self, examples, slices=None):
        calls.append(1)
        loss = real_loss(self, examples, slices)
        return loss * float("nan") if len(calls) > 6 else loss  # steps 0-2 are fine (2 each)

    monkeypatch.setattr(PromptClassifier, "loss", failing)
    with pytest.raises(Diverged, match="stopped after 2 skipped steps in a row"):
        train(config.load(None, sets + ["steps=10"]), tmp_path / "bad", **quiet)
    good = load_file(str(tmp_path / "good" / "checkpoint-3" / "trainable.safetensors"))
    saved = load_file(str(tmp_path / "bad" / "checkpoint-5" / "trainable.safetensors"))
    assert all(torch.equal(saved[k], good[k]) for k in good)  # skipped steps rewound exactly
    lines = [json.loads(ln) for ln in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert [ln.get("skipped") for ln in lines] == [None, None, None, "non-finite loss",
                                                   "non-finite loss"]
