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
        assert r["step_calls"] > r["forward_calls"] > 0
        assert r["step_calls_all"] >= r["step_calls"]
    assert set(record["slopes"]) == methods
    # the claim: a layer adds fewer operator calls to ZO-Muon's step than to MeZO's, and
    # fewest under batched queries (counts, not times: the same on any machine)
    added = {m: s["extra_calls_all"] for m, s in record["slopes"].items()}
    assert added["ZO-Muon batched"] < added["ZO-Muon in place"] < added["MeZO"]
    assert "extra calls per added layer" in capsys.readouterr().out


@pytest.mark.parametrize("layers", ["2", "2,2", "0,2", "a,b"])
def test_launches_needs_two_depths(layers):
    with pytest.raises(SystemExit) as err:
        main(["--layers", layers])
    assert err.value.code == 2
