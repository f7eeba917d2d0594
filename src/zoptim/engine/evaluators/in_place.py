"""In-place evaluation: the parameters walk from point to point, the closure runs at each."""

from __future__ import annotations

from zoptim.engine.plan import Draw, StepPlan
from zoptim.engine.evaluators import Evaluation, Evaluator, Point


def seeds_of(points: list[Point]) -> list[int]:
    """The distinct seeds of ``points``, in order of first appearance."""
    return list(dict.fromkeys(pt[0] for pt in points if pt is not None))


class InPlace(Evaluator):
    """Moves every parameter to each point in turn (one write per tensor per move, only the
    scale changing when consecutive points share a seed) and calls the closure there; leaves
    the last point applied, which the update undoes in the same write as the step.

    A step opened by ``ask`` may have been walked part of the way by ``candidates``
    (``walk_to``): its evaluation continues from there."""

    name = "in place"
    walks = True

    def __init__(self):
        self._open: tuple[int, Point, Draw] | None = None  # (points walked, where, draw)

    def walk_to(self, plan: StepPlan, points: list[Point], index: int) -> None:
        """Put the model at ``points[index]``, walking on from where an open step left it."""
        done, at, draw = self._open or (0, None, plan.draw(seeds_of(points)))
        for i in range(done, index + 1):
            plan.shift_(draw, at, points[i])
            at = points[i]
        self._open = (index + 1, at, draw)

    def evaluate(self, plan, points, closure, wanted):
        done, at, draw = self._open or (0, None, plan.draw(seeds_of(points)))
        self._open = None
        values = []
        try:
            for i, (point, want) in enumerate(zip(points, wanted)):
                if i >= done:
                    plan.shift_(draw, at, point)
                    at = point
                values.append(float(closure()) if want else None)
        except BaseException:  # the closure raised: the parameters go back to where they were
            plan.shift_(draw, at, None)
            raise
        return Evaluation(values, [] if at is None else [(at[0], -at[1])], draw)
