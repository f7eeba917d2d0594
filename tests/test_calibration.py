"""lr = "auto": the calibration's measurement, its rule, its record, and runs that use it."""

import json
import math

import pytest
import torch

import zoptim
from zoptim.cli import main
from zoptim.runs import calibration, config
from zoptim.runs.directions import losses_along, update_direction
from zoptim.runs.run import CALIBRATION, Interrupted, RunError, Training, audit, train

from conftest import MR_PATH


def quadratic(dim=40, seed=0):
    """``L = 1/2 x^T A x + b^T x + 3`` in float64, with ``A`` diagonal and positive."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
    return x, a, b, lambda: 0.5 * (a * x * x).sum() + (b * x).sum() + 3.0


def test_update_direction_is_the_step_per_unit_rate_and_leaves_the_weights():
    x, a, b, loss = quadratic()
    origin = [x.detach().clone()]
    d = update_direction(zoptim.MeZO([x], lr=1e-3, eps=1e-4, seed=5), loss, [x], origin)
    assert torch.equal(x.detach(), origin[0])
    opt = zoptim.MeZO([x], lr=1e-3, eps=1e-4, seed=5)
    opt.step(loss)
    torch.testing.assert_close((origin[0] - x.detach()) / 1e-3, d[0], rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        x.copy_(origin[0])
    # the loss along it, at two rates, back at the origin afterwards
    along = losses_along(lambda: float(loss()), [x], origin, d, [0.0, 1e-3])
    assert along[0] == float(loss().detach()) and along[1] != along[0]
    assert torch.equal(x.detach(), origin[0])


def test_calibration_measures_the_curvature_along_the_steps_and_applies_its_rule():
    x, a, b, loss = quadratic()
    origin = x.detach().clone()
    make = lambda seed, rates={}: zoptim.MeZO([x], **{"lr": 1e-3, **rates}, eps=1e-4,  # noqa
                                              seed=seed)
    found = calibration.calibrate(make, lambda ex: loss, lambda ex: float(loss()), [x],
                                  list(range(64)), steps=500, batch_size=8, seed=3)
    assert torch.equal(x.detach(), origin)
    # each draw's curvature is d^T A d of that draw's direction: the quadratic is exact
    assert found.draws == len(found.curvature["lr"]) == len(found.values) >= \
        calibration.MIN_DRAWS
    for k, c in enumerate(found.curvature["lr"]):
        d = update_direction(make(zoptim.noise.mix(3, calibration._SALT, k)), loss, [x],
                             [origin])[0]
        assert c == pytest.approx(float((a * d * d).sum()), rel=1e-6)
    c = sum(found.curvature["lr"]) / found.draws
    l0 = float(loss().detach())
    assert found.settings["lr"] == pytest.approx(math.sqrt(2 * calibration.PHI * l0 / (500 * c)))
    assert list(found.settings) == ["lr"]
    # one held-out loss, then per draw the step's 2 queries and 2 per probe
    probes = sum(len(record[1]) for record in found.values)
    assert found.queries == 1 + 2 * found.draws + 2 * probes
    assert found.step_queries == 2 and 0 < found.share < 1
    assert calibration.check(found) is None
    record = json.loads(json.dumps(found.record()))
    assert calibration.check(calibration.Calibration.from_record(record)) is None


def test_a_record_whose_choice_does_not_follow_from_its_values_is_found():
    x, a, b, loss = quadratic()
    mezo = lambda seed, rates: zoptim.MeZO([x], **{"lr": 1e-3, **rates}, seed=seed)  # noqa
    found = calibration.calibrate(mezo, lambda ex: loss, lambda ex: float(loss()), [x],
                                  list(range(64)), steps=100, batch_size=8, seed=0)
    altered = calibration.Calibration.from_record({**found.record(),
                                                   "settings": {"lr": found.settings["lr"] * 2}})
    assert "rates do not follow" in calibration.check(altered)
    values = json.loads(json.dumps(found.values))
    values[0][1][-1][1] += 1.0
    altered = calibration.Calibration.from_record({**found.record(), "values": values})
    assert "curvatures" in calibration.check(altered)


def test_a_loss_that_does_not_bend_up_keeps_the_methods_default_rate():
    x = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    flat = lambda: (x * 0).sum() + 1.0  # noqa: E731
    found = calibration.calibrate(lambda seed, rates: zoptim.MeZO([x], **rates, seed=seed),
                                  lambda ex: flat, lambda ex: float(flat()), [x], list(range(32)),
                                  steps=10, batch_size=4, seed=0)
    assert found.settings == {"lr": zoptim.MeZO([x]).defaults["lr"]} and found.kept == ["lr"]
    assert "the method's default" in found.line() and calibration.check(found) is None


def test_each_rate_of_a_method_is_calibrated_on_the_part_it_steps():
    """ZO-Muon's matrices step at lr, its vectors at vector_lr: two curvatures, two rates."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    xs, ys = torch.randn(64, 6), torch.randn(64, 1)
    params = list(net.parameters())
    loss = lambda ex: lambda: ((net(xs[ex]) - ys[ex]) ** 2).mean()  # noqa: E731
    keys = calibration.calibrated_keys({"lr": "auto"}, {"lr": 1e-2, "vector_lr": 1e-7,
                                                        "eps": 1e-3})
    assert keys == ["lr", "vector_lr"]
    assert calibration.calibrated_keys({"lr": "auto", "vector_lr": 1e-5},
                                       {"lr": 1e-2, "vector_lr": 1e-7}) == ["lr"]
    assert calibration.calibrated_keys({"lr": 1e-3, "vector_lr": "auto"},
                                       {"lr": 1e-2, "vector_lr": 1e-7}) == ["vector_lr"]
    before = [p.detach().clone() for p in params]
    muon = lambda seed, rates: zoptim.ZOMuon(params, rank=2, seed=seed, **rates)  # noqa
    found = calibration.calibrate(muon, loss, lambda ex: float(loss(ex)()), params, list(range(64)),
                                  steps=200, batch_size=16, seed=0, keys=keys)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert set(found.settings) == {"lr", "vector_lr"} and set(found.curvature) == set(keys)
    # each rate spends half the noise budget on its own part
    for key in keys:
        c = sum(found.curvature[key]) / found.draws
        assert found.settings[key] == pytest.approx(
            math.sqrt(2 * calibration.PHI / 2 * found.heldout_loss / (200 * c)))
    assert calibration.check(found) is None


def test_a_rate_that_steps_no_tensor_is_left_alone():
    """ZO-Muon over matrices alone: vector_lr steps nothing, so lr takes the whole budget."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6) / 3)
    xs, ys = torch.randn(64, 6), torch.randn(64, 8)
    loss = lambda ex: lambda: ((xs[ex] @ w.T - ys[ex]) ** 2).mean()  # noqa: E731
    muon = lambda seed, rates: zoptim.ZOMuon([w], rank=2, seed=seed, **rates)  # noqa
    found = calibration.calibrate(muon, loss, lambda ex: float(loss(ex)()), [w], list(range(64)),
                                  steps=200, batch_size=16, seed=0, keys=["lr", "vector_lr"])
    assert list(found.settings) == list(found.curvature) == ["lr"]
    c = sum(found.curvature["lr"]) / found.draws
    assert found.settings["lr"] == pytest.approx(
        math.sqrt(2 * calibration.PHI * found.heldout_loss / (200 * c)))
    assert calibration.check(found) is None
    with pytest.raises(calibration.CalibrationError, match="vector_lr"):
        calibration.calibrate(muon, loss, lambda ex: float(loss(ex)()), [w], list(range(64)),
                              steps=200, batch_size=16, seed=0, keys=["vector_lr"])


def test_a_probe_whose_loss_is_not_finite_is_taken_nearer():
    x = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))

    def loss():  # a quadratic that overflows beyond 0.05 of the origin
        return math.inf if float(x.abs().max()) > 0.05 else 1.0 + float((x * x).sum())

    record = []
    c = calibration._probe(loss, [x], [x.detach().clone()], [torch.ones(8, dtype=torch.float64)],
                           1.0, 1.0, 2e-4, record)
    assert [r[0] for r in record][:2] == [1.0, pytest.approx(0.1)]
    assert c == pytest.approx(2 * 8) and math.isfinite(record[-1][1])
    # a draw that never came out finite is left out of the mean, and the record still checks
    assert calibration._mean([math.nan, 2.0, 4.0], 1.0) == 3.0
    assert calibration._mean([math.nan], 1.0) is None


def test_draws_that_disagree_make_the_line_say_the_rate_is_uncertain():
    x, a, b, loss = quadratic()
    mezo = lambda seed, rates: zoptim.MeZO([x], **{"lr": 1e-3, **rates}, seed=seed)  # noqa
    found = calibration.calibrate(mezo, lambda ex: loss, lambda ex: float(loss()), [x],
                                  list(range(64)), steps=100, batch_size=8, seed=0)
    assert not found.uncertain("lr") and "uncertain" not in found.line()
    # a decoder's draws at the start: mixed in sign, a mean below its standard error
    mixed = calibration.Calibration.from_record(
        {**found.record(), "curvature": {"lr": [-5.6e4, 3.2e4, -3.8e3, 7.7e4]}})
    assert mixed.uncertain("lr") and "lr " in mixed.line() and "uncertain" in mixed.line()


def test_a_record_whose_queries_do_not_follow_is_found():
    x, a, b, loss = quadratic()
    mezo = lambda seed, rates: zoptim.MeZO([x], **{"lr": 1e-3, **rates}, seed=seed)  # noqa
    found = calibration.calibrate(mezo, lambda ex: loss, lambda ex: float(loss()), [x],
                                  list(range(64)), steps=100, batch_size=8, seed=0)
    more = calibration.Calibration.from_record({**found.record(), "queries": found.queries + 1})
    assert "queries" in calibration.check(more)
    fewer = calibration.Calibration.from_record({**found.record(), "values": found.values[1:]})
    assert "draws" in calibration.check(fewer)


def test_a_zeroth_order_method_without_a_rate_calibrates_it():
    cfg = config.load(None, ['method.name="mezo"'])
    assert cfg.method.settings["lr"] == "auto"
    cfg = config.load(None, ['method.name="mezo"', "method.settings.lr=1e-5"])
    assert cfg.method.settings["lr"] == 1e-5
    assert "lr" not in config.load(None, ['method.name="adamw"']).method.settings
    with pytest.raises(config.ConfigError, match="takes a learning rate"):
        config.load(None, ['method.name="adamw"', 'method.settings.lr="auto"'])
    with pytest.raises(config.ConfigError, match="reward"):
        config.load(None, ['task.name="countdown"', 'method.name="es"',
                           'method.settings.lr="auto"'])
    with pytest.raises(config.ConfigError, match="only rates"):
        config.load(None, ['method.settings.eps="auto"'])
    # a rate the method does not take is refused, "auto" or not
    with pytest.raises(config.ConfigError, match="vector_lr"):
        config.load(None, ['method.name="mezo"', 'method.settings.vector_lr="auto"'])
    reward = config.load(None, ['task.name="countdown"', 'method.name="es"'])
    assert "lr" not in reward.method.settings  # the method's own default


def test_a_run_of_no_steps_calibrates_nothing_until_it_is_resumed_with_steps(tmp_path, tiny):
    sets = SETTINGS + [f"model.name={json.dumps(str(tiny))}"]
    summary = train(config.load(None, sets + ["steps=0"]), tmp_path / "zero", progress=False,
                    log=lambda *_: None)
    assert summary["after"]["queries"] == 0 and not (tmp_path / "zero" / CALIBRATION).exists()
    # resumed with steps: calibrated at its starting weights, its rates the ones its steps take
    logged = []
    summary = train(config.load(None, sets + ["steps=2"]), tmp_path / "zero", resume=True,
                    progress=False, log=logged.append)
    found = json.loads((tmp_path / "zero" / CALIBRATION).read_text())
    assert any(line.startswith("lr auto: ") for line in logged)
    assert summary["after"]["queries"] == found["queries"] + 4
    fresh = train(config.load(None, sets + ["steps=2"]), tmp_path / "fresh", progress=False,
                  log=lambda *_: None)
    assert fresh["after"] == summary["after"]
    assert audit(tmp_path / "zero").ok
    # a run that took steps and lost its record is refused, not recalibrated
    (tmp_path / "fresh" / CALIBRATION).unlink()
    with pytest.raises(RunError, match="calibration.json is missing"):
        train(config.load(None, sets + ["steps=4"]), tmp_path / "fresh", resume=True,
              progress=False, log=lambda *_: None)


SETTINGS = ["task.train=32", "task.dev=16", "task.test=16", f"task.path={json.dumps(MR_PATH)}",
            "batch_size=8", "eval_every=2", "save_every=2", "eval_batch_size=16",
            'method.name="mezo"', "method.settings.eps=1e-3"]


def test_an_auto_rate_run_records_its_calibration_resumes_and_replays(tmp_path, tiny, capsys,
                                                                      monkeypatch):
    sets = SETTINGS + [f"model.name={json.dumps(str(tiny))}"]
    whole = config.load(None, sets + ["steps=4"])
    logged = []
    train(whole, tmp_path / "whole", progress=False, log=logged.append)
    found = json.loads((tmp_path / "whole" / CALIBRATION).read_text())
    assert any(line.startswith("lr auto: ") for line in logged)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["method"]["settings"][
        "lr"] == "auto"
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["calibration"]["settings"] == found["settings"] and found["settings"]["lr"] > 0
    # the calibration's queries are the run's: 4 steps of 2 queries after them
    assert summary["after"]["queries"] == found["queries"] + 8
    metrics = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text()
               .splitlines()]
    assert metrics[0]["queries"] == found["queries"] + 2
    # interrupted after 2 of its 4 steps and resumed: the same weights, the calibration
    # (chosen for 4 steps) not done again
    step = Training.step

    def interrupt(self, out, bar):
        if self.run_.opt.steps == 2:
            raise KeyboardInterrupt
        step(self, out, bar)

    monkeypatch.setattr(Training, "step", interrupt)
    with pytest.raises(Interrupted):
        train(whole, tmp_path / "split", progress=False, log=lambda *_: None)
    monkeypatch.setattr(Training, "step", step)
    first = (tmp_path / "split" / CALIBRATION).read_bytes()
    again = []
    train(whole, tmp_path / "split", resume=True, progress=False, log=again.append)
    assert not any(line.startswith("lr auto") for line in again)
    assert (tmp_path / "split" / CALIBRATION).read_bytes() == first
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint-4" / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert audit(tmp_path / "split").ok
    # an altered record is found by verify
    record = json.loads(first)
    record["settings"]["lr"] *= 3
    (tmp_path / "split" / CALIBRATION).write_text(json.dumps(record))
    assert main(["verify", str(tmp_path / "split")]) == 1
    assert "calibration.json: its rates do not follow" in capsys.readouterr().out
