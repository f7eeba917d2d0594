"""The population benchmark: an ES and an EGGROLL step against greedy inference."""

import json

from zoptim.bench.population import main


def test_population_timing_reports_every_row_side_by_side(tiny, tmp_path, capsys):
    out = tmp_path / "population.json"
    assert main(["--model", str(tiny), "--members", "2", "--prompts", "2", "--rank", "2",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["seconds"]) == {"inference, one batch", "inference, stacked batch",
                                   "eggroll step", "es step"}
    assert all(s > 0 for s in got["seconds"].values())
    assert (got["members"], got["prompts"], got["rank"]) == (2, 2, 2)
    printed = capsys.readouterr().out
    assert "eggroll step" in printed and "of batched inference's throughput" in printed
