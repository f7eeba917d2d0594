"""Evaluators: how a step's points are evaluated, behind one interface.

An estimator names points, each ``None`` (the current parameters) or ``(seed, scale)`` (every
parameter moved by ``scale * eps * z(seed)``); an evaluator evaluates them and says what it
left applied. Four exist:

- ``InPlace`` (``in_place``): walks the parameters from point to point, one write per tensor
  per move, and calls the closure at each point;
- ``BatchedQueries`` (``batched``): all points in one forward pass on a stacked batch, the
  perturbations applied to activations, the parameters never written;
- ``Offload`` (``offload``): streams the model's blocks from CPU memory, each block walking
  through the points while it is resident;
- ``Distributed`` (``distributed``): wraps any of the first two; each process evaluates its
  own points and one all-reduce of the values gives every process all of them.

The optimizer chooses one, once, with ``choose``; the step never asks which it has. What may
be combined is in one table, ``COMBINATIONS``; anything else is refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from zoptim.engine.plan import Draw, StepPlan, Undo
from zoptim.parts.estimators import Point


class EngineError(ValueError):
    """Engines, or an engine and a method, that cannot be combined; the message says why."""


@dataclass
class Evaluation:
    """What an evaluator returns: one value per point (``None`` where this process did not
    evaluate it), the shifts it left applied (``(seed, scale)``, undone by the update) and the
    coordinates it drew (``None`` when it drew none)."""
    values: list[float | None]
    left: list[tuple[int, float]]
    draw: Draw | None


class Evaluator:
    """The interface. ``begin`` prepares the plan's sets for a step, ``evaluate`` evaluates
    points, ``finish`` applies (or undoes) the step on the sets, ``replaying`` is the
    evaluator of a step redone from recorded values (the model is not run), ``skipping``
    the evaluator of a recorded step whose update was skipped."""

    name = "evaluator"
    hold_all = False  # hold every tensor's coordinates for the step (batched evaluation)
    # The parameters walk to each point, so a skipped step puts them back only to within the
    # rounding of the walk; a run makes that exact by rewinding through its journal.
    walks = False

    def partition(self, p):
        """The sets ``p`` may share a set with: only tensors of one partition move together."""
        return 0

    def placement(self, p) -> tuple:
        """The dtype and device ``p`` computes in during a step."""
        return p.dtype, p.device

    def check(self, plan: StepPlan) -> str | None:
        """Why this evaluator cannot serve ``plan`` (``None`` when it can)."""
        return None

    def begin(self, plan: StepPlan, step: int, seed: int, undo: Undo) -> None:
        plan.prepare(step, seed, undo)

    def evaluate(self, plan: StepPlan, points: list[Point], closure, wanted: list[bool]
                 ) -> Evaluation:
        raise NotImplementedError

    def evaluate_rows(self, plan: StepPlan, points: list[Point], closure, wanted: list[bool]
                      ) -> Evaluation:
        """Per-example points: point ``i`` perturbs example ``i`` of the batch alone, all in
        one pass of the batch. Only batched queries can (``engine.evaluators.batched``)."""
        raise EngineError(f"{self.name} evaluation cannot give each example of a batch its "
                          "own perturbation: that needs batched queries on one process "
                          "(the model given, not offloaded or distributed)")

    def finish(self, plan: StepPlan, apply: Callable[[list], None]) -> None:
        apply(plan.sets)

    def replaying(self) -> "Evaluator":
        return self

    def skipping(self) -> "Evaluator":
        """A recorded skipped step writes nothing: the parameters stay exactly as they were."""
        return Recorded()

    def reduce(self, values: list[float], everyone: bool = False) -> list[float]:
        """Values every process computed (on its share of the batch), made global."""
        return values


class Recorded(Evaluator):
    """A step redone from recorded values that needs no walk: nothing to evaluate and
    nothing left to undo (a batched step, a skipped step)."""

    name = "recorded"

    def evaluate(self, plan, points, closure, wanted):
        return Evaluation([None] * len(points), [], None)

    evaluate_rows = evaluate


# what may be combined: (the first engine, the other engine or a method's capability) -> why not
COMBINATIONS = {
    ("offload", "parallel"): "offloading and distributed training cannot be combined yet",
    ("offload", "after-update"): "{method} evaluates after its update; offloading serves "
                                 "methods whose update follows their evaluations",
    ("offload", "forward-mode"): "{method} takes forward-mode derivatives; offloading serves "
                                 "methods that evaluate points",
    ("ask", "batched"): "ask/tell moves the model in place on one process: build the "
                        "optimizer with batched=False",
    ("ask", "offload"): "ask/tell moves the model in place on one process: it cannot be "
                        "offloaded",
    ("ask", "parallel"): "ask/tell moves the model in place on one process: it cannot be "
                         "distributed",
    ("ask", "after-update"): "{method} evaluates again after its update; it has no ask/tell "
                             "form",
    ("ask", "forward-mode"): "{method} needs forward-mode derivatives; it has no ask/tell form",
    ("offload", "per-example"): "{method} perturbs each example through activations (batched "
                                "queries); offloaded blocks are probed in place",
    ("parallel", "per-example"): "{method} draws one direction per example of the whole batch; "
                                 "its values are not gathered across processes",
    ("ask", "per-example"): "{method} perturbs each example through activations; it has no "
                            "ask/tell form",
}


def _refuse(first: str, other: str, method: str, error=EngineError):
    raise error(COMBINATIONS[(first, other)].format(method=method))


def capabilities(opt) -> set[str]:
    """What a method declares about its step: ``after-update`` (it evaluates again after the
    update), ``forward-mode`` (its estimator takes forward-mode derivatives), ``per-example``
    (a direction per example of the batch: batched queries on one process only)."""
    caps = set()
    if opt.evaluates_after_update:
        caps.add("after-update")
    if getattr(opt.estimator, "forward_mode", False):
        caps.add("forward-mode")
    if opt.per_example_directions:
        caps.add("per-example")
    return caps


def choose(opt, *, batched=None, offload=None, parallel=None) -> Evaluator:
    """The evaluator of ``opt`` given its engines (each ``None`` or the engine object): the
    combination is checked against ``COMBINATIONS``."""
    from zoptim.engine.evaluators.distributed import Distributed
    from zoptim.engine.evaluators.in_place import InPlace

    name, caps = type(opt).__name__, capabilities(opt)
    engines = {"offload": offload, "parallel": parallel}
    for first, other in COMBINATIONS:
        if engines.get(first) is not None and (other in caps or engines.get(other) is not None):
            _refuse(first, other, name)
    if offload is not None:
        return offload  # it evaluates on a stacked batch of its own: batched is not used
    # evaluating after the update or by forward mode needs the parameters moved in place
    in_place_only = caps - {"per-example"}
    inner = batched if batched is not None and not in_place_only else InPlace()
    return inner if parallel is None else Distributed(inner, parallel)


def check_ask(opt) -> None:
    """Refuse ask/tell (``RuntimeError``) where the step cannot be opened and walked in place
    by its caller."""
    name = type(opt).__name__
    for cap in sorted(capabilities(opt)):
        _refuse("ask", cap, name, RuntimeError)
    for engine in ("batched", "offload", "parallel"):
        if getattr(opt, engine) is not None:
            _refuse("ask", engine, name, RuntimeError)
