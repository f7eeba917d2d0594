"""The step-cost benchmark runs end to end on MiniLM's architecture and writes every row."""

import json

import pytest

import torch

import zoptim
from zoptim.bench.step_cost import STACKED, main


def queries_per_step(row: str) -> int:
    """The objective evaluations of one step of the row's method at its defaults, counted."""
    if row == STACKED:
        return 5  # the floor stacks ZO-Muon's five evaluations
    w = torch.nn.Parameter(torch.zeros(4, 4))
    if "ZO-Muon" in row:
        opt = zoptim.ZOMuon([w], rank=2)
    elif "MeZO" in row:
        opt = zoptim.MeZO([w])
    else:
        raise AssertionError(f"an unexpected row: {row}")
    opt.step(lambda: (w**2).sum())
    return opt.queries


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
        # the ratio's denominator is the forwards the method's step really evaluates
        assert r["forwards"] == queries_per_step(r["method"])
    assert "batched queries" in capsys.readouterr().out


@pytest.mark.parametrize("ranks", ["0", "8,x", ""])
def test_step_cost_refuses_bad_ranks(ranks):
    with pytest.raises(SystemExit) as err:
        main(["--random-weights", "--ranks", ranks])
    assert err.value.code == 2
