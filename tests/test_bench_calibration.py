"""lr = "auto" against a kept benchmark's tuned grids (bench.calibration)."""

import json

from zoptim.bench import calibration
from zoptim.cli import main

from test_bench_matrix import tuned_config


def test_each_tuned_row_is_calibrated_for_its_own_run_and_set_beside_its_grid(tmp_path):
    bench = tmp_path / "bench.toml"
    bench.write_text(tuned_config("[1e-4, 1e-3]", "[1e-2, 3e-2]"))
    assert main(["bench", "--config", str(bench), "--out", str(tmp_path / "bench")]) == 0
    spec = tmp_path / "calibration.toml"
    spec.write_text(f"""
[[benchmarks]]
config = {json.dumps(str(bench))}
results = {json.dumps(str(tmp_path / "bench" / "results.json"))}
labels = ["mezo", "zo-muon"]
role = "selection"
""")
    out = tmp_path / "out"
    done = calibration.run(spec, out, log=lambda *_: None)
    rows = {r["label"]: r for r in done["rows"]}
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    for label in ("mezo", "zo-muon"):
        r, tuning = rows[label], results["methods"][label]["tuning"]
        assert r["steps"] == {"mezo": 3, "zo-muon": 2}[label] and r["role"] == "selection"
        assert [p["dev"] for p in r["grid"]] == list(tuning["tried"].values())
        # the grid's point is the one the benchmark chose, read from its own results
        assert f"lr={r['tuned']['lr']:g}" == tuning["chosen"]
        assert r["within"] == (1 / 3 <= r["ratio"]["lr"] <= 3) and r["queries"] > 0
    # ZO-Muon's grid held vector_lr at its default: only lr was calibrated
    assert set(rows["zo-muon"]["auto"]) == {"lr"}
    report = (out / "report.md").read_text()
    assert "| bench | selection | zo-muon | 2 |" in report and "selection: " in report
    # rows already calibrated are kept
    assert calibration.run(spec, out, log=lambda *_: None) == done


def test_a_benchmark_with_train_runs_each_row_at_its_calibrated_rates(tmp_path):
    bench = tmp_path / "bench.toml"
    bench.write_text(tuned_config("[1e-4, 1e-3]", "[1e-2, 3e-2]"))
    assert main(["bench", "--config", str(bench), "--out", str(tmp_path / "bench"),
                 "--only", "mezo"]) == 0
    spec = tmp_path / "calibration.toml"
    text = f"""
[[benchmarks]]
config = {json.dumps(str(bench))}
results = {json.dumps(str(tmp_path / "bench" / "results.json"))}
labels = ["mezo"]
role = "check"
"""
    spec.write_text(text)
    out = tmp_path / "out"
    calibration.run(spec, out, log=lambda *_: None)
    spec.write_text(text + "train = true\n")
    done = calibration.run(spec, out, log=lambda *_: None)
    (r,) = done["rows"]
    cell = out / "bench" / "mezo"
    summary = json.loads((cell / "summary.json").read_text())
    recorded = json.loads((cell / "calibration.json").read_text())
    # the run took 5% fewer steps than the grid's 3, after a calibration counted in its queries
    assert r["trained"] == summary["after"] and summary["after"]["steps"] == 2
    assert summary["after"]["queries"] == recorded["queries"] + 2 * 2
    report = (out / "report.md").read_text()
    assert "## Trained at the calibrated rates" in report
    assert f"| {r['trained']['dev_acc']:.3f} | {r['tuned_dev']:.3f} |" in report
    assert calibration.run(spec, out, log=lambda *_: None) == done
