"""The scaling and offloading benchmarks run end to end on the CPU (small settings)."""

import json

from zoptim.bench import offload, scaling


def test_offload_benchmark_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "offload.json"
    assert offload.main(["--device", "cpu", "--shapes", "tiny", "--dtype", "float32",
                         "--repeats", "1", "--batch", "2", "--tokens", "8",
                         "--out", str(out)]) == 0
    record = json.loads(out.read_text())["records"][0]
    # both steps timed side by side; peak memory is a GPU figure, not invented on a CPU
    assert {"offloaded_step_s", "resident_step_s", "offload_time_ratio"} <= set(record)
    assert record["offloaded_peak_bytes"] is None and record["resident_peak_bytes"] is None
    assert "tiny" in capsys.readouterr().out


def test_scaling_benchmark_reports_constant_bytes(tmp_path):
    out = tmp_path / "scaling.json"
    assert scaling.main(["--tiny", "--steps", "1", "--batch", "4", "--tokens", "8",
                         "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["single", "single", "perturbation", "data"]
    # 8 evaluations a step, one float64 each, whatever the world
    assert {r["bytes_per_step"] for r in rows} == {64}
    assert all(r["queries_per_s"] > 0 for r in rows)
