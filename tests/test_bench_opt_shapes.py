import json

from zoptim.bench.opt_shapes import SHAPES, build_opt, main


def test_opt_shapes_have_the_published_sizes():
    # random-weight OPT-125M from its shape has OPT-125M's parameter count
    model = build_opt("125m", "cpu", __import__("torch").float32)
    assert sum(p.numel() for p in model.parameters()) == 125_239_296
    assert SHAPES["1.3b"] == (2048, 24, 32, 8192)


def test_the_gpu_mode_runs_on_the_cpu_with_a_small_shape(tmp_path, capsys):
    out = tmp_path / "opt.json"
    assert main(["--shapes", "tiny", "--tokens", "8", "--batch", "2", "--device", "cpu",
                 "--dtype", "float32", "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())["records"][0]
    assert (record["shape"], record["tokens"], record["batch"]) == ("tiny", 8, 2)
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == {"mezo", "zo-muon, 1 query", "zo-muon, 4 queries", "zo-muon, 4 batched"}
    for r in rows.values():
        assert r["step_over_evaluations"] == r["step_s"] / (r["evaluations"] * record["forward_s"])
    assert "zo-muon, 4 queries" in capsys.readouterr().out
