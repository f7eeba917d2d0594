"""The zeroth-order step, shared by every method.

``ZOOptimizer`` is a ``torch.optim.Optimizer`` whose ``step(closure)`` runs the pipeline

    spaces prepare -> estimator probes the closure -> per tensor: estimate in the space's
    coordinates -> transforms -> lift and apply

A method is a subclass that chooses an estimator and, per parameter group, a space and a
list of transforms. Seeds: step ``t`` uses ``mix(seed, t)``; its ``i``-th direction
``mix(step_seed, i)``; parameter ``j`` of that direction ``mix(direction_seed, j)``. Nothing
else is random, so a run is a function of its seed and its objective's values, and a step is
replayed exactly from the values it evaluated (``last_values``) without running the model.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from zoptim.noise import NOISE_KINDS, add_noise_many_, mix
from zoptim.parts.spaces import Space
from zoptim.parts.transforms import Transform


@dataclass
class _Slot:
    """One parameter in a step: its group's parts and its index for seeding."""
    p: torch.Tensor
    index: int
    group: dict
    space: Space
    chain: list[Transform]


@dataclass
class _Dense:
    """The slots of one group whose perturbation is whole-tensor noise (``Space`` itself):
    they move together, in one noise pass (one kernel launch per dtype on a GPU)."""
    group: dict
    kind: str
    slots: list[_Slot]

    def add_(self, seed: int, alpha: float) -> None:
        add_noise_many_([s.p for s in self.slots], [s.index for s in self.slots], seed, alpha,
                        self.kind)


def _split_dense(slots: list[_Slot]) -> tuple[list[_Dense], list[_Slot]]:
    dense: dict[int, _Dense] = {}
    rest = []
    for s in slots:
        if type(s.space).perturb_ is Space.perturb_:  # not overridden: whole-tensor noise
            d = dense.setdefault(id(s.group), _Dense(s.group, s.space.noise_kind, []))
            d.slots.append(s)
        else:
            rest.append(s)
    return list(dense.values()), rest


def walk(shift: Callable[[int, float], None], at, point):
    """Move from point ``at`` to ``point`` by ``shift(seed, scale)`` calls, one write when only
    the scale changes; returns ``point``, the new position."""
    if at is not None and point is not None and at[0] == point[0]:
        shift(at[0], point[1] - at[1])
    else:
        if at is not None:
            shift(at[0], -at[1])
        if point is not None:
            shift(*point)
    return point


@dataclass
class _Asked:
    """A step that ``ask`` opened: its points, slots and scratch, and how many of its points
    ``candidates`` has walked to (in place, the writes of a closure step)."""
    points: list
    slots: list[_Slot]
    scratch: dict
    walked: int = 0
    at: tuple | None = None


class _PointsOnly(Exception):
    def __init__(self, points):
        self.points = points


class _AskProbe:
    """Stops the estimator at its first request, capturing the points it names."""

    def evaluate_points(self, points):
        raise _PointsOnly(list(points))


class _Probe:
    """What an estimator may do to the model: shift along a direction, evaluate, count.

    Every value the objective returns is kept in ``values``; given ``replay`` (a step's
    recorded values), ``evaluate`` returns those instead of calling the closure, so the step's
    parameter arithmetic is redone exactly without the model being run."""

    def __init__(self, opt: "ZOOptimizer", slots: list[_Slot], scratch: dict, closure,
                 replay: list[float] | None = None):
        self.opt, self.slots, self.scratch, self.closure = opt, slots, scratch, closure
        self.dense, self.rest = _split_dense(slots)
        self.values: list[float] = []
        self._replay = None if replay is None else list(replay)

    def subset(self, slots: list[_Slot]) -> "_Probe":
        """The same probe restricted to ``slots`` (a part of the model moved on its own)."""
        part = _Probe(self.opt, slots, self.scratch, self.closure)
        part.values, part._replay = self.values, self._replay
        return part

    def shift(self, seed: int, scale: float) -> None:
        for d in self.dense:
            d.add_(seed, scale * d.group["eps"])
        for s in self.rest:
            s.space.perturb_(s.p, self.opt.state[s.p], mix(seed, s.index),
                             scale * s.group["eps"], self.scratch[s.p])

    def _record(self, compute: Callable[[], float], count: int = 1) -> float:
        if self._replay is not None:
            if not self._replay:
                raise ValueError("the recorded step has fewer values than the step evaluates")
            value = float(self._replay.pop(0))
        else:
            value = compute()
        self.opt.queries += count
        self.values.append(value)
        return value

    def _parallel(self):
        """The optimizer's ``Parallel`` while probing live (a replay runs on recorded values)."""
        return self.opt.parallel if self._replay is None else None

    def evaluate(self) -> float:
        par = self._parallel()
        if par is None:
            return self._record(lambda: float(self.closure()))
        return self._record(lambda: par.combine([float(self.closure())], everyone=True)[0])

    def evaluate_points(self, points: list) -> tuple[list[float], list[tuple[int, float]]]:
        """The objective at each point (``None``: the current parameters; ``(seed, scale)``:
        moved by ``scale * eps * z(seed)``), and the shifts left applied, which the update
        undoes. In place, the parameters move from point to point (one write when only the
        scale changes); batched, every point is one slice of a stacked forward pass and the
        parameters are never written. Across ranks (``zoptim.evaluators.distributed``), each rank
        evaluates its own points and one all-reduce gives every rank all the values."""
        par = self._parallel()
        mine = [par is None or par.owns(i) for i in range(len(points))]
        live = self._replay is None
        pending: list[tuple[int, float]] = []
        if self.opt.offload is not None and live:
            if par is not None:
                raise RuntimeError("offloading and distributed training cannot be combined yet")
            raw, pending = self.opt.offload.evaluate(self, points, self.opt._prepare_slots)
        elif self.opt.batched is not None:
            # batched: no shifts, and a replay needs the recorded values only
            own = [pt for pt, m in zip(points, mine) if m]
            got = iter(self.opt.batched.evaluate(self, own) if live and own else [])
            raw = [next(got) if m and live else None for m in mine]
        else:
            # ask/tell: the points ``candidates`` already walked to are not walked again
            asked = self.opt._asked
            done, at = (asked.walked, asked.at) if asked is not None else (0, None)
            raw = []
            for i, (point, m) in enumerate(zip(points, mine)):
                if i >= done:
                    at = walk(self.shift, at, point)
                raw.append(float(self.closure()) if m and live else None)
            pending = [] if at is None else [(at[0], -at[1])]
        values = raw if par is None else par.combine(raw)
        return [self._record(lambda v=v: v) for v in values], pending

    def leftover(self) -> int:
        """Recorded values a replayed step did not use (0 when not replaying)."""
        return len(self._replay or [])

    def directional(self, seed: int, derivative: Callable) -> tuple[float, float]:
        """``(f, grad f . eps z)`` from ``derivative(params, tangents)`` (one forward-mode pass,
        one query), recorded like evaluations."""
        result = []

        def compute():
            params = [s.p for s in self.slots]
            values = [float(v) for v in derivative(params, self.tangents(seed))]
            par = self._parallel()
            result.extend(values if par is None else par.combine(values, everyone=True))
            return result[0]

        loss = self._record(compute)
        d = self._record(lambda: result[1], count=0)
        return loss, d

    def tangents(self, seed: int) -> list[torch.Tensor]:
        """``eps * z(seed)`` for every parameter, materialized (forward-mode estimators)."""
        out = []
        for s in self.slots:
            t = torch.zeros_like(s.p)
            s.space.perturb_(t, self.opt.state[s.p], mix(seed, s.index), s.group["eps"],
                             self.scratch[s.p])
            out.append(t)
        return out


def skip_non_finite(values: list[float]) -> str | None:
    return None if all(math.isfinite(v) for v in values) else "non-finite loss"


def _check_group(group: dict) -> None:
    def bad(key, why):
        raise ValueError(f"{key}={group[key]!r} is invalid: {why}")

    if not group["lr"] >= 0:
        bad("lr", "the learning rate must be >= 0")
    if not group["eps"] > 0:
        bad("eps", "the perturbation scale must be > 0")
    if not group.get("weight_decay", 0.0) >= 0:
        bad("weight_decay", "weight decay must be >= 0")
    if group.get("noise", "gaussian") not in NOISE_KINDS:
        bad("noise", f"choose one of {NOISE_KINDS}")
    for key in ("rank", "resample_every"):
        if key in group and not (isinstance(group[key], int) and group[key] >= 1):
            bad(key, "must be an integer >= 1")
    for p in group["params"]:
        if not p.is_floating_point():
            raise ValueError("only floating-point parameters can be optimized")


class Counted:
    """Mixin for optimizers that count steps, queries and skipped steps and derive their seeds
    from ``seed``: ``state_dict()`` carries these in a ``zo`` entry, so a run restores them."""

    seed: int
    steps: int
    queries: int
    skipped: int

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


class ZOOptimizer(Counted, torch.optim.Optimizer):
    """Base of every zeroth-order optimizer. ``step(closure)`` needs a closure that returns the
    loss and never calls ``backward()``; ``queries`` counts the objective evaluations spent."""

    def __init__(self, params, defaults: dict, estimator, *, seed: int | None = None):
        defaults = {"weight_decay": 0.0, "noise": "gaussian", **defaults}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self.estimator = estimator
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.queries = 0
        self.steps = 0
        self.skipped = 0
        self.last_values: list[float] = []
        self.last_skip: str | None = None
        # Decides from a step's values, before the update, whether to skip it (returns the
        # reason); by default a step whose objective was not finite never touches the weights.
        self.guard: Callable[[list[float]], str | None] | None = skip_non_finite
        # Evaluates a step's points on one stacked batch (methods with low-rank spaces, given
        # the model); None: in place, one point at a time.
        self.batched = None
        # Shares each step's evaluations among processes (zoptim.evaluators.distributed.Parallel.attach).
        self.parallel = None
        # Streams the model's blocks from CPU memory (zoptim.evaluators.offload.Offload.attach).
        self.offload = None
        self._scratch: dict = {}
        self._asked: _Asked | None = None  # the step ``ask`` opened, until ``tell``

    # -- composition hooks: a method overrides these -------------------------------------
    def space(self, group: dict) -> Space:
        return Space(group["noise"])

    def transforms(self, group: dict) -> list[Transform]:
        return []

    # -- the step ---------------------------------------------------------------------------
    def _slots(self) -> list[_Slot]:
        """The parameters this step probes. A group whose ``lr`` is 0 is frozen: it is
        neither perturbed nor updated (its indices stay reserved, so seeds do not shift)."""
        slots, index = [], 0
        for group in self.param_groups:
            space, chain = self.space(group), self.transforms(group)
            for p in group["params"]:
                if group["lr"] != 0:
                    slots.append(_Slot(p, index, group, space, chain))
                index += 1
        return slots

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None, *,
             replay: list[float] | None = None) -> float:  # type: ignore[override]
        """One step; returns the loss the estimator reports. ``last_values`` then holds every
        value the objective returned, in order: given back as ``replay``, they redo the step
        bit for bit without a closure (a journal replays a run this way)."""
        if closure is None and replay is None:
            raise ValueError("a zeroth-order optimizer needs a closure that returns the loss")
        if self._asked is not None and closure is not None:
            raise RuntimeError("a step was asked for and not told: finish it with tell()")
        streaming = self.offload is not None and replay is None
        if self._asked is not None:  # told: the asked step's slots, already prepared
            slots, scratch = self._asked.slots, self._asked.scratch
            self._scratch = scratch
        else:
            slots = self._slots()
            self._scratch = scratch = {s.p: {} for s in slots}
            # Streamed parameters are prepared, and updated, when they are next on the device.
            if self.offload is not None and not streaming:
                self.offload.flush()
            self._prepare_slots([s for s in slots if not (streaming and self.offload.holds(s.p))])
        if self.batched is not None:
            _, reason = self.batched.plan(slots)
            if reason is not None:
                warnings.warn(f"batched queries: {reason}; evaluating the queries in place "
                              "instead (pass batched=False to silence this)", stacklevel=2)
                self.batched = None
        probe = _Probe(self, slots, scratch, closure, replay)
        try:
            loss, dirs, pending = self.estimator(probe, self.step_seed(self.steps))
        finally:
            self._asked = None
        reason = self.guard(probe.values) if self.guard is not None else None

        def finish(part: _Probe) -> None:
            if reason is None:
                self._update(part, dirs, pending)
            else:  # undo the probing, leave parameters and state as they were
                for seed, scale in pending:
                    part.shift(seed, scale)

        if streaming:
            held = [s for s in slots if self.offload.holds(s.p)]
            finish(probe.subset([s for s in slots if not self.offload.holds(s.p)]))
            self.offload.defer(held, lambda part: finish(probe.subset(part)))
        else:
            finish(probe)
        if reason is None:
            self._after_update(probe, dirs, loss)
        else:
            self.skipped += 1
        self.steps += 1
        self.last_values, self.last_skip = probe.values, reason
        if probe.leftover():
            raise ValueError("the recorded step has more values than the step evaluates: "
                             "it was recorded with another method or configuration")
        return loss

    # -- ask / tell: the objective answers outside the step ------------------------------
    @torch.no_grad()
    def ask(self) -> list:
        """Open the next step and return its candidates, each ``None`` (the current
        parameters) or ``(seed, scale)`` (moved by ``scale * eps * z(seed)``): seeds, nothing
        stored. Iterate ``candidates()`` to put the model at each in turn, then ``tell`` the
        values, ranking or comparisons. The same seeds give the same parameters as ``step``."""
        if self._asked is not None:
            return list(self._asked.points)
        if self.batched is not None or self.offload is not None or self.parallel is not None:
            raise RuntimeError("ask/tell moves the model in place on one process: build the "
                               "optimizer with batched=False and without offloading or "
                               "distributed training")
        if type(self)._after_update is not ZOOptimizer._after_update:
            raise RuntimeError(f"{type(self).__name__} evaluates again after its update; it "
                               "has no ask/tell form")
        try:
            self.estimator(_AskProbe(), self.step_seed(self.steps))
            raise RuntimeError("the estimator named no points")
        except _PointsOnly as asked:
            points = asked.points
        except AttributeError as err:  # a forward-mode estimator: no points to name
            raise RuntimeError(f"{type(self).__name__} needs forward-mode derivatives; it has "
                               "no ask/tell form") from err
        slots = self._slots()
        self._scratch = {s.p: {} for s in slots}
        self._prepare_slots(slots)
        self._asked = _Asked(points, slots, self._scratch)
        return list(points)

    @torch.no_grad()
    def candidates(self):
        """Put the model at each asked candidate in turn (yields its index); the model is left
        at the last one until ``tell``."""
        asked = self._asked
        if asked is None:
            raise RuntimeError("no step was asked for: call ask() first")
        probe = _Probe(self, asked.slots, asked.scratch, None)
        for i in range(asked.walked, len(asked.points)):
            asked.at = walk(probe.shift, asked.at, asked.points[i])
            asked.walked = i + 1
            yield i

    def tell(self, values: list[float] | None = None, *, ranking: list[int] | None = None,
             better: list[int] | None = None) -> float:
        """Finish the asked step from the objective's answers, one of: ``values`` (one per
        candidate, lower is better), ``ranking`` (candidate indices, best first) or ``better``
        (per consecutive pair of candidates, 0 or 1: which of the two is better). Rankings
        and comparisons become places (0 best), which the ordinal methods read."""
        asked = self._asked
        if asked is None:
            raise RuntimeError("no step was asked for: call ask() first")
        n = len(asked.points)
        if sum(a is not None for a in (values, ranking, better)) != 1:
            raise ValueError("tell one of values=, ranking= or better=")
        if ranking is not None:
            if sorted(ranking) != list(range(n)):
                raise ValueError(f"ranking must order all {n} candidates (indices 0..{n - 1}, "
                                 f"each once), got {ranking}")
            values = [0.0] * n
            for place, k in enumerate(ranking):
                values[k] = float(place)
        elif better is not None:
            if n % 2 or len(better) != n // 2 or any(b not in (0, 1) for b in better):
                raise ValueError(f"better must give 0 or 1 for each of the {n // 2} pairs of "
                                 f"candidates, got {better}")
            values = [float(v) for b in better for v in ((0, 1) if b == 0 else (1, 0))]
        elif len(values) != n:
            raise ValueError(f"{n} candidates were asked for, {len(values)} values told")
        return self.step(replay=[float(v) for v in values])

    def _prepare_slots(self, slots: list[_Slot]) -> None:
        """The spaces' preparation for this step (factors resampled on schedule), carrying
        coordinate state over to new factors."""
        for s in slots:
            state = self.state[s.p]
            transfer = s.space.prepare(s.p, state, self.steps, mix(self.seed, s.index),
                                       self._scratch[s.p])
            if transfer is not None:
                for t in s.chain:
                    for name in t.carried:
                        if name in state:
                            state[name] = transfer(state[name])

    @staticmethod
    def _coefs(slot: _Slot, dirs) -> list[float]:
        """Per-direction gradient coefficients of one tensor: ``diff / eps``, averaged."""
        return [d.diff / slot.group["eps"] / len(dirs) for d in dirs]

    @staticmethod
    def _fusable(s: _Slot) -> bool:
        return s.space.linear and not s.chain and s.group["weight_decay"] == 0

    def _fused_weights(self, s: _Slot, dirs, pending) -> dict[int, float]:
        """Restore and update as one weight per direction seed: applied in one pass each, a
        MeZO step writes every tensor three times in all."""
        lr, eps = s.group["lr"], s.group["eps"]
        weights = {d.seed: -lr * c for d, c in zip(dirs, self._coefs(s, dirs))}
        for seed, scale in pending:
            weights[seed] = weights.get(seed, 0.0) + scale * eps
        return weights

    def _update(self, probe: _Probe, dirs, pending) -> None:
        done = set()
        for d in probe.dense:
            if self._fusable(d.slots[0]):  # the group decides, so one slot speaks for all
                for seed, w in self._fused_weights(d.slots[0], dirs, pending).items():
                    d.add_(seed, w)
                done.update(id(s) for s in d.slots)
        # Estimates in compact coordinates are kept until all are known, so that a chain's
        # transforms run on them together (one Newton-Schulz for all same-shaped matrices).
        held: dict[int, list] = defaultdict(list)
        for s in probe.slots:
            if id(s) in done:
                continue
            state, scratch = self.state[s.p], probe.scratch[s.p]
            eps = s.group["eps"]
            keys = [mix(d.seed, s.index) for d in dirs]
            coefs = self._coefs(s, dirs)
            restore = [(mix(seed, s.index), scale * eps) for seed, scale in pending]
            if self._fusable(s):
                weights = self._fused_weights(s, dirs, pending)
                s.space.add_directions_(s.p, state, [mix(k, s.index) for k in weights],
                                        list(weights.values()), scratch)
                continue
            for key, a in restore:
                s.space.perturb_(s.p, state, key, a, scratch)
            g = s.space.estimate(s.p, state, keys, coefs, dirs, eps, scratch)
            if s.space.compact and s.chain:
                held[id(s.chain)].append((s, g))
                continue
            for t in s.chain:
                g = t(g, state)
            self._apply(s, g)
        for items in held.values():
            gs = [g for _, g in items]
            for t in items[0][0].chain:
                gs = t.many(gs, [self.state[s.p] for s, _ in items])
            for (s, _), g in zip(items, gs):
                self._apply(s, g)

    def _apply(self, s: _Slot, g: torch.Tensor) -> None:
        """``p <- p - lr (lift(g) + wd p)``: the update direction ``g`` in ``s``'s coordinates."""
        lr, wd = s.group["lr"], s.group["weight_decay"]
        if wd:
            s.p.mul_(1.0 - lr * wd)
        s.space.add_lifted_(s.p, self.state[s.p], g, -lr)

    def _after_update(self, probe: _Probe, dirs, loss: float) -> None:
        """Hook for methods that probe again after the update (conservative ZO-SGD)."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "estimator"):
            _check_group(self.param_groups[-1])


def split_matrices(params, defaults: dict, vector_settings: Callable[[dict], dict]) -> list[dict]:
    """Split parameters (or groups) into matrices (two or more dimensions) and vectors, as the
    subspace methods treat them differently. ``vector_settings(settings)`` gives the overrides
    of a group's vector half from its settings (the group's over ``defaults``). Empty halves
    are dropped."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        ps = list(group["params"])
        rest = {k: v for k, v in group.items() if k != "params"}
        mats = [p for p in ps if p.dim() >= 2]
        vecs = [p for p in ps if p.dim() < 2]
        if mats:
            out.append({**rest, "params": mats, "matrix": True})
        if vecs:
            out.append({**rest, **vector_settings({**defaults, **rest}), "params": vecs,
                        "matrix": False})
    if not out:
        raise ValueError("optimizer got an empty parameter list")
    return out
