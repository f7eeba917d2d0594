"""Queries as a batch: all of a step's evaluations in one forward pass, with the perturbations
applied to activations, so the parameters are never written during a step.

For a linear layer ``y = x W^T`` whose perturbation is a rank-r product ``z = A B`` (ZO-Muon's
and subspace MeZO's ``P Psi``, LOZO's ``U V^T``, SubZero's ``s U Z V^T``), the perturbed output
is ``y + eps (x B^T) A^T``; for an embedding it is ``W[ids] + eps A[ids] B``. The closure
stacks its batch once per evaluation point (``slices`` times along the first dimension) and
returns one loss per slice; forward hooks add each slice's correction. The update is then the
only write to the parameters: with ``lr = 0`` they stay bit-identical in any precision, where
in-place probing (``W + d - d``) drifts in half precision.

How each optimized parameter is served:

- the weight of an ``nn.Linear`` or ``nn.Embedding`` under a low-rank space: the rank-r
  correction above;
- the bias of an ``nn.Linear``: its perturbation added to each slice's output;
- any other parameter owned directly by a module without submodules (layer norms, a head)
  and of at most ``RECOMPUTE_MAX_NUMEL`` entries: the module is run again per slice with
  its perturbed parameters materialized (small, so cheap);
- anything else (a parameter of a module with submodules, a large convolution kernel, a
  dense-noise matrix): the optimizer falls back to in-place probing and says why.

Memory: the stacked batch holds ``slices`` times the activations of one evaluation; cap it
with ``max_slices`` (the points are then evaluated in chunks of at most that many slices).
Modules that mix examples across the batch (batch normalization in training mode) would mix
slices; use such models in evaluation mode.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.func import functional_call

from .perturb import mix
from .subspace import _Factored

RECOMPUTE_MAX_NUMEL = 1 << 23  # 8M entries: OPT's position table fits, a vocabulary does not


# The evaluations under way; ``stack`` tells the innermost the size of its stacked batch.
_ACTIVE: list["BatchedQueries"] = []


def stack(x: torch.Tensor, slices: int) -> torch.Tensor:
    """A batch repeated ``slices`` times along its first dimension (one copy per point). Under
    a batched evaluation it also records the stacked size, which layers whose output is shared
    by the whole batch (position embeddings, shape ``(1, ...)``) are expanded to."""
    if _ACTIVE:
        _ACTIVE[-1].rows = x.shape[0] * slices
    return x.repeat(slices, *([1] * (x.dim() - 1)))


def per_slice(losses: torch.Tensor, slices: int) -> torch.Tensor:
    """Per-example losses of a stacked batch, averaged within each slice."""
    return losses.reshape(slices, -1).mean(1)


class _Role:
    """How one parameter of one module is perturbed in a batched evaluation."""
    LOW_RANK, BIAS, RECOMPUTE = "low-rank", "bias", "recompute"


class BatchedQueries:
    """Evaluates a step's points on a stacked batch through forward hooks on ``model``."""

    def __init__(self, model: torch.nn.Module, max_slices: int | None = None):
        if max_slices is not None and max_slices < 1:
            raise ValueError(f"max_slices={max_slices} is invalid: must be at least 1")
        self.model, self.max_slices = model, max_slices
        self.rows: int | None = None  # the stacked batch's size, when the closure said it
        self._plans: dict[tuple[int, ...], tuple[dict, str | None]] = {}

    # -- which module perturbs which parameter ------------------------------------------------
    def plan(self, slots) -> tuple[dict, str | None]:
        """``{module: [(parameter name, role, slot)]}`` for the slots, and the reason the mode
        cannot serve them (``None`` when it can). Cached per set of slots."""
        key = tuple(id(s.p) for s in slots)
        if key not in self._plans:
            self._plans[key] = self._make_plan(slots)
        return self._plans[key]

    def _make_plan(self, slots):
        owners = defaultdict(list)
        names = {}
        for qual, module in self.model.named_modules():
            names[module] = qual or type(module).__name__
            for name, p in module.named_parameters(recurse=False):
                owners[id(p)].append((module, name))
        plan = defaultdict(list)
        for s in slots:
            if id(s.p) not in owners:
                return {}, "an optimized parameter does not belong to the model given"
            for module, name in owners[id(s.p)]:
                role = self._role(module, name, s)
                if role is None:
                    return {}, (f"{names[module]}.{name} ({type(module).__name__}, shape "
                                f"{tuple(s.p.shape)}) cannot be perturbed through activations")
                plan[module].append((name, role, s))
        for module, entries in plan.items():
            roles = {role for _, role, _ in entries}
            if _Role.RECOMPUTE in roles and roles != {_Role.RECOMPUTE}:
                return {}, f"{names[module]} mixes perturbation kinds"
        return dict(plan), None

    @staticmethod
    def _role(module, name, slot) -> str | None:
        low_rank = isinstance(slot.space, _Factored)
        # Subclasses that replace forward (OPT's learned positions, quantized layers) compute
        # something else from their weight, so only the plain layers get the shortcuts.
        if type(module).forward is torch.nn.Linear.forward:
            if name == "weight" and low_rank:
                return _Role.LOW_RANK
            if name == "bias":
                return _Role.BIAS
        if type(module).forward is torch.nn.Embedding.forward and name == "weight" \
                and low_rank and module.max_norm is None:
            return _Role.LOW_RANK
        if not any(True for _ in module.children()) and slot.p.numel() <= RECOMPUTE_MAX_NUMEL:
            return _Role.RECOMPUTE
        return None

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, probe, points: list) -> list[float]:
        plan, reason = self.plan(probe.slots)
        if reason is not None:  # the optimizer checks before probing; kept as a safeguard
            raise RuntimeError(reason)
        size = self.max_slices or len(points)
        values: list[float] = []
        for start in range(0, len(points), size):
            chunk = points[start:start + size]
            deltas = self._deltas(probe, plan, chunk)
            handles = [m.register_forward_hook(self._hook(entries, deltas, len(chunk)),
                                               with_kwargs=True)
                       for m, entries in plan.items()]
            self.rows = None
            _ACTIVE.append(self)
            try:
                out = probe.closure(len(chunk))
            finally:
                _ACTIVE.pop()
                for h in handles:
                    h.remove()
            out = torch.as_tensor(out).detach().flatten()
            if out.numel() != len(chunk):
                raise ValueError(f"in batched mode the closure is called with the number of "
                                 f"slices ({len(chunk)}) and must return one loss per slice; "
                                 f"it returned {out.numel()} values")
            values.extend(float(v) for v in out.tolist())
        return values

    @staticmethod
    def _deltas(probe, plan, chunk) -> dict:
        """Per slot, the stacked perturbations of the chunk's slices (zero for ``None``):
        ``(A, B)`` stacks for low-rank roles, materialized tensors otherwise."""
        out = {}
        for entries in plan.values():
            for _, role, s in entries:
                if (id(s.p), role) in out:  # a tied parameter, already drawn
                    continue
                state, scratch, eps = probe.opt.state[s.p], probe.scratch[s.p], s.group["eps"]
                if role == _Role.LOW_RANK:
                    a_list, b_list = [], []
                    for point in chunk:
                        seed, scale = point if point is not None else (0, 0.0)
                        coords = s.space.coords(s.p, state, mix(seed, s.index), scratch)
                        a, b = s.space.lifted_factors(s.p, state, coords)
                        a_list.append(a)
                        b_list.append(b * (scale * eps))
                    out[(id(s.p), role)] = (torch.stack(a_list), torch.stack(b_list))
                else:
                    ds = []
                    for point in chunk:
                        d = torch.zeros_like(s.p)
                        if point is not None:
                            s.space.perturb_(d, state, mix(point[0], s.index), point[1] * eps,
                                             scratch)
                        ds.append(d)
                    out[(id(s.p), role)] = torch.stack(ds)
        return out

    def _hook(self, entries, deltas, slices: int):
        inside = []

        def hook(mod, args, kwargs, output):
            if inside:  # the per-slice recomputation below calls the module again
                return None
            if torch.is_tensor(output) and output.shape[0] == 1 < slices:
                # shared by every row of the batch: each slice gets its own copy
                if self.rows is None:
                    raise ValueError(f"batched queries: {type(mod).__name__}'s output is shared "
                                     "by the whole batch; stack the batch with "
                                     "zoptim.batched.stack so that its size is known")
                output = output.expand(self.rows, *output.shape[1:]).contiguous()
                args = tuple(a.expand(self.rows, *a.shape[1:])
                             if torch.is_tensor(a) and a.dim() and a.shape[0] == 1 else a
                             for a in args)
            if not torch.is_tensor(output) or output.shape[0] % slices:
                raise ValueError(
                    f"batched queries: {type(mod).__name__} got a batch of "
                    f"{output.shape[0] if torch.is_tensor(output) else '?'} rows, not a "
                    f"multiple of {slices}; the closure must stack its batch once per slice "
                    "(zoptim.batched.stack)")
            if entries[0][1] == _Role.RECOMPUTE:
                inside.append(True)
                try:
                    return self._recompute(mod, args, kwargs, output, entries, deltas, slices)
                finally:
                    inside.clear()
            out = output.reshape(slices, -1, output.shape[-1])
            for name, role, s in entries:
                d = deltas[(id(s.p), role)]
                if role == _Role.BIAS:
                    out += d.unsqueeze(1)
                elif isinstance(mod, torch.nn.Embedding):
                    a, b = d
                    ids = args[0].reshape(slices, -1)
                    rows = torch.stack([a[i][ids[i]] for i in range(slices)])
                    out += torch.bmm(rows, b)
                else:
                    a, b = d
                    x = args[0].reshape(slices, -1, args[0].shape[-1])
                    out += torch.bmm(torch.bmm(x, b.transpose(1, 2)), a.transpose(1, 2))
            return out.reshape(output.shape)

        return hook

    @staticmethod
    def _recompute(mod, args, kwargs, output, entries, deltas, slices):
        rows = output.shape[0] // slices

        def part(v, i):
            return v[i * rows:(i + 1) * rows] if torch.is_tensor(v) and v.dim() and \
                v.shape[0] == output.shape[0] else v

        pieces = []
        for i in range(slices):
            params = {name: getattr(mod, name) + deltas[(id(s.p), role)][i]
                      for name, role, s in entries}
            pieces.append(functional_call(mod, params, tuple(part(a, i) for a in args),
                                          {k: part(v, i) for k, v in kwargs.items()}))
        return torch.cat(pieces)

