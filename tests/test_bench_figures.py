import json

import pytest

from zoptim.bench.figures import Curve, first_reaching, load_curve, spread, to_target


def curve(points):
    """(queries, seconds, dev) triples."""
    q, s, d = zip(*points)
    return Curve(q, s, d)


def test_arrival_is_the_first_evaluation_from_which_the_curve_stays_at_target():
    c = curve([(100, 1.0, 0.60), (200, 2.0, 0.72), (300, 3.0, 0.70), (400, 4.0, 0.75)])
    # unsmoothed: 200 touches 0.72 and falls back; the curve stays there from 400
    assert first_reaching(c, 0.72, window=1) == 400
    assert first_reaching(c, 0.72, axis="seconds", window=1) == 4.0
    assert first_reaching(c, 0.70, window=1) == 200
    assert first_reaching(c, 0.80, window=1) is None
    # smoothed over 3 evaluations: 0.60, 0.66, 0.673, 0.723
    assert c.smoothed(3) == pytest.approx((0.60, 0.66, 2.02 / 3, 2.17 / 3))
    assert first_reaching(c, 0.67) == 300 and first_reaching(c, 0.72) == 400
    dip = curve([(100, 1, 0.75), (200, 2, 0.60), (300, 3, 0.75)])
    assert first_reaching(dip, 0.70, window=1) == 300


def test_queries_to_target_against_the_baseline_per_seed():
    mezo = {0: curve([(1000, 10, 0.65), (2000, 20, 0.70), (4000, 40, 0.72)]),   # own: 4000
            1: curve([(1000, 10, 0.71), (2000, 20, 0.69), (4000, 40, 0.70)]),   # own: 4000
            2: curve([(1000, 10, 0.60), (2000, 20, 0.62), (4000, 40, 0.64)])}   # own: 4000
    muon = {0: curve([(1000, 30, 0.73), (2000, 60, 0.74), (4000, 120, 0.75)]),  # 1000 / 4000
            1: curve([(1000, 30, 0.60), (2000, 60, 0.70), (4000, 120, 0.71)]),  # 2000 / 4000
            2: curve([(1000, 30, 0.50), (2000, 60, 0.55), (4000, 120, 0.60)])}  # never
    per_seed, summary = to_target(muon, mezo, window=1)
    assert per_seed == {0: 0.25, 1: 0.5, 2: None}
    # the seed that never got there ranks above both others
    assert summary == {"median": 0.5, "min": 0.25, "max": 0.5, "n": 2, "missing": 1}
    per_seed_t, _ = to_target(muon, mezo, axis="seconds", window=1)
    assert per_seed_t[0] == 30 / 40 and per_seed_t[1] == 60 / 40
    # the baseline against itself reaches its target exactly when it does, smoothed or not
    assert to_target(mezo, mezo)[0] == {0: 1.0, 1: 1.0, 2: 1.0}
    # smoothed, the target is the baseline's last three evaluations' mean (seed 0: 0.69)
    assert to_target(muon, mezo)[0][0] == 1000 / 4000


def test_spread_and_missing_seeds():
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.5, "min": 1.0, "max": 3.0, "n": 3,
                                             "missing": 1}
    assert spread([1.0, 2.0, 3.0])["median"] == 2.0
    # half the seeds or more never reached: no median, whatever the others did
    assert spread([0.1, None])["median"] is None and spread([0.1, None, None])["median"] is None
    assert spread([None])["median"] is None and spread([])["median"] is None
    with pytest.raises(ValueError, match="share no seed"):
        to_target({0: curve([(1, 1, 0.5)])}, {1: curve([(1, 1, 0.5)])})


def test_curves_load_from_a_runs_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "loss": 0.7, "queries": 5, "elapsed_s": 1.0},
            {"step": 1, "loss": 0.6, "queries": 10, "elapsed_s": 2.0, "dev_acc": 0.7},
            {"step": 2, "loss": 0.5, "queries": 15, "elapsed_s": 3.0, "skipped": "non-finite loss"},
            {"step": 3, "loss": 0.5, "queries": 20, "elapsed_s": 4.0, "dev_acc": 0.72}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_curve(path)
    assert c == Curve((10, 20), (2.0, 4.0), (0.7, 0.72)) and c.final == 0.72
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no dev evaluation"):
        load_curve(path)
