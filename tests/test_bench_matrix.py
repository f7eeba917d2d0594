import json

import pytest

from zoptim.bench import matrix, step_time
from zoptim.cli import main
from zoptim.runs import machine
from zoptim.runs.run import build

from conftest import MR_PATH

CONFIG = f"""
seeds = [0, 1]
baseline = "mezo"

[base]
steps = 3
eval_every = 1
save_every = 10
batch_size = 4
eval_batch_size = 16
[base.model]
scheme = "lora"
max_length = 32
[base.task]
path = {json.dumps(MR_PATH)}
train = 16
dev = 16
test = 8

[[methods]]
label = "mezo"
name = "mezo"
settings = {{ lr = 1e-3, eps = 1e-2 }}

[[methods]]
label = "zo-muon"
name = "zo-muon"
settings = {{ lr = 1e-2, rank = 4, directions = 2 }}
steps = 2
"""


def test_bench_runs_the_matrix_and_reports(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(matrix, "build", lambda cfg: built.append(cfg.method.name) or build(cfg))
    cfg = tmp_path / "bench.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "bench"
    # some of the methods first: their cells are the whole matrix's
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--only", "mezo"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"].keys() == {"mezo"}
    assert "--only mezo" in (out / "report.md").read_text() and not (out / "zo-muon").exists()
    kept = [out / "mezo" / "seed-0" / "summary.json", out / "mezo" / "step_time.json"]
    stamps = [path.stat().st_mtime_ns for path in kept]
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0
    assert [path.stat().st_mtime_ns for path in kept] == stamps  # neither run nor timed again
    # one run measured each method's memory and step time, once
    assert built == ["mezo", "zo-muon"]
    results = json.loads((out / "results.json").read_text())
    mezo, muon = results["methods"]["mezo"], results["methods"]["zo-muon"]
    assert mezo["queries_to_target"]["per_seed"].keys() == {"0", "1"}
    assert mezo["queries"]["median"] == 6 and muon["queries"]["median"] == 6  # 3x2 and 2x3
    for seed in ("0", "1"):
        assert mezo["queries_to_target"]["per_seed"][seed] == 1.0
    report = (out / "report.md").read_text()
    assert "| zo-muon |" in report and "queries to target / mezo" in report
    assert "Command: `zoptim bench" in report and results["environment"]["torch"]
    for name in ("dev_vs_queries.png", "dev_vs_seconds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in report
    # every cell records the machine it ran on; one machine: nothing to say
    here = machine.describe()
    assert mezo["machines"] == {"0": [here], "1": [here]} and "more than one machine" not in report
    assert results["environment"]["machine"] == here and here in report
    # each method's step timed here: the queries it spends (MeZO 2, ZO-Muon 2 directions and a
    # baseline), and the time at step cost that follows
    assert mezo["step_time"]["queries_per_step"] == 2 and muon["step_time"]["queries_per_step"] == 3
    assert mezo["step_time"]["seconds_per_query"] > 0 and muon["step_time"]["machine"] == here
    assert mezo["step_time_to_target"]["per_seed"] == {"0": 1.0, "1": 1.0}
    assert muon["step_time_to_target"]["per_seed"].keys() == {"0", "1"}
    assert "time at step cost / mezo" in report and f"after another on {here}" in report
    # a finished cell that another configuration would have run differently is refused, not
    # reused: here MeZO's steps change
    cfg.write_text(CONFIG.replace("steps = 3", "steps = 4"))
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--only", "mezo"]) == 2
    assert "holds a finished run of another steps" in capsys.readouterr().err


def test_time_at_step_cost_scales_each_seed_by_the_cost_of_a_query():
    """A method twice as fast a query as the baseline halves each seed's queries ratio; a seed
    that never reached the target stays missing and ranks above the others."""
    ratios = {0: 0.5, 1: None, 2: 0.8}
    out = step_time.to_target(ratios, {"seconds_per_query": 0.2}, {"seconds_per_query": 0.4})
    assert out["per_seed"] == {0: 0.25, 1: None, 2: 0.4}
    assert (out["median"], out["min"], out["max"], out["missing"]) == (0.4, 0.25, 0.4, 1)


def test_bench_reports_cells_run_on_different_machines(tmp_path):
    """A benchmark continued on another machine: the report says which cells ran where, since
    their wall times (time-to-target) are not comparable."""
    cfg = tmp_path / "bench.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--only", "mezo"]) == 0
    path = out / "mezo" / "seed-1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["machines"] = ["another machine"]
    path.write_text(json.dumps(summary))
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--only", "mezo"]) == 0
    report = (out / "report.md").read_text()
    assert "The cells ran on more than one machine" in report
    assert f"- {machine.describe()}: mezo seed 0" in report
    assert "- another machine: mezo seed 1" in report


@pytest.mark.parametrize("only, message", [("mezo,nope", "no method labelled ['nope']"),
                                           ("zo-muon", "baseline 'mezo' is not one of")])
def test_bench_only_refuses_unknown_labels_and_a_missing_baseline(tmp_path, capsys, only,
                                                                  message):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(cfg), "--out", str(out), "--only", only]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_bench_refuses_a_config_without_methods(tmp_path, capsys):
    cfg = tmp_path / "bench.toml"
    cfg.write_text("seeds = [0]\n")
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 2
    assert "no [[methods]]" in capsys.readouterr().err


def _queries_a_step(cfg) -> int:
    """Evaluations a step of the method a cell runs, from its settings (or its default)."""
    import inspect

    import zoptim

    fixed = {"mezo": 2, "subspace-mezo": 2, "lozo": 2, "hizoo": 3, "grzo": 2}
    if cfg.method.name in fixed:
        return fixed[cfg.method.name]
    default = inspect.signature(zoptim.METHODS[cfg.method.name]).parameters["directions"]
    return cfg.method.settings.get("directions", default.default) + 1  # one-sided + baseline


@pytest.mark.parametrize("name, cells, budget", [
    # three tuning cells on seed 0 and two more seeds; three calibrated rows on each seed
    ("mr_minilm.toml", 13 * (3 + 2) + 3 * 3, 8000),
    ("mr_minilm_ablations.toml", 10 * 3, 8000),
    ("mr_minilm_screen.toml", 11, 1600),
    ("mr_minilm_candidates.toml", 4 * 3, 1600),
    ("mr_minilm_ablations_screen.toml", 9 * 3, 1600),
    ("mr_smollm2_proxy.toml", 3 + 4 * (3 + 2), 300),  # zero-shot on each seed
    # zero-shot and four calibrated rows on each of 4 seeds, four tuned rows on 3 + 3
    ("mr_smollm2_proxy_1500.toml", 4 + 4 * 4 + 4 * (3 + 3), 1500)])
def test_the_classification_configurations_validate_and_equalize_queries(name, cells, budget):
    from pathlib import Path

    from zoptim.runs import config
    from zoptim.bench.matrix import _cells

    path = Path(__file__).resolve().parents[1] / "benchmarks" / name
    found = list(_cells(config.read_file(path)))
    assert len(found) == cells
    for label, seed, point, cfg in found:
        if cfg.steps == 0 or cfg.method.name == "adamw":
            continue
        spent = cfg.steps * _queries_a_step(cfg)
        # a calibrated row leaves the calibration its 5%
        least = 0.94 * budget if config.auto_rate(cfg.method.settings) else budget - 10
        assert least <= spent <= budget, (label, spent)


def test_the_countdown_configuration_validates_and_equalizes_generations():
    from pathlib import Path

    from zoptim.runs import config
    from zoptim.bench.matrix import _cells

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "countdown_smollm2_cpu.toml"
    cells = list(_cells(config.read_file(path)))
    assert len(cells) == 4 * 3  # zero-shot, es, eggroll, grpo on three seeds
    spent = {(label, cfg.steps * cfg.batch_size * cfg.method.settings.get(
        "members", cfg.method.settings.get("generations", 0))) for label, _, _, cfg in cells}
    assert spent == {("zero-shot", 0), ("es", 384), ("eggroll", 384), ("grpo", 384)}


def test_the_vision_configuration_validates_and_equalizes_queries():
    from pathlib import Path

    from zoptim.runs import config
    from zoptim.bench.matrix import _cells

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist5k_efficientnet.toml"
    cells = list(_cells(config.read_file(path)))
    assert len(cells) == 10 * (2 + 2)  # two tuning cells on seed 0, two more seeds
    per_step = {"zo-muon": 5, "hizoo": 3}
    for label, seed, point, cfg in cells:
        assert cfg.task.name == "mnist-5k" and cfg.model.name == "efficientnet-lite0"
        if cfg.method.name == "adamw":
            assert cfg.model.scheme == ("head" if label == "linear-probe" else "full")
            continue
        budget = cfg.steps * per_step.get(cfg.method.name, 2)
        assert 1990 <= budget <= 2000, (label, budget)


def tuned_config(mezo: str, muon: str) -> str:
    """CONFIG with MeZO and ZO-Muon tuned on the grids of ``lr`` given (TOML lists)."""
    tuned = CONFIG.replace("settings = { lr = 1e-3, eps = 1e-2 }",
                           f"settings = {{ eps = 1e-2 }}\ngrid = {{ lr = {mezo} }}")
    return tuned.replace("settings = { lr = 1e-2, rank = 4, directions = 2 }",
                         f"settings = {{ rank = 4, directions = 2 }}\ngrid = {{ lr = {muon} }}")


def test_bench_tunes_on_the_selection_seed_and_reports_on_the_others(tmp_path):
    tuned = tuned_config("[0.0, 1e-3]", "[1e-2, 0.0]")
    cfg = tmp_path / "bench.toml"
    cfg.write_text(tuned)
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for label, points in (("mezo", ["lr=0.0", "lr=0.001"]), ("zo-muon", ["lr=0.01", "lr=0.0"])):
        tuning = results["methods"][label]["tuning"]
        assert list(tuning["tried"]) == points and tuning["seed"] == 0
        finals = {p: json.loads((out / label / "grid" / p / "summary.json").read_text())
                  for p in points}
        assert tuning["tried"] == {p: s["after"]["dev_acc"] for p, s in finals.items()}
        best = max(points, key=lambda p: (tuning["tried"][p], -points.index(p)))
        assert tuning["chosen"] == best
        chosen_lr = float(best.split("=")[1])
        assert results["methods"][label]["settings"]["lr"] == chosen_lr
        seed1 = json.loads((out / label / "seed-1" / "config.json").read_text())
        assert seed1["method"]["settings"]["lr"] == chosen_lr
        assert not (out / label / "seed-0").exists()  # seed 0 is the chosen grid cell
        # the figures come from seed 1 alone, which no choice has seen
        assert results["methods"][label]["final_dev"]["n"] == 1
        assert list(results["methods"][label]["queries_to_target"]["per_seed"]) == ["1"]
    assert results["selection_seed"] == 0 and results["seeds"] == [1]
    report = (out / "report.md").read_text()
    assert "Tuning (final dev accuracy" in report and "chosen on seed 0" in report
    # a tuned benchmark needs a seed to report on
    cfg.write_text(tuned.replace("seeds = [0, 1]", "seeds = [0]"))
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 2


def test_bench_refuses_unequal_tuning_budgets(tmp_path, capsys):
    cfg = tmp_path / "bench.toml"
    unequal = CONFIG.replace('steps = 2\n', 'steps = 2\ngrid = { lr = [1e-2, 1e-3] }\n')
    cfg.write_text(unequal.replace("settings = { lr = 1e-3, eps = 1e-2 }",
                                   "settings = { eps = 1e-2 }\ngrid = { lr = [1e-4, 1e-3, 1e-2] }"))
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 2
    assert "same tuning budget" in capsys.readouterr().err


IMAGES = """
seeds = [0]
baseline = "mezo"

[base]
steps = 4
eval_every = 2
save_every = 10
batch_size = 8
eval_batch_size = 32
[base.model]
name = "efficientnet-lite0"
image_size = 32
[base.task]
name = "digits"
train = 32
dev = 32
test = 32

[[methods]]
label = "mezo"
name = "mezo"
settings = { lr = 1e-5 }

[[methods]]
label = "probe"
name = "adamw"
settings = { lr = 1e-3 }
model = { scheme = "head" }

[[methods]]
label = "unstable"
name = "mezo"
settings = { lr = 1e4, eps = 1e-3 }
guard = { spike = 10.0, window = 1, max_consecutive = 1 }  # the spike test, asked for
"""


def test_bench_on_images_merges_method_settings_and_survives_a_divergence(tmp_path):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(IMAGES)
    out = tmp_path / "bench"
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0
    probe = json.loads((out / "probe" / "seed-0" / "config.json").read_text())
    assert probe["model"]["scheme"] == "head" and probe["model"]["image_size"] == 32
    results = json.loads((out / "results.json").read_text())
    unstable = results["methods"]["unstable"]
    assert unstable["diverged_seeds"] == [0] and results["methods"]["mezo"]["diverged_seeds"] == []
    summary = json.loads((out / "unstable" / "seed-0" / "summary.json").read_text())
    assert summary["after"]["steps"] < 4 and "skipped steps in a row" in summary["after"]["diverged"]
    assert "Diverged" in (out / "report.md").read_text()


def test_cells_run_without_the_spike_test_unless_the_config_asks():
    from zoptim.bench.matrix import Method, _config

    method = Method("mezo", "mezo", {"lr": 1e-3}, {}, [{}])
    assert _config({"base": {}}, method, {}, 0).guard.spike == 0.0
    asked = {"base": {"guard": {"spike": 5.0}}}
    assert _config(asked, method, {}, 0).guard.spike == 5.0
    assert _config(asked, method, {}, 0).guard.window == 20  # the rest as configured
