"""The zeroth-order step, shared by every method.

``ZOOptimizer`` is a ``torch.optim.Optimizer`` whose ``step(closure)`` runs the pipeline

    plan (built once) -> evaluator.begin (factors on schedule) -> estimator names points ->
    evaluator evaluates them -> guard -> per set: estimate, transforms, lift and apply

A method is a subclass that chooses an estimator and, per parameter group, a space and a
chain of transforms. Seeds: step ``t`` uses ``mix(seed, t)``; its ``i``-th direction
``mix(step_seed, i)``; parameter ``j`` of that direction ``mix(direction_seed, j)``. Nothing
else is random, so a run is a function of its seed and its objective's values, and a step is
replayed exactly from the values it evaluated (``last_values``) without running the model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from zoptim.parts import settings
from zoptim.engine.plan import Draw, Slot, StepPlan, TensorSet, Undo
from zoptim.engine.evaluators import EngineError, Evaluator, check_ask, choose
from zoptim.engine.evaluators.batched import BatchedQueries
from zoptim.engine.evaluators.in_place import InPlace, seeds_of
from zoptim.noise import mix
from zoptim.parts.spaces import Dense, Space
from zoptim.parts.transforms import Transform

_GUARD = object()  # step(skip=...) not given: the guard decides


def skip_non_finite(values: list[float]) -> str | None:
    return None if all(math.isfinite(v) for v in values) else "non-finite loss"


class Counted:
    """Mixin for optimizers that count steps, queries (objective evaluations) and skipped
    steps and derive their seeds from ``seed``: ``state_dict()`` carries these in a ``zo``
    entry, so a run restores them."""

    seed: int
    steps: int
    queries: int
    skipped: int

    def _start_counting(self, seed: int | None) -> None:
        """A random seed unless one is given, and every counter at zero."""
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.queries = self.steps = self.skipped = 0
        self.last_values: list[float] = []
        self.last_skip: str | None = None

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = {"seed": self.seed, "steps": self.steps, "queries": self.queries,
                    "skipped": self.skipped}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("not a zoptim optimizer state: the 'zo' entry is missing")
        super().load_state_dict(state_dict)
        self.seed, self.steps, self.queries = int(zo["seed"]), int(zo["steps"]), int(zo["queries"])
        self.skipped = int(zo.get("skipped", 0))

    def step_seed(self, step: int) -> int:
        """The seed every direction of step ``step`` derives from."""
        return mix(self.seed, step)


class _PointsOnly(Exception):
    def __init__(self, points):
        self.points = points


class _AskProbe:
    """Stops the estimator at its first request, capturing the points it names."""

    def evaluate_points(self, points):
        raise _PointsOnly(list(points))


@dataclass
class _Open:
    """A step that ``ask`` opened, until ``tell``."""
    points: list
    plan: StepPlan
    undo: Undo
    evaluator: InPlace


class Probe:
    """What an estimator may ask of a step: evaluate points, evaluate where the parameters
    are, take a forward-mode derivative. Every value is kept in ``values``; given ``replay``
    (a step's recorded values), those are returned instead and the model is not run, while
    the parameter arithmetic (in-place walks included) is redone exactly."""

    def __init__(self, opt: "ZOOptimizer", plan: StepPlan, evaluator: Evaluator, closure,
                 replay: list[float] | None):
        self.opt, self.plan, self.evaluator, self.closure = opt, plan, evaluator, closure
        self.values: list[float] = []
        self.draw: Draw | None = None
        self._replay = None if replay is None else list(replay)

    @property
    def live(self) -> bool:
        return self._replay is None

    def _record(self, value: float | None, count: int = 1) -> float:
        if self._replay is not None:
            if not self._replay:
                raise ValueError("the recorded step has fewer values than the step evaluates")
            value = float(self._replay.pop(0))
        self.opt.queries += count
        self.values.append(value)
        return value

    def evaluate_points(self, points: list) -> tuple[list[float], list[tuple[int, float]]]:
        """The objective at each point and the shifts left applied (see ``engine.evaluators``)."""
        ev = self._evaluated(points, self.closure)
        return [self._record(v) for v in ev.values], ev.left

    def evaluate_rows(self, points: list) -> tuple[list[float], list[tuple[int, float]]]:
        """Per-example points: point ``i`` perturbs example ``i`` of the batch alone, the
        batch evaluated once (one query, whatever its size), and the value of point ``i`` is
        its example's (the closure's ``per_slice`` value of example ``i``). Each value is
        recorded, so the step replays. Batched queries only (``engine.evaluators.batched``)."""
        ev = self._evaluated(points, self.closure, self.evaluator.evaluate_rows)
        return [self._record(v, count=int(i == 0)) for i, v in enumerate(ev.values)], ev.left

    def _evaluated(self, points: list, closure, evaluate=None):
        """The evaluator's ``Evaluation`` of ``points`` (live or replayed), its draw kept."""
        evaluate = evaluate or self.evaluator.evaluate
        ev = evaluate(self.plan, points, closure, [self.live] * len(points))
        if ev.draw is not None:
            self.draw = ev.draw if self.draw is None else self.draw.merge(ev.draw)
        return ev

    def evaluate_examples(self, points: list) -> tuple[list[list[float]],
                                                       list[tuple[int, float]]]:
        """Like ``evaluate_points``, but each point's value is the list of its batch's
        per-example values: the closure is called with ``per_example=True`` and returns one
        value per example (``(slices, batch)`` under batched queries), whose mean is the
        point's loss. Every per-example value is recorded (one query a point), so a step that
        asks for them once replays from its record. Not across processes, each of which
        holds only its own points' values."""
        from zoptim.engine.evaluators.distributed import Distributed

        if isinstance(self.evaluator, Distributed):
            raise EngineError("per-example values are not gathered across processes: run "
                              "on one process")
        if not self.live and len(self._replay) % len(points):
            raise ValueError("the recorded step's values do not split into its points")
        rows: list[torch.Tensor] = []

        def per_example(*args):
            out = torch.as_tensor(self.closure(*args, per_example=True)).detach()
            stacked = bool(args) and args[0] is not None
            rows.append(out.reshape(args[0] if stacked else 1, -1).double())
            return rows[-1].mean(1) if stacked else rows[-1].mean()

        ev = self._evaluated(points, per_example)
        table = torch.cat(rows).tolist() if self.live else \
            [[None] * (len(self._replay) // len(points))] * len(points)
        return [[self._record(v, count=int(i == 0)) for i, v in enumerate(row)]
                for row in table], ev.left

    def evaluate(self) -> float:
        """The objective where the parameters are now (one query)."""
        value = self.evaluator.reduce([float(self.closure())], everyone=True)[0] \
            if self.live else None
        return self._record(value)

    def directional(self, seed: int, derivative: Callable) -> tuple[float, float]:
        """``(f, grad f . eps z)`` from ``derivative(params, tangents)`` (one forward-mode
        pass, one query), recorded like evaluations."""
        got = [None, None]
        if self.live:
            params = [s.p for s in self.plan.slots]
            got = self.evaluator.reduce([float(v) for v in derivative(params,
                                                                      self.tangents(seed))],
                                        everyone=True)
        return self._record(got[0]), self._record(got[1], count=0)

    def tangents(self, seed: int) -> list[torch.Tensor]:
        """``eps * z(seed)`` for every parameter, materialized (forward-mode estimators)."""
        out = []
        for s in self.plan.slots:
            t = torch.zeros_like(s.p)
            s.space.perturb_(t, self.opt.state[s.p], mix(seed, s.index), s.group["eps"], {})
            out.append(t)
        return out

    def leftover(self) -> int:
        """Recorded values a replayed step did not use (0 when not replaying)."""
        return len(self._replay or [])


class ZOOptimizer(Counted, torch.optim.Optimizer):
    """Base of every zeroth-order optimizer. ``step(closure)`` needs a closure that returns the
    loss and never calls ``backward()``; ``queries`` counts the objective evaluations spent.

    Args:
        params: tensors or parameter groups (dicts), as for any ``torch.optim`` optimizer.
        defaults: the method's settings, checked by ``parts.settings``.
        estimator: how evaluations become directional derivatives (``parts.estimators``).
        seed: every direction derives from it (random when ``None``).
        foreach: write each set of same-shaped tensors with one lifted ``bmm`` and one
            ``_foreach_add_`` (few launches) instead of one call per tensor. ``None``: on
            CUDA, as ``torch.optim`` chooses, and under batched queries (one write a step,
            which costs the same either way on a CPU; in place, five writes a step through
            the lift buffer cost 10-15% more there).
    """

    # A method that evaluates again after its update (conservative ZO-SGD) says so: it cannot
    # be offloaded or asked/told.
    evaluates_after_update = False
    # Whether the method takes the model: "required" (forward-mode derivatives, per-example
    # directions), "optional" (it turns batched queries on) or None.
    uses_model: str | None = None
    # A method that perturbs each example on its own (GRZO) has no in-place form: a model
    # batched queries cannot serve is refused, not evaluated in place.
    per_example_directions = False

    def __init__(self, params, defaults: dict, estimator, *, seed: int | None = None,
                 foreach: bool | None = None):
        defaults = settings.checked({"weight_decay": 0.0, "noise": "gaussian", **defaults})
        super().__init__(params, defaults)
        self.estimator = estimator
        self.foreach = foreach
        self._start_counting(seed)
        # Decides from a step's values, before the update, whether to skip it (returns the
        # reason); by default a step whose objective was not finite never touches the weights.
        self.guard: Callable[[list[float]], str | None] | None = skip_non_finite
        self._engines: dict = {}
        self.evaluator: Evaluator = choose(self)
        self._plan: tuple[tuple, StepPlan] | None = None
        self._open: _Open | None = None

    # -- composition hooks: a method overrides these -------------------------------------
    def space(self, group: dict) -> Space:
        return Dense(group["noise"])

    def transforms(self, group: dict) -> list[Transform]:
        return []

    def step_memory(self, group: dict) -> float:
        """How many steps' worth of squared displacement a step's noise causes over a run, as
        the group's transforms carry it into later steps (``Transform.memory``; 1 for a plain
        step): what ``lr = "auto"`` multiplies one step's measured cost by."""
        chain, memory = self.transforms(group), 1.0
        for i, t in enumerate(chain):
            memory *= t.memory(chain[i + 1:])
        return memory

    def coefficients(self, group: dict, dirs) -> list[float]:
        """Per-direction gradient coefficients of a group's tensors: ``diff / eps``, averaged
        (``diff`` alone where the estimator's are normalized, so already free of ``eps``)."""
        scale = 1.0 if getattr(self.estimator, "unit_free", False) else group["eps"]
        return [d.diff / scale / len(dirs) for d in dirs]

    # -- engines ----------------------------------------------------------------------------
    def use(self, **engines) -> None:
        """Attach engines (``batched=``, ``offload=``, ``parallel=``; ``None`` detaches one)
        and choose the evaluator anew; ``Offload.attach`` and ``Parallel.attach`` call it."""
        self._engines.update(engines)
        self.evaluator = choose(self, **self._engines)
        self._plan = None

    def batch_queries(self, model: torch.nn.Module | None, batched: bool | None = None,
                      max_slices: int | None = None) -> None:
        """Evaluate each step's queries as one forward pass of ``model`` on a stacked batch
        (``engine.evaluators.batched``), for a method that can (``uses_model``). ``batched``:
        ``None`` batches when a model is given, ``False`` keeps in-place evaluation, ``True``
        requires the model; ``max_slices`` bounds the queries stacked in one pass."""
        settings.check("max_slices", max_slices)
        if batched and model is None:
            raise ValueError("batched queries need the model the closure runs: pass model=")
        if model is not None and batched is not False:
            self.use(batched=BatchedQueries(model, max_slices))

    @property
    def batched(self):
        """The batched-queries engine in use, or ``None``."""
        return self._engine_in_use("batched")

    @property
    def offload(self):
        return self._engine_in_use("offload")

    @property
    def parallel(self):
        return self._engines.get("parallel")

    def _engine_in_use(self, name: str):
        engine = self._engines.get(name)
        ev = getattr(self.evaluator, "inner", self.evaluator)
        return engine if engine is not None and ev is engine else None

    # -- the plan ---------------------------------------------------------------------------
    def _slots(self) -> list[Slot]:
        """The parameters a step probes. A group whose ``lr`` is 0 is frozen: it is neither
        perturbed nor updated (its indices stay reserved, so seeds do not shift)."""
        slots, index = [], 0
        for group in self.param_groups:
            space, chain = self.space(group), self.transforms(group)
            for p in group["params"]:
                if group["lr"] != 0:
                    slots.append(Slot(p, index, group, space, chain))
                index += 1
        return slots

    def _signature(self) -> tuple:
        groups = tuple((tuple((id(p), p.dtype, p.device, p.shape) for p in g["params"]),
                        g["lr"] == 0,
                        repr(sorted((k, v) for k, v in g.items() if k not in ("params", "lr"))))
                       for g in self.param_groups)
        return (id(self.evaluator), id(self.state), groups)

    def plan(self) -> StepPlan:
        """The step plan (built again only when groups, settings, engines or state change).
        An evaluator that cannot serve the plan is replaced by in-place evaluation, with a
        warning that says why."""
        key = self._signature()
        if self._plan is None or self._plan[0] != key:
            slots = self._slots()
            plan = self._build(slots)
            reason = self.evaluator.check(plan)
            if reason is not None and self.per_example_directions:
                raise EngineError(f"{type(self).__name__} perturbs each example through "
                                  f"activations (batched queries), and {reason}")
            if reason is not None:
                warnings.warn(f"batched queries: {reason}; evaluating the queries in place "
                              "instead (pass batched=False to silence this)", stacklevel=3)
                self.use(batched=None)
                plan = self._build(slots)
                key = self._signature()
            self._plan = (key, plan)
        return self._plan[1]

    def _build(self, slots) -> StepPlan:
        foreach = self.foreach
        if foreach is None:
            foreach = bool(slots) and slots[0].p.is_cuda or self.evaluator.hold_all
        return StepPlan.build(slots, self.state, partition=self.evaluator.partition,
                              placement=self.evaluator.placement,
                              hold_all=self.evaluator.hold_all, foreach=foreach)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None, *,
             replay: list[float] | None = None, skip=_GUARD) -> float:  # type: ignore[override]
        """One step; returns the loss the estimator reports. ``last_values`` then holds every
        value the objective returned, in order: given back as ``replay``, they redo the step
        bit for bit without a closure (a journal replays a run this way). ``skip`` overrides
        the guard with a recorded decision (the reason, or ``None`` to apply the update)."""
        if closure is None and replay is None:
            raise ValueError("a zeroth-order optimizer needs a closure that returns the loss")
        if self._open is not None and closure is not None:
            raise RuntimeError("a step was asked for and not told: finish it with tell()")
        plan, undo, evaluator = self._begin(replay, skip)
        probe = Probe(self, plan, evaluator, closure, replay)
        try:
            loss, dirs, left = self.estimator(probe, self.step_seed(self.steps))
        except BaseException:  # the evaluator put the parameters back; the state goes back too
            undo.restore()
            raise
        finally:
            self._open = None
        if skip is _GUARD:
            skip = self.guard(probe.values) if self.guard is not None else None
        if skip is None:
            evaluator.finish(plan, lambda sets: self._update(plan, sets, probe.draw, dirs, left))
            self._after_update(probe, dirs, loss)
        else:  # undo the probing: parameters and state as they were
            evaluator.finish(plan, lambda sets: self._restore(plan, sets, probe.draw, left))
            undo.restore()
            self.skipped += 1
        self.steps += 1
        self.last_values, self.last_skip = probe.values, skip
        if probe.leftover():
            raise ValueError("the recorded step has more values than the step evaluates: "
                             "it was recorded with another method or configuration")
        return loss

    def _begin(self, replay: list[float] | None, skip) -> tuple[StepPlan, Undo, Evaluator]:
        """The step's plan, its undo record and its evaluator, prepared: the live one, one
        that replays recorded values, or for a recorded step that was skipped, one that leaves
        the parameters as they are."""
        if self._open is not None:  # told: the step ask opened, prepared then
            return self._open.plan, self._open.undo, self._open.evaluator
        plan, undo = self.plan(), Undo()
        evaluator = self.evaluator
        if replay is not None:
            recorded_skip = skip is not _GUARD and skip is not None
            evaluator = evaluator.skipping() if recorded_skip else evaluator.replaying()
        evaluator.begin(plan, self.steps, self.seed, undo)
        return plan, undo, evaluator

    @staticmethod
    def _drawn(plan: StepPlan, sets: list[TensorSet], draw: Draw | None,
               seeds: list[int]) -> Draw:
        """``draw``, completed with the coordinates of the sets it lacks (a replayed step, a
        batched step whose evaluation drew them in chunks)."""
        if draw is None:
            draw = Draw(seeds_of([(s, 1.0) for s in seeds]))
        missing = [s for s in sets if s not in draw.coords]
        if missing and draw.seeds:
            draw.merge(plan.draw(draw.seeds, missing))
        return draw

    def _update(self, plan: StepPlan, sets: list[TensorSet], draw: Draw | None, dirs,
                left) -> None:
        seeds = [d.seed for d in dirs]
        draw = self._drawn(plan, sets, draw, seeds + [s for s, _ in left])
        for s in sets:
            s.update_(draw, dirs, self.coefficients(s.group, dirs), left)

    def _restore(self, plan: StepPlan, sets: list[TensorSet], draw: Draw | None,
                 left) -> None:
        if not left:
            return
        draw = self._drawn(plan, sets, draw, [s for s, _ in left])
        for s in sets:
            s.add_directions_(draw, {seed: scale * s.group["eps"] for seed, scale in left})

    def move(self, probe: Probe, dirs, factor: float) -> None:
        """Move every tensor by ``factor * lr * g``, ``g`` the step's estimate (no
        transforms): the probes of methods that evaluate after their update."""
        sets = probe.plan.sets
        draw = self._drawn(probe.plan, sets, probe.draw, [d.seed for d in dirs])
        for s in sets:
            coefs = self.coefficients(s.group, dirs)
            s.add_directions_(draw, {d.seed: factor * s.group["lr"] * c
                                     for d, c in zip(dirs, coefs)})

    def _after_update(self, probe: Probe, dirs, loss: float) -> None:
        """Hook for methods that evaluate again after the update (``evaluates_after_update``)."""

    # -- ask / tell: the objective answers outside the step ------------------------------
    @torch.no_grad()
    def ask(self) -> list:
        """Open the next step and return its candidates, each ``None`` (the current
        parameters) or ``(seed, scale)`` (moved by ``scale * eps * z(seed)``): seeds, nothing
        stored. Iterate ``candidates()`` to put the model at each in turn, then ``tell`` the
        values, ranking or comparisons. The same seeds give the same parameters as ``step``."""
        if self._open is not None:
            return list(self._open.points)
        check_ask(self)
        try:
            self.estimator(_AskProbe(), self.step_seed(self.steps))
            raise RuntimeError("the estimator named no points")
        except _PointsOnly as asked:
            points = asked.points
        plan, undo = self.plan(), Undo()
        evaluator = InPlace()
        evaluator.begin(plan, self.steps, self.seed, undo)
        self._open = _Open(points, plan, undo, evaluator)
        return list(points)

    @torch.no_grad()
    def candidates(self):
        """Put the model at each asked candidate in turn (yields its index); the model is left
        at the last one until ``tell``."""
        opened = self._open
        if opened is None:
            raise RuntimeError("no step was asked for: call ask() first")
        start = opened.evaluator._open[0] if opened.evaluator._open else 0
        for i in range(start, len(opened.points)):
            opened.evaluator.walk_to(opened.plan, opened.points, i)
            yield i

    def tell(self, values: list[float] | None = None, *, ranking: list[int] | None = None,
             better: list[int] | None = None) -> float:
        """Finish the asked step from the objective's answers, one of: ``values`` (one per
        candidate, lower is better), ``ranking`` (candidate indices, best first) or ``better``
        (per consecutive pair of candidates, 0 or 1: which of the two is better). Rankings
        and comparisons become places (0 best), which the ordinal methods read."""
        opened = self._open
        if opened is None:
            raise RuntimeError("no step was asked for: call ask() first")
        return self.step(replay=told_values(len(opened.points), values, ranking, better))

    # -- settings ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].update(settings.checked(self.param_groups[-1]))
        for p in self.param_groups[-1]["params"]:
            if not p.is_floating_point():
                raise ValueError("only floating-point parameters can be optimized")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plan = None  # the states are new objects: the sets read them again


def told_values(n: int, values, ranking, better) -> list[float]:
    """The values of ``n`` candidates from one of ``values``, ``ranking`` or ``better``."""
    if sum(a is not None for a in (values, ranking, better)) != 1:
        raise ValueError("tell one of values=, ranking= or better=")
    if ranking is not None:
        return _places(n, ranking)
    if better is not None:
        return _pair_places(n, better)
    if len(values) != n:
        raise ValueError(f"{n} candidates were asked for, {len(values)} values told")
    return [float(v) for v in values]


def _places(n: int, ranking: list[int]) -> list[float]:
    """Each candidate's place (0 best) from a ranking of all of them, best first."""
    if sorted(ranking) != list(range(n)):
        raise ValueError(f"ranking must order all {n} candidates (indices 0..{n - 1}, "
                         f"each once), got {ranking}")
    places = [0.0] * n
    for place, k in enumerate(ranking):
        places[k] = float(place)
    return places


def _pair_places(n: int, better: list[int]) -> list[float]:
    """Places within each consecutive pair from which of the two is better (0 or 1)."""
    if n % 2 or len(better) != n // 2 or any(b not in (0, 1) for b in better):
        raise ValueError(f"better must give 0 or 1 for each of the {n // 2} pairs of "
                         f"candidates, got {better}")
    return [float(v) for b in better for v in ((0, 1) if b == 0 else (1, 0))]


def split_matrices(params, defaults: dict, vector_settings: Callable[[dict], dict]) -> list[dict]:
    """Split parameters (or groups) into matrices (two or more dimensions) and vectors, as the
    subspace methods treat them differently. ``vector_settings(settings)`` gives the overrides
    of a group's vector half from its settings (the group's over ``defaults``). Empty halves
    are dropped."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = [half for group in groups for half in _halves(group, defaults, vector_settings)]
    if not out:
        raise ValueError("optimizer got an empty parameter list")
    return out


def _halves(group: dict, defaults: dict, vector_settings) -> list[dict]:
    """A group's matrices and its vectors, as two groups (an empty one dropped). A group
    marked ``dense`` (embeddings, say) goes to the vectors' side whatever its tensors' shape."""
    rest = {k: v for k, v in group.items() if k != "params"}
    dense = bool(rest.get("dense", False))
    sides: dict[bool, list] = {True: [], False: []}
    for p in group["params"]:
        sides[p.dim() >= 2 and not dense].append(p)
    halves = ((sides[True], {"matrix": True}),
              (sides[False], {**vector_settings({**defaults, **rest}), "matrix": False}))
    return [{**rest, **extra, "params": half} for half, extra in halves if half]
