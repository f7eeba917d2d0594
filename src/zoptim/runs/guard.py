"""The loss guard of a run: which steps are skipped before their update."""

from __future__ import annotations

import statistics

from zoptim.engine.optimizer import skip_non_finite


def level(values: list[float]) -> float:
    """A step's loss level: the median of its values, so that one perturbed point that blows
    up (a bad direction, not a bad model) does not decide."""
    return statistics.median(values)


class LossGuard:
    """Skips a step whose losses are not finite, or whose level (``level``) jumps above
    ``spike`` times the highest level among the run's first accepted step and the last
    ``window`` accepted steps (``spike = 0``: no jump test).

    The reference is a high water mark, not a median: late in an easy task the typical loss
    is small, and a hard batch is not a spike; a diverging model's loss leaves every level
    the run has seen far behind. ``decide`` judges a step's values before its update,
    ``observe`` records the outcome."""

    def __init__(self, spike: float, window: int, history: list[float] | None = None,
                 first: float | None = None):
        self.spike, self.window = spike, window
        self.history = list(history or [])
        self.first = first

    def decide(self, values: list[float]) -> str | None:
        if reason := skip_non_finite(values):
            return reason
        if self.spike and len(self.history) >= min(5, self.window):
            reference = max(self.history + ([] if self.first is None else [self.first]))
            now = level(values)
            if reference > 0 and now > self.spike * reference:
                return f"loss {now:.4g} above {self.spike:g} x the highest recent {reference:.4g}"
        return None

    def observe(self, values: list[float], skipped: str | None) -> None:
        if skipped is None:
            if self.first is None:
                self.first = level(values)
            self.history = (self.history + [level(values)])[-self.window:]

    def record(self) -> dict:
        """What a checkpoint keeps of the guard."""
        return {"guard_history": self.history, "guard_first": self.first}
