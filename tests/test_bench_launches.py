"""The operator-call benchmark runs end to end on two small depths and writes every row."""

import json

import pytest

from zoptim.bench.launches import main


def test_launches_counts_every_method_at_every_depth(tmp_path, capsys):
    out = tmp_path / "launches.json"
    assert main(["--layers", "1,2", "--rounds", "1", "--rank", "4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    methods = {"MeZO", "ZO-Muon in place", "ZO-Muon batched"}
    assert {(r["method"], r["layers"]) for r in record["rows"]} == \
        {(m, n) for m in methods for n in (1, 2)}
    for r in record["rows"]:
        assert r["step_calls"] > r["forward_calls"] > 0 and r["step_s"] > 0
        assert r["step_calls_all"] >= r["step_calls"]
    assert set(record["slopes"]) == methods
    assert "extra calls per added layer" in capsys.readouterr().out


@pytest.mark.parametrize("layers", ["2", "2,2", "0,2", "a,b"])
def test_launches_needs_two_depths(layers):
    with pytest.raises(SystemExit) as err:
        main(["--layers", layers])
    assert err.value.code == 2
