"""Queries as a batch: all of a step's evaluations in one forward pass, with the perturbations
applied to activations, so the parameters are never written during a step.

For a linear layer ``y = x W^T`` whose perturbation is a rank-r product ``z = A B`` (ZO-Muon's
and subspace MeZO's ``P Psi``, LOZO's ``U V^T``, SubZero's ``s U Z V^T``), the perturbed output
is ``y + eps (x B^T) A^T``; for an embedding it is ``W[ids] + eps A[ids] B``. The closure
stacks its batch once per evaluation point (``slices`` times along the first dimension, with
``stack``) and returns one loss per slice (``per_slice``). The update is then the only write
to the parameters: with ``lr = 0`` they stay bit-identical in any precision, where in-place
probing (``W + d - d``) drifts in half precision.

The step plan holds every perturbed tensor's coordinates for the step (``engine.plan``); for
each chunk of points this module scales them into per-slice operands, one stack per set of
same-shaped tensors (a few calls a set, whatever the depth), with every layer's views made
once. The baseline slice's operands are zero, so a layer applies one product to all slices.
How each optimized parameter is served:

- the weight of an ``nn.Linear`` under a low-rank space: the layer's forward is replaced for
  the evaluation. Where the weight is no larger than one slice's activations (input and
  output together), every slice is multiplied by its own weight ``W + eps A_i B_i``, built
  for the call in one product, which costs no pass over the output beyond the product's
  own; otherwise (large weights, small batches) the output gets the rank-r correction;
- the weight of an ``nn.Embedding`` under a low-rank space: the rank-r correction;
- the bias of an ``nn.Linear``: each slice's perturbation added to its output;
- the gain and bias of an ``nn.LayerNorm``: the input normalized once, then each slice's own
  gain and bias applied in one pass;
- any other parameter owned directly by a module without submodules (a head) and of at most
  ``RECOMPUTE_MAX_NUMEL`` entries: the module is run again per slice with its perturbed
  parameters materialized (small, so cheap);
- anything else (a parameter of a module with submodules, a large convolution kernel, a
  dense-noise matrix): the optimizer falls back to in-place evaluation and says why.

Memory: the stacked batch holds ``slices`` times the activations of one evaluation; cap it
with ``max_slices`` (the points are then evaluated in chunks of at most that many slices).
Modules that mix examples across the batch (batch normalization in training mode) would mix
slices; use such models in evaluation mode.

Per-example directions (``evaluate_rows``, GRZO's): the points are the batch's examples, point
``i`` perturbing example ``i`` alone. The closure is called as for a stacked batch of
``slices`` points, but under this evaluation ``stack`` leaves the batch as it is, so each
example's rows (one, or ``group`` consecutive rows, as a multiple-choice example's options)
are a slice of their own: one forward pass of the batch evaluates every example at its own
point, and ``per_slice`` gives one value per example.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from zoptim.engine.plan import Draw, HeldSet, OwnSet, StepPlan, TensorSet
from zoptim.engine.evaluators import Evaluation, Evaluator, Recorded
from zoptim.engine.evaluators.in_place import seeds_of
from zoptim.noise import mix

RECOMPUTE_MAX_NUMEL = 1 << 23  # 8M entries: OPT's position table fits, a vocabulary does not

# The stacked batch's size in the evaluation under way, as the closure's ``stack`` says it.
_ROWS: contextvars.ContextVar[list | None] = contextvars.ContextVar("zoptim_rows", default=None)
# Whether the evaluation under way gives each example of the batch its own point (its rows
# are the slices: ``stack`` leaves the batch as it is).
_EACH_ROW: contextvars.ContextVar[bool] = contextvars.ContextVar("zoptim_each_row",
                                                                 default=False)


def each_row() -> bool:
    """Whether the evaluation under way gives each example of the batch its own point
    (``BatchedQueries.evaluate_rows``)."""
    return _EACH_ROW.get()


def stack(x: torch.Tensor, slices: int, group: int = 1) -> torch.Tensor:
    """A batch repeated ``slices`` times along its first dimension (one copy per point). Under
    a batched evaluation it also records the stacked size, which layers whose output is shared
    by the whole batch (position embeddings, shape ``(1, ...)``) are expanded to. Under an
    evaluation of per-example points (``BatchedQueries.evaluate_rows``) the batch is returned
    as it is, each example a slice: it must have ``group`` consecutive rows per point (the
    rows one example takes; ``group`` is ignored otherwise)."""
    rows = _ROWS.get()
    if _EACH_ROW.get():
        if x.shape[0] != slices * group:
            raise ValueError(f"per-example directions: the optimizer draws one direction "
                             f"for each of {slices} examples (its `examples`), and the "
                             f"batch has {x.shape[0]} rows; give it batches of exactly "
                             f"{slices} examples, {group} row(s) each")
        rows[0] = x.shape[0]
        return x
    if rows is not None:
        rows[0] = x.shape[0] * slices
    return x.repeat(slices, *([1] * (x.dim() - 1)))


def per_slice(losses: torch.Tensor, slices: int) -> torch.Tensor:
    """Per-example losses of a stacked batch, averaged within each slice."""
    return losses.reshape(slices, -1).mean(1)


LOW_RANK, BIAS, NORM, RECOMPUTE = "low-rank", "bias", "norm", "recompute"


@dataclass
class _Entry:
    """One optimized parameter of one module: its name there, its role, its set and row."""
    name: str
    role: str
    set: TensorSet
    row: int


def _plain(module, cls) -> bool:
    # Subclasses that replace forward (OPT's learned positions, quantized layers) compute
    # something else from their weight, so only the plain layers get the shortcuts.
    return type(module).forward is cls.forward


def _role(module, name: str, tset: TensorSet) -> str | None:
    """How a module perturbs its parameter ``name`` (``None``: it cannot)."""
    factored = isinstance(tset, HeldSet) and tset.factored
    leaf = not any(True for _ in module.children())
    shortcut = _shortcut(module, name, factored)
    if shortcut is not None:
        return shortcut
    return RECOMPUTE if leaf and tset.params[0].numel() <= RECOMPUTE_MAX_NUMEL else None


def _shortcut(module, name: str, factored: bool) -> str | None:
    """The plain layers' own ways (a layer whose forward is replaced by a subclass, such as
    OPT's learned positions or a quantized layer, computes something else: none)."""
    if _plain(module, torch.nn.Linear):
        return BIAS if name == "bias" else LOW_RANK if factored else None
    if _plain(module, torch.nn.Embedding):
        return LOW_RANK if factored and module.max_norm is None else None
    return NORM if _plain(module, torch.nn.LayerNorm) and not factored else None


class _Roles:
    """Which module perturbs which parameter, for one plan; ``reason`` says why the plan
    cannot be served (``None`` when it can)."""

    def __init__(self, model: torch.nn.Module, plan: StepPlan):
        self.modules: dict[torch.nn.Module, list[_Entry]] = {}
        self.names = {module: qual or type(module).__name__
                      for qual, module in model.named_modules()}
        owners = {}
        for module in self.names:
            for name, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((module, name))
        self.reason = self._assign(plan, owners) or self._mixed()

    def _assign(self, plan: StepPlan, owners: dict) -> str | None:
        for tset in plan.sets:
            for row, p in enumerate(tset.params):
                if id(p) not in owners:
                    return "an optimized parameter does not belong to the model given"
                for module, name in owners[id(p)]:
                    role = _role(module, name, tset)
                    if role is None:
                        return (f"{self.names[module]}.{name} ({type(module).__name__}, shape "
                                f"{tuple(p.shape)}) cannot be perturbed through activations")
                    self.modules.setdefault(module, []).append(_Entry(name, role, tset, row))
        return None

    def _mixed(self) -> str | None:
        for module, entries in self.modules.items():
            roles = {e.role for e in entries}
            if RECOMPUTE in roles and roles != {RECOMPUTE}:
                return f"{self.names[module]} mixes perturbation kinds"
        return None


class _Operands:
    """One set's per-slice perturbations for a chunk layout (each slice's column of the draw,
    ``None`` for the baseline, and its scale), in buffers made once: for a
    dense set ``dz[row]`` ``(S, *shape)``; for a low-rank set the factors of each slice's
    perturbation ``left[row] @ right[row]`` (``(S, m, r)`` and ``(S, r, n)``, the shared one
    expanded), the per-slice one scaled by ``scale * eps`` and zero for the baseline."""

    def __init__(self, tset: TensorSet, layout: tuple):
        self.set, self.layout = tset, layout
        S = len(layout)
        self.factored = isinstance(tset, HeldSet) and tset.factored
        shape = tset.coords_shape if isinstance(tset, HeldSet) else tuple(tset.params[0].shape)
        p = tset.params[0]
        self.scaled = torch.zeros((len(tset), S, *shape), dtype=p.dtype, device=p.device)
        self.slices = list(self.scaled.unbind(1))
        self.rows = list(self.scaled.unbind(0))  # per tensor (S, *shape)
        self._factors_id = None
        # the runs of consecutive perturbed slices, and the baseline slices
        self.runs, self.bases = _runs(layout)
        # dense rows as (S, 1, *shape): added to a layer's (S, tokens, *shape) output
        self.dz3 = [] if self.factored else [r.view(S, 1, *p.shape) for r in self.rows]
        self.run_dz3 = self._by_run(self.dz3)

    def dense(self, row: int, i: int) -> torch.Tensor:
        """The perturbation of tensor ``row`` in slice ``i``, materialized."""
        if not self.factored:
            return self.rows[row][i]
        return (self.left[row][i] @ self.right[row][i]).view(self.set.params[row].shape)

    def fill(self, draw: Draw) -> None:
        """Write this chunk's per-slice perturbations (one call per perturbed slice)."""
        tset = self.set
        if isinstance(tset, OwnSet):  # its space computes each slice's perturbation
            for zs, (j, a) in zip(self.slices, self.layout):
                zs.zero_()
                if j is not None:
                    tset.space.perturb_(zs[0], tset.state, mix(draw.seeds[j], tset.slot.index),
                                        a * tset.group["eps"], tset.scratch)
            return
        cols = draw.columns[tset]
        for zs, (j, a) in zip(self.slices, self.layout):
            if j is not None:
                tset.slice_coords_(zs, cols[j], a * tset.group["eps"])
        if self.factored:
            self._factor_views()

    def _factor_views(self) -> None:
        """Each row's ``left``, ``right`` and their transposes; the shared factor's views are
        made again only when the factors are redrawn."""
        tset = self.set
        key = tuple(id(tset.factors[n]) for n in tset.space.factors)
        if key == self._factors_id:
            return
        A, B = tset.slice_factors(self.scaled)
        self.shared_left = A.dim() == 3  # A is (L, m, r): one factor for every slice
        self.left_shared = list(A.unbind(0)) if self.shared_left else None
        self.left, self.right = self._per_slice(A), self._per_slice(B)
        self.left_t = [a.mT for a in self.left]
        self.right_t = [b.mT for b in self.right]
        self.run_left, self.run_right = self._by_run(self.left), self._by_run(self.right)
        # a factor made from the per-slice coordinates is new each chunk unless it is them
        # (SubZero's ``Z V^T``): then the views are made again every chunk
        made = A if A.dim() == 4 else B
        self._factors_id = key if made is self.scaled or made._base is self.scaled else None

    def _by_run(self, factors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each row's factors cut to the runs of perturbed slices."""
        return [[f[a:b] for a, b in self.runs] for f in factors]

    def _per_slice(self, factor: torch.Tensor) -> list[torch.Tensor]:
        """Each row's ``(S, ...)`` factor: its own, or the shared one expanded."""
        S = len(self.layout)
        return [f if f.dim() == 3 else f.expand(S, *f.shape) for f in factor.unbind(0)]


def _runs(layout) -> tuple[list[tuple[int, int]], list[int]]:
    """The runs ``(start, end)`` of consecutive perturbed slices of a layout, and the baseline
    slices."""
    runs, bases = [], []
    for i, (column, _) in enumerate(layout):
        if column is None:
            bases.append(i)
        elif runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs, bases


class BatchedQueries(Evaluator):
    """Evaluates a step's points on a stacked batch through ``model``'s layers.

    Args:
        model: the module the closure runs.
        max_slices: at most this many points in one forward pass (``None``: all of them).
    """

    name = "batched"
    hold_all = True

    def __init__(self, model: torch.nn.Module, max_slices: int | None = None):
        if max_slices is not None and max_slices < 1:
            raise ValueError(f"max_slices={max_slices} is invalid: must be at least 1")
        self.model, self.max_slices = model, max_slices
        self._roles: tuple[StepPlan, _Roles] | None = None
        self._operands: dict[tuple, _Operands] = {}

    def roles(self, plan: StepPlan) -> _Roles:
        if self._roles is None or self._roles[0] is not plan:
            self._roles = (plan, _Roles(self.model, plan))
            self._operands = {}
        return self._roles[1]

    def check(self, plan):
        return self.roles(plan).reason

    def replaying(self):
        return Recorded()

    def evaluate(self, plan, points, closure, wanted):
        return self._evaluate(plan, points, closure, wanted, each_row=False)

    def evaluate_rows(self, plan, points, closure, wanted):
        """Every point in one forward pass of the batch, point ``i`` perturbing its example
        ``i`` alone (the batch has the same number of consecutive rows per point, see
        ``stack``; ``max_slices`` does not apply: the pass holds one batch's activations)."""
        return self._evaluate(plan, points, closure, wanted, each_row=True)

    def _evaluate(self, plan, points, closure, wanted, each_row: bool) -> Evaluation:
        roles = self.roles(plan)
        if roles.reason is not None:  # the optimizer checks first; kept as a safeguard
            raise RuntimeError(roles.reason)
        values: list = [None] * len(points)
        own = [i for i, w in enumerate(wanted) if w]
        if not own:
            return Evaluation(values, [], None)
        draw = plan.draw(seeds_of(points))
        size = len(own) if each_row else self.max_slices or len(own)
        for start in range(0, len(own), size):
            chunk = own[start:start + size]
            got = self._chunk(roles, draw, [points[i] for i in chunk], closure, each_row)
            for i, v in zip(chunk, got):
                values[i] = v
        return Evaluation(values, [], draw)

    def _chunk(self, roles: _Roles, draw: Draw, points: list, closure,
               each_row: bool) -> list[float]:
        # each slice's column of the draw (None: the baseline) and scale: the same from step
        # to step, so the operands' buffers and views are made once
        layout = tuple((None, 0.0) if pt is None else (draw.column(pt[0]), pt[1])
                       for pt in points)
        slices = len(points)
        operands = {tset: self._filled(tset, layout, draw) for tset in dict.fromkeys(
            e.set for entries in roles.modules.values() for e in entries)}
        rows = [None]
        installed = [_install(m, entries, operands, slices, rows)
                     for m, entries in roles.modules.items()]
        token, row_token = _ROWS.set(rows), _EACH_ROW.set(each_row)
        try:
            out = closure(slices)
        finally:
            _ROWS.reset(token)
            _EACH_ROW.reset(row_token)
            for undo in installed:
                undo()
        return one_per_slice(out, slices)

    def _filled(self, tset: TensorSet, layout: tuple, draw: Draw) -> "_Operands":
        ops = self._operands.get((id(tset), layout))
        if ops is None:
            ops = self._operands[(id(tset), layout)] = _Operands(tset, layout)
        ops.fill(draw)
        return ops


def one_per_slice(out, slices: int) -> list[float]:
    out = torch.as_tensor(out).detach().flatten()
    if out.numel() != slices:
        raise ValueError(f"in batched mode the closure is called with the number of slices "
                         f"({slices}) and must return one loss per slice; it returned "
                         f"{out.numel()} values")
    return [float(v) for v in out.tolist()]


def _stacked(mod, t: torch.Tensor, slices: int, rows: list) -> torch.Tensor:
    """A layer's input or output as the stacked batch: expanded to it when shared by the whole
    batch (first dimension 1: each slice gets its own copy), else checked."""
    if torch.is_tensor(t) and t.dim() and t.shape[0] == 1 < slices:
        if rows[0] is None:
            raise ValueError(f"batched queries: {type(mod).__name__} meets a tensor shared "
                             "by the whole batch; stack the batch with "
                             "zoptim.engine.evaluators.batched.stack so that its size is known")
        return t.expand(rows[0], *t.shape[1:])
    if not torch.is_tensor(t) or t.shape[0] % slices:
        raise ValueError(
            f"batched queries: {type(mod).__name__} got a batch of "
            f"{t.shape[0] if torch.is_tensor(t) else '?'} rows, not a multiple of {slices}; "
            "the closure must stack its batch once per slice (zoptim.engine.evaluators.batched.stack)")
    return t


def _install(mod, entries: list[_Entry], operands: dict, slices: int, rows: list):
    """Replace ``mod``'s forward (or hook it) for one chunk; returns what undoes that."""
    by_name = {e.name: (operands[e.set], e.row) for e in entries}
    if entries[0].role == RECOMPUTE:
        handle = mod.register_forward_hook(_recompute_hook(entries, by_name, slices, rows),
                                           with_kwargs=True)
        return handle.remove
    if "forward" in mod.__dict__:  # replaced by someone else: leave it be
        raise RuntimeError(f"batched queries: {type(mod).__name__}'s forward is already "
                           "replaced")
    if isinstance(mod, torch.nn.Linear):
        mod.forward = _linear(mod, by_name, slices, rows)
    elif isinstance(mod, torch.nn.Embedding):
        mod.forward = _embedding(mod, by_name, slices, rows)
    else:
        mod.forward = _layer_norm(mod, by_name, slices, rows)
    return lambda: delattr(mod, "forward")


def _materializes(mod, x, slices) -> bool:
    """Whether a linear layer's perturbed weights are cheaper to build than a correction of
    its output: the weight is at most the size of one slice's input and output together.
    Not under autocast (the products below are in the weight's precision)."""
    m, n = mod.weight.shape
    tokens = x.numel() // (slices * n)
    return m * n <= tokens * (m + n) and x.dtype == mod.weight.dtype \
        and not torch.is_autocast_enabled(x.device.type)


def _linear(mod, by_name: dict, slices: int, rows: list):
    weight, bias = by_name.get("weight"), by_name.get("bias")

    def forward(x):
        x = _stacked(mod, x, slices, rows)
        xs = (x.view if x.is_contiguous() else x.reshape)(slices, -1, x.shape[-1])
        if weight is not None and _materializes(mod, x, slices):
            out = _materialized(mod, xs, weight, bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        y = F.linear(x, mod.weight, mod.bias)
        ys = y.view(slices, -1, y.shape[-1])
        if weight is not None:  # every slice at once: the baseline's factor is zero
            ops, row = weight
            ys.baddbmm_(torch.bmm(xs, ops.right_t[row]), ops.left_t[row])
        if bias is not None:
            ys.add_(bias[0].dz3[bias[1]])
        return y

    return forward


def _materialized(mod, xs, weight, bias) -> torch.Tensor:
    """A linear layer's output on the stacked batch ``xs`` ``(S, T, n)``: each run of perturbed
    slices through its own weights ``W + eps A_i B_i`` (built for the call, bias included),
    the baseline slices through ``W`` (a batched product over fewer slices balances better
    across CPU threads than one that includes them)."""
    ops, row = weight
    W, b = mod.weight, mod.bias
    out = torch.empty((xs.shape[0], xs.shape[1], W.shape[0]), dtype=xs.dtype, device=xs.device)
    for i in ops.bases:
        if b is None:
            torch.mm(xs[i], W.T, out=out[i])
        else:
            torch.addmm(b, xs[i], W.T, out=out[i])
    for r, (start, end) in enumerate(ops.runs):
        # W_i = W + A_i B_i: W copied as it lies (a transposing copy would be slow)
        wt = torch.baddbmm(W, ops.run_left[row][r], ops.run_right[row][r]).mT
        piece = out[start:end]
        if b is None:
            torch.bmm(xs[start:end], wt, out=piece)
        else:
            bb = b if bias is None else torch.add(b, bias[0].run_dz3[bias[1]][r])
            torch.baddbmm(bb, xs[start:end], wt, out=piece)
    return out


def _embedding(mod, by_name: dict, slices: int, rows: list):
    ops, row = by_name["weight"]

    def forward(ids):
        out = _stacked(mod, F.embedding(ids, mod.weight, mod.padding_idx), slices, rows)
        ids = _stacked(mod, ids, slices, rows).reshape(slices, -1)
        out = out.contiguous()
        if ops.shared_left:  # one factor for every slice: one gather
            picked = ops.left_shared[row][ids]
        else:
            picked = ops.left[row][torch.arange(slices, device=ids.device).unsqueeze(1), ids]
        out.view(slices, -1, out.shape[-1]).baddbmm_(picked, ops.right[row])
        return out

    return forward


def _layer_norm(mod, by_name: dict, slices: int, rows: list):
    shape = tuple(mod.normalized_shape)

    def per_slice_value(name):
        p = getattr(mod, name)
        if p is None or name not in by_name:
            return p
        ops, row = by_name[name]
        return torch.add(p, ops.dz3[row])  # (S, 1, *shape)

    def forward(x):
        x = _stacked(mod, x, slices, rows)
        out = F.layer_norm(x.reshape(slices, -1, *shape), shape, None, None, mod.eps)
        gain, bias = per_slice_value("weight"), per_slice_value("bias")
        if gain is not None and bias is not None:
            torch.addcmul(bias, out, gain, out=out)
        elif gain is not None:
            out.mul_(gain)
        elif bias is not None:
            out.add_(bias)
        return out.view(x.shape)

    return forward


def _recompute_hook(entries, by_name: dict, slices: int, rows: list):
    inside = []

    def hook(mod, args, kwargs, output):
        if inside:  # the per-slice recomputation below calls the module again
            return None
        if torch.is_tensor(output) and output.shape[0] == 1 < slices:
            args = tuple(_stacked(mod, a, slices, rows) if torch.is_tensor(a) and a.dim()
                         and a.shape[0] == 1 else a for a in args)
        output = _stacked(mod, output, slices, rows)
        inside.append(True)
        try:
            return _recompute(mod, args, kwargs, output, by_name, slices)
        finally:
            inside.clear()

    return hook


def _recompute(mod, args, kwargs, output, by_name: dict, slices: int):
    """The module run again on each perturbed slice with its perturbed parameters."""
    n = output.shape[0] // slices

    def part(v, i):
        return v[i * n:(i + 1) * n] if torch.is_tensor(v) and v.dim() and \
            v.shape[0] == output.shape[0] else v

    pieces = list(output.split(n))
    layout = next(iter(by_name.values()))[0].layout
    for i, (column, _) in enumerate(layout):
        if column is None:
            continue
        params = {name: getattr(mod, name) + ops.dense(row, i)
                  for name, (ops, row) in by_name.items()}
        pieces[i] = functional_call(mod, params, tuple(part(v, i) for v in args),
                                    {k: part(v, i) for k, v in kwargs.items()})
    return torch.cat(pieces)
