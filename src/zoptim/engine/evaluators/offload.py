"""Offloading: train a model larger than the GPU by streaming its blocks, as ZO2 does (Wang et
al., 2024, "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with
Limited GPU Memory"), for every method whose update is applied once after its evaluations.

The parameters of the model's repeated blocks (a transformer's layer list, found generically)
live in CPU memory (pinned when the working device is a GPU); everything else stays on the
working device. A step's evaluation points are evaluated in one pass over the model on a batch
stacked once per point (the closure API of batched queries: ``closure(slices)``, see
``zoptim.engine.evaluators.batched``). Each block, when its turn comes:

1. arrives on the working device (uploaded on a side stream while the previous block computes),
2. applies the previous step's update and this step's preparation, deferred until now,
3. runs every slice of the stacked batch at that slice's point, moving its own parameters in
   place from point to point, exactly the writes of in-place probing,
4. goes back to CPU memory.

So every block is transferred once per step and the trajectory is the same, write for write,
as resident in-place training. ``flush()`` applies the deferred updates (checkpoints and
evaluations call it). Parameters outside the blocks (embeddings, final norm, head) are resident
and walk through the points the same way.
"""

from __future__ import annotations

from collections import Counter

import torch

from zoptim.engine.plan import Draw
from zoptim.engine.evaluators import EngineError, Evaluation, Evaluator
from zoptim.engine.evaluators.batched import one_per_slice
from zoptim.engine.evaluators.in_place import seeds_of


class OffloadError(EngineError):
    """A model or optimizer the offloading engine cannot serve; the message says why."""


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's repeated block list: the largest ``nn.ModuleList`` whose children (two or
    more) all have the same class."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and \
                len(Counter(type(c) for c in m)) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise OffloadError(f"{type(model).__name__} has no repeated block list (an nn.ModuleList "
                           "of two or more modules of one class) to stream; pass blocks=")
    return best[1]


def _split(v, k: int, rows: int, total: int):
    """Slice ``k`` of a stacked argument (a tensor of two or more dimensions whose first is the
    stacked batch: hidden states, masks, position ids); others are shared and pass unchanged."""
    if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == total:
        return v[k * rows:(k + 1) * rows]
    return v


def _cat(outs: list):
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([o[i] for o in outs]) if first[i] is not None else None
                            for i in range(len(first)))
    if first is None:
        return None
    raise OffloadError(f"offloading: cannot join block outputs of type {type(first).__name__}")


class _Unit:
    """A module whose optimized parameters walk through a step's points together; offloaded
    units also stream between CPU memory and the working device. ``keys``: the plan
    partitions it moves (its own, and those of tied weights another unit holds)."""

    def __init__(self, module: torch.nn.Module, offloaded: bool, index: int):
        self.module, self.offloaded, self.index = module, offloaded, index
        self.keys: list[int] = []
        self.deferred = []  # updates waiting for the unit to be resident
        self.ready = None  # CUDA event: the upload finished


class Offload(Evaluator):
    """Streams ``blocks`` (default: ``find_blocks(model)``) of ``model`` from CPU memory to
    ``device``; attach it to an optimizer with ``attach``.

    ``transfer_dtype`` (``torch.bfloat16``, or ``torch.float8_e4m3fn``) keeps the blocks in
    CPU memory, and moves them, in that precision, computing in the model's own on the device:
    half or a quarter of the bytes moved and held. It is lossy: the weights are rounded to it
    after every step, and an update smaller than its resolution is lost."""

    def __init__(self, model: torch.nn.Module, device="cuda", blocks=None,
                 transfer_dtype: torch.dtype | None = None):
        self.name = "offloaded"
        self.model, self.device = model, torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise OffloadError("offloading to cuda needs an NVIDIA GPU; use device='cpu' to run "
                               "the same code path on the CPU")
        self.blocks = list(find_blocks(model) if blocks is None else blocks)
        # A key/value cache would let a block's later slices attend to its earlier ones.
        if getattr(getattr(model, "config", None), "use_cache", False):
            model.config.use_cache = False
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.transfer_dtype = transfer_dtype
        self._dtype = {}  # a streamed parameter's precision on the device
        self._place()
        self.units: list[_Unit] = []
        self._unit_of: dict = {}
        self._step = None  # (step, seed, undo) of the step under way

    def _place(self) -> None:
        """Non-block parts on the device; block parameters in (pinned) CPU memory."""
        streamed = self._block_params()
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) not in streamed:
                t.data = t.data.to(self.device)
        for p in streamed.values():
            self._dtype[id(p)] = p.dtype
            host = p.data.to("cpu", dtype=self.transfer_dtype or p.dtype)
            p.data = host.pin_memory() if self.cuda else host

    # -- wiring -----------------------------------------------------------------------------
    def attach(self, optimizer) -> "Offload":
        """Serve ``optimizer``'s steps (returns ``self``)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._units(params)
        try:
            optimizer.use(offload=self)  # the combination is checked there
        except EngineError as err:
            raise OffloadError(str(err)) from err
        return self

    def _units(self, params) -> None:
        """The blocks, then every other module that owns optimized parameters directly (a
        tied weight has several owners, each of which walks it)."""
        optimized = {id(p) for p in params}
        self.units, self._unit_of = [], {}
        for blk in self.blocks:
            self._add_unit(blk, True, [p for p in blk.parameters() if id(p) in optimized])
        for m in self._walking(optimized):
            self._add_unit(m, False, list(m.parameters()))
        if not optimized <= set(self._unit_of):
            raise OffloadError("an optimized parameter does not belong to the model")

    def _walking(self, optimized: set) -> list:
        """The resident modules that own optimized parameters directly, outermost first (a
        module walking through the points walks its whole subtree)."""
        own = set(optimized) - set(self._block_params())
        blocks = {id(b) for b in self.blocks}
        names = []
        for name, m in self.model.named_modules():
            owns = any(id(p) in own for p in m.parameters(recurse=False))
            if not owns or _inside(name, names):
                continue
            if any(id(c) in blocks for c in m.modules()):
                raise OffloadError(f"{name or type(m).__name__} owns optimized parameters and "
                                   "contains the blocks; offloading needs them in leaf modules")
            names.append(name)
        return [self.model.get_submodule(n) for n in names]

    def _block_params(self) -> dict:
        return {id(p): p for b in self.blocks for p in b.parameters()}

    def _add_unit(self, module, offloaded: bool, params) -> None:
        unit = _Unit(module, offloaded, len(self.units))
        self.units.append(unit)
        for p in params:
            self._unit_of.setdefault(id(p), unit)  # a tied weight's first owner holds it
            unit.keys.append(self._unit_of[id(p)].index)
        unit.keys = list(dict.fromkeys(unit.keys))

    def holds(self, p) -> bool:
        """Whether ``p`` streams (it lives in CPU memory between steps)."""
        unit = self._unit_of.get(id(p))
        return unit is not None and unit.offloaded

    def partition(self, p):
        unit = self._unit_of.get(id(p))
        if unit is None:
            raise OffloadError("a parameter group was added after Offload.attach; attach the "
                               "optimizer again to stream it")
        return unit.index

    def placement(self, p):
        """A streamed tensor computes on the device in the model's dtype, whatever its copy
        in CPU memory is."""
        return self._dtype.get(id(p), p.dtype), self.device

    # -- streaming --------------------------------------------------------------------------
    def _params(self, unit):
        return list(unit.module.parameters())

    def _prefetch(self, unit) -> None:
        if unit.ready is not None:
            return
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                for p in self._params(unit):
                    p.data = p.data.to(self.device, non_blocking=True).to(self._dtype[id(p)])
                unit.ready = torch.cuda.Event()
                unit.ready.record()
        else:
            for p in self._params(unit):  # the same logic, with CPU as both devices
                p.data = p.data.to(self._dtype[id(p)], copy=True)
            unit.ready = True

    def _arrive(self, unit) -> None:
        self._prefetch(unit)
        if self.cuda:
            torch.cuda.current_stream().wait_event(unit.ready)
            for p in self._params(unit):
                p.data.record_stream(torch.cuda.current_stream())
        for apply in unit.deferred:
            apply()
        unit.deferred.clear()

    def _leave(self, unit) -> None:
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(done)
                for p in self._params(unit):
                    low = p.data.to(self.transfer_dtype or p.dtype)
                    host = torch.empty(p.shape, dtype=low.dtype, pin_memory=True)
                    host.copy_(low, non_blocking=True)
                    low.record_stream(self.copy_stream)
                    p.data = host
        else:
            for p in self._params(unit):
                p.data = p.data.to(self.transfer_dtype or p.dtype, copy=True)
        unit.ready = None

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the updates still deferred (before reading, saving or evaluating the model)."""
        for unit in self.units:
            if unit.offloaded and unit.deferred:
                self._arrive(unit)
                self._leave(unit)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- the evaluator --------------------------------------------------------------------
    def begin(self, plan, step, seed, undo):
        """Prepare the resident parameters now; a streamed block's, once it is resident."""
        self._step = (step, seed, undo)
        for unit in self.units:
            if not unit.offloaded:
                plan.prepare(step, seed, undo, plan.part(unit.index))

    def finish(self, plan, apply):
        """Apply the step to the resident parameters now; to a block's, when it is next
        resident."""
        for unit in self.units:
            sets = plan.part(unit.index)
            if not sets:
                continue
            if unit.offloaded:
                unit.deferred.append(lambda sets=sets: apply(sets))
            else:
                apply(sets)

    def replaying(self):
        """A recorded step redone as it was live: each block walks through the points while
        it is resident, the model not run."""
        return _Replay(self)

    def skipping(self):
        # Blocks apply the previous step's update on arrival: a skipped step walks as it did
        # live, and puts the weights back to within the walk's rounding.
        return _Replay(self)

    def _order(self, plan) -> list:
        return [u for u in self.units if any(plan.part(k) for k in u.keys)]

    def evaluate(self, plan, points, closure, wanted):
        """The objective at every point in one pass on a stacked batch."""
        n = len(points)
        step = _Walk(self, plan, points)
        order = self._order(plan)
        following = {id(a): b for a, b in zip(order, order[1:])}
        for unit in order:
            unit.module.forward = step.forward(unit, unit.module.forward,
                                               following.get(id(unit)))
        try:
            out = one_per_slice(closure(n), n)
        finally:
            for unit in order:
                del unit.module.forward  # the class's forward again
        step.check(order)
        last = points[-1]
        values = [v if w else None for v, w in zip(out, wanted)]
        return Evaluation(values, [] if last is None else [(last[0], -last[1])], step.draw)


class _Replay(Evaluator):
    """``Offload.replaying()``: the writes of a live step, unit by unit, without the model."""

    name = "offloaded, recorded"

    def __init__(self, offload: Offload):
        self.offload = offload

    def placement(self, p):
        return self.offload.placement(p)

    def partition(self, p):
        return self.offload.partition(p)

    def begin(self, plan, step, seed, undo):
        self.offload.begin(plan, step, seed, undo)

    def finish(self, plan, apply):
        self.offload.finish(plan, apply)

    def evaluate(self, plan, points, closure, wanted):
        off, walk = self.offload, _Walk(self.offload, plan, points)
        for unit in off._order(plan):
            if unit.offloaded:
                off._arrive(unit)
            walk.ready(unit)
            for point in points:
                walk.move(unit, point)
            if unit.offloaded:
                off._leave(unit)
        last = points[-1]
        return Evaluation([None] * len(points), [] if last is None else [(last[0], -last[1])],
                          walk.draw)


def _inside(name: str, outer: list[str]) -> bool:
    return any(name.startswith(o + ".") for o in outer)


class _Walk:
    """One step's pass over the units: each unit, when the model runs it, walks its
    parameters through every point, one slice of the stacked batch at each."""

    def __init__(self, offload: Offload, plan, points: list):
        self.offload, self.plan, self.points = offload, plan, points
        self.at = {}  # each partition's current point
        self.draw = Draw(seeds_of(points))

    def ready(self, unit) -> None:
        """Bring the unit's sets to the step: prepared (streamed blocks) and drawn."""
        off, plan = self.offload, self.plan
        if unit.offloaded:
            plan.prepare(*off._step, plan.part(unit.index))
        missing = [s for k in unit.keys for s in plan.part(k) if s not in self.draw.coords]
        if missing and self.draw.seeds:
            self.draw.merge(plan.draw(self.draw.seeds, missing))

    def check(self, units) -> None:
        """Refuse a pass that left a unit out: its parameters took no part."""
        for u in units:
            if any(self.plan.part(k) and k not in self.at for k in u.keys):
                raise OffloadError(f"offloading: {type(u.module).__name__} was not run by the "
                                   "closure; every optimized parameter must take part")

    def move(self, unit, point) -> None:
        for key in unit.keys:
            start = self.at.get(key)
            if key not in self.at or start != point:
                self.plan.shift_(self.draw, start, point, self.plan.part(key))
                self.at[key] = point

    def forward(self, unit, forward, nxt):
        off, n = self.offload, len(self.points)

        def run(*args, **kwargs):
            if unit.offloaded:
                off._arrive(unit)
                if nxt is not None and nxt.offloaded:
                    off._prefetch(nxt)  # overlaps this block's compute
            self.ready(unit)
            stacked = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim()]
            total = stacked[0].shape[0] if stacked else 0
            if not stacked or total % n:
                raise OffloadError(f"offloading: {type(unit.module).__name__} got {total} "
                                   f"rows, not a multiple of the {n} points; stack the batch "
                                   "with zoptim.engine.evaluators.batched.stack")
            rows = total // n
            outs = []
            for k, point in enumerate(self.points):
                self.move(unit, point)
                outs.append(forward(*(_split(a, k, rows, total) for a in args),
                                    **{key: _split(v, k, rows, total)
                                       for key, v in kwargs.items()}))
            if unit.offloaded:
                off._leave(unit)
            return _cat(outs)

        return run
