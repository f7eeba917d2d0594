"""Derived figures of a benchmark: queries-to-target, time-to-target and their spread over
seeds, from the dev-accuracy curves that ``zoptim train`` writes to ``metrics.jsonl``.

A dev curve is read smoothed: each evaluation is the mean of the last ``window`` ones
(``SMOOTH``; fewer at the start), so that one lucky evaluation, a dev set's noise, does not
count as arriving. The target of a seed is the baseline method's (MeZO's) final smoothed dev
accuracy on that seed. A method reaches it at the first evaluation from which its smoothed
curve stays at or above it to the end, not at a transient touch; its ratio is the queries it
needed over the queries the baseline needed (the baseline's smoothed curve ends at its
target, so it always arrives). A method that never reaches it has no ratio on that seed
(reported as missing, never as a number); the median counts such a seed as above every
ratio, so a method that misses half its seeds or more has no median.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Curve:
    """Dev accuracy (or reward) at the evaluated steps, with the queries and seconds spent by
    then, and for a reward task the generations (completions decoded)."""
    queries: tuple[int, ...]
    seconds: tuple[float, ...]
    dev: tuple[float, ...]
    generations: tuple[int, ...] | None = None

    @property
    def final(self) -> float:
        return self.dev[-1]

    def smoothed(self, window: int) -> tuple[float, ...]:
        """Each evaluation as the mean of the last ``window`` (fewer at the start)."""
        parts = (self.dev[max(0, i + 1 - window):i + 1] for i in range(len(self.dev)))
        return tuple(sum(part) / len(part) for part in parts)


def load_curve(metrics: str | Path) -> Curve:
    """The evaluated points of a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    points = [r for r in rows if r.get("dev_acc") is not None]
    if not points:
        raise ValueError(f"{metrics}: no dev evaluation recorded")
    return Curve(tuple(int(r["queries"]) for r in points),
                 tuple(float(r["elapsed_s"]) for r in points),
                 tuple(float(r["dev_acc"]) for r in points), _generations(points))


def _generations(points: list[dict]) -> tuple[int, ...] | None:
    """The generations spent by each evaluated point (a reward run's), else ``None``."""
    if not all("generations" in r for r in points):
        return None
    return tuple(int(r["generations"]) for r in points)


SMOOTH = 3  # evaluations a dev curve is averaged over


def first_reaching(curve: Curve, target: float, axis: str = "queries",
                   window: int = SMOOTH) -> float | None:
    """The queries (or ``axis``: seconds, generations) at the first evaluation from which the
    smoothed dev accuracy stays at least ``target`` to the end; ``None`` if it does not end
    there."""
    values = getattr(curve, axis)
    if values is None:
        raise ValueError(f"the curve has no {axis} recorded")
    reached = None
    for x, acc in zip(values, curve.smoothed(window)):
        if acc < target:
            reached = None
        elif reached is None:
            reached = float(x)
    return reached


def spread(values: list[float | None]) -> dict:
    """Median, min and max, and how many seeds had no value. A missing value (a seed that
    never reached its target) ranks above every present one in the median: ignoring it would
    favour a method that reaches the target fast on some seeds and never on the others."""
    present = [v for v in values if v is not None]
    median = statistics.median([math.inf if v is None else v for v in values]) if values \
        else math.inf
    return {"median": None if math.isinf(median) else median,
            "min": min(present, default=None), "max": max(present, default=None),
            "n": len(present), "missing": len(values) - len(present)}


def to_target(method: dict[int, Curve], baseline: dict[int, Curve], axis: str = "queries",
              window: int = SMOOTH):
    """Per seed, the method's cost to reach the baseline's final smoothed dev accuracy (and
    stay there) over the baseline's own cost to reach it; and their spread. Seeds are the
    keys both share."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("the method and the baseline share no seed")
    per_seed = {}
    for seed in seeds:
        target = baseline[seed].smoothed(window)[-1]
        ours = first_reaching(method[seed], target, axis, window)
        theirs = first_reaching(baseline[seed], target, axis, window)
        per_seed[seed] = None if ours is None else ours / theirs
    return per_seed, spread(list(per_seed.values()))
