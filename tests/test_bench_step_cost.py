"""The step-cost benchmark runs end to end on MiniLM's architecture and writes every row."""

import json

import pytest

from zoptim.bench.step_cost import STACKED, main


def test_step_cost_times_every_method_in_rounds(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["--random-weights", "--steps", "1", "--batch", "2", "--tokens", "8",
                 "--ranks", "2,4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    names = [r["method"] for r in record["rows"]]
    assert names[0] == STACKED
    for rank in (2, 4):
        assert f"zoptim ZO-Muon rank {rank}, batched queries" in names
        assert f"zoptim ZO-Muon rank {rank} (4 queries + baseline)" in names
    for r in record["rows"]:
        assert r["step_s"] > 0
        assert r["ratio"] == pytest.approx(r["step_s"] / (r["forwards"] * record["forward_s"]))
    assert "batched queries" in capsys.readouterr().out


@pytest.mark.parametrize("ranks", ["0", "8,x", ""])
def test_step_cost_refuses_bad_ranks(ranks):
    with pytest.raises(SystemExit) as err:
        main(["--random-weights", "--ranks", ranks])
    assert err.value.code == 2
