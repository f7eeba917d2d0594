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

- the weight of an ``nn.Linear`` under a low-rank space: the layer's forward is replaced for
  the evaluation. Where the weight is no larger than one slice's activations (input and
  output together), each perturbed slice is multiplied by its own weight ``W + eps A_i B_i``,
  built for the call, which costs no pass over the output beyond the product's own;
  otherwise (large weights, small batches) the output gets the rank-r correction above;
- the weight of an ``nn.Embedding`` under a low-rank space: the rank-r correction;
- the bias of an ``nn.Linear``: its perturbation added to each slice's output (or to the
  slice's bias, with a materialized weight);
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
import torch.nn.functional as F
from torch.func import functional_call

from zoptim.noise import mix, noise_stacks
from zoptim.parts.spaces import Space, _Factored

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
            draws, runs = _draw(probe, plan, chunk), _runs(chunk)
            handles, replaced = [], []
            for m, entries in (plan.items() if runs else ()):
                forward = self._forward(m, entries, draws, runs, len(chunk))
                if forward is not None:
                    m.forward = forward
                    replaced.append(m)
                else:
                    handles.append(m.register_forward_hook(
                        self._hook(entries, draws, runs, len(chunk)), with_kwargs=True))
            self.rows = None
            _ACTIVE.append(self)
            try:
                out = probe.closure(len(chunk))
            finally:
                _ACTIVE.pop()
                for h in handles:
                    h.remove()
                for m in replaced:
                    del m.forward
            out = torch.as_tensor(out).detach().flatten()
            if out.numel() != len(chunk):
                raise ValueError(f"in batched mode the closure is called with the number of "
                                 f"slices ({len(chunk)}) and must return one loss per slice; "
                                 f"it returned {out.numel()} values")
            values.extend(float(v) for v in out.tolist())
        return values

    def _stacked(self, mod, t: torch.Tensor, slices: int) -> torch.Tensor:
        """A layer's input or output as the stacked batch: expanded to it when shared by the
        whole batch (first dimension 1: each slice gets its own copy), else checked."""
        if torch.is_tensor(t) and t.dim() and t.shape[0] == 1 < slices:
            if self.rows is None:
                raise ValueError(f"batched queries: {type(mod).__name__} meets a tensor shared "
                                 "by the whole batch; stack the batch with "
                                 "zoptim.evaluators.batched.stack so that its size is known")
            return t.expand(self.rows, *t.shape[1:])
        if not torch.is_tensor(t) or t.shape[0] % slices:
            raise ValueError(
                f"batched queries: {type(mod).__name__} got a batch of "
                f"{t.shape[0] if torch.is_tensor(t) else '?'} rows, not a multiple of "
                f"{slices}; the closure must stack its batch once per slice "
                "(zoptim.evaluators.batched.stack)")
        return t

    def _hook(self, entries, draws, runs, slices: int):
        inside = []

        def hook(mod, args, kwargs, output):
            if inside:  # the per-slice recomputation below calls the module again
                return None
            if torch.is_tensor(output) and output.shape[0] == 1 < slices:
                args = tuple(self._stacked(mod, a, slices) if torch.is_tensor(a) and a.dim()
                             and a.shape[0] == 1 else a for a in args)
            output = self._stacked(mod, output, slices)
            if entries[0][1] == _Role.RECOMPUTE:
                inside.append(True)
                try:
                    return _recompute(mod, args, kwargs, output, entries, draws, runs, slices)
                finally:
                    inside.clear()
            return _corrected(mod, entries, draws, runs, slices, args[0], output)

        return hook

    def _forward(self, mod, entries, draws, runs, slices: int):
        """A replacement of ``mod``'s forward for this evaluation, for the plain layers that
        have one (``None`` for the others, which are hooked). ``nn.Linear`` with a low-rank
        weight: where its weight is smaller than the activations it multiplies, each perturbed
        slice goes through its own perturbed weight, built for the call (no pass over the
        output beyond the product's own), else its output is corrected. ``nn.LayerNorm``: the
        normalized input, computed once, times each slice's own gain plus its own bias."""
        if "forward" in mod.__dict__:  # already replaced by someone else: leave it be
            return None
        drawn = {name: draws[id(s.p)] for name, _, s in entries}
        if type(mod).forward is torch.nn.Linear.forward and "weight" in drawn \
                and drawn["weight"].factors is not None:
            def linear(x):
                x = self._stacked(mod, x, slices)
                if _materializes(mod, x, slices):
                    return _materialized(mod, x, drawn, runs, slices)
                return _corrected(mod, entries, draws, runs, slices, x,
                                  F.linear(x, mod.weight, mod.bias))
            return linear
        if type(mod).forward is torch.nn.LayerNorm.forward:
            return lambda x: _layer_norm(mod, self._stacked(mod, x, slices), drawn, runs, slices)
        return None


class _Draw:
    """One parameter's perturbations in a chunk: the coordinates ``z`` of its perturbed slices
    (stacked, unscaled) and each slice's ``scale * eps``; for a low-rank role also the factors
    ``(A, B)`` of ``z`` (``Space.batched_factors``)."""

    def __init__(self, slot, state, z: torch.Tensor, scale: torch.Tensor, low_rank: bool):
        self.z, self.scale = z, scale
        self.factors = slot.space.batched_factors(slot.p, state, z) if low_rank else None


def _corrected(mod, entries, draws, runs, slices, x, output) -> torch.Tensor:
    """A layer's output with each perturbed slice's correction added, in place."""
    out = output.contiguous().view(slices, -1, output.shape[-1])
    for name, role, s in entries:
        for a, b, j in runs:
            _correct(mod, role, draws[id(s.p)], x, out, slices, a, b, j)
    return out.view(output.shape)


def _materializes(mod, x, slices) -> bool:
    """Whether a linear layer's perturbed weights are cheaper to build than a correction of
    its output: the weight is at most the size of one slice's input and output together.
    Not under autocast (the products below write into one output buffer)."""
    m, n = mod.weight.shape
    rows = x.numel() // (slices * n)
    return m * n <= rows * (m + n) and x.dtype == mod.weight.dtype \
        and not torch.is_autocast_enabled(x.device.type)


def _materialized(mod, x, drawn: dict, runs, slices) -> torch.Tensor:
    """A linear layer's output on the stacked batch, each perturbed slice through its own
    weight ``W + scale_i A_i B_i`` (and bias ``b + scale_i z_i``), the others through ``W``."""
    W, bias = mod.weight, mod.bias
    m, n = W.shape
    xs = x.reshape(slices, -1, n)
    out = torch.empty((slices, xs.shape[1], m), dtype=x.dtype, device=x.device)

    def unperturbed(a, b):
        if a < b:
            flat, o = xs[a:b].flatten(0, 1), out[a:b].view(-1, m)
            torch.mm(flat, W.T, out=o) if bias is None else torch.addmm(bias, flat, W.T, out=o)

    weight, bias_draw = drawn["weight"], drawn.get("bias")
    A, B = weight.factors
    done = 0
    for a, b, j in runs:
        unperturbed(done, a)
        rows, k = slice(j, j + b - a), b - a
        scale = weight.scale[rows].view(-1, 1, 1)
        if A.dim() == 2:
            Wi = torch.baddbmm(W, A.expand(k, *A.shape), B[rows] * scale)
        else:
            Wi = torch.baddbmm(W, A[rows] * scale, B.expand(k, *B.shape))
        if bias is None:
            torch.bmm(xs[a:b], Wi.transpose(1, 2), out=out[a:b])
        else:
            bi = bias.expand(k, m) if bias_draw is None else \
                torch.addcmul(bias, bias_draw.z[rows], bias_draw.scale[rows].view(-1, 1))
            torch.baddbmm(bi.unsqueeze(1).expand(k, xs.shape[1], m), xs[a:b],
                          Wi.transpose(1, 2), out=out[a:b])
        done = b
    unperturbed(done, slices)
    return out.view(*x.shape[:-1], m)


def _runs(chunk) -> list[tuple[int, int, int]]:
    """The chunk's perturbed slices as runs ``(first, end, j)`` of consecutive slices, ``j``
    the run's first row in the stacked coordinates (the baseline, ``None``, has none)."""
    runs, j = [], 0
    for i, point in enumerate(chunk):
        if point is None:
            continue
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, j])
        j += 1
    return [tuple(r) for r in runs]


def _draw(probe, plan, chunk) -> dict[int, _Draw]:
    """Every planned parameter's coordinates for the chunk's perturbed slices, drawn together
    (one noise kernel per dtype on a CPU) and left in the slots' scratch for the update."""
    live = [pt for pt in chunk if pt is not None]
    seeds = list(dict.fromkeys(seed for seed, _ in live))
    where = [seeds.index(seed) for seed, _ in live]
    slots = {id(s.p): (s, role) for entries in plan.values() for _, role, s in entries}
    plain, other = defaultdict(list), []
    for s, role in slots.values():
        if role == _Role.LOW_RANK or type(s.space).perturb_ is Space.perturb_:
            plain[(s.p.dtype, s.p.device, s.space.noise_kind)].append((s, role))
        else:
            other.append((s, role))
    draws, scales = {}, {}

    def scale(s):  # shared by the slots of one dtype, device and eps
        key = (s.p.dtype, s.p.device, s.group["eps"])
        if key not in scales:
            scales[key] = torch.tensor([sc * s.group["eps"] for _, sc in live], dtype=s.p.dtype,
                                       device=s.p.device)
        return scales[key]

    for (dtype, device, kind), group in plain.items():
        shapes = [s.space.coords_shape(s.p, probe.opt.state[s.p]) for s, _ in group]
        keys = [[mix(seed, s.index) for seed in seeds] for s, _ in group]
        for (s, role), z, ks in zip(group, noise_stacks(keys, shapes, kind, dtype, device), keys):
            probe.scratch[s.p].setdefault("coords", {}).update(zip(ks, z))
            if where != list(range(len(seeds))):  # a seed evaluated at several scales
                z = z[where]
            draws[id(s.p)] = _Draw(s, probe.opt.state[s.p], z, scale(s), role == _Role.LOW_RANK)
    for s, role in other:  # spaces with their own perturbation (Masked, HessianScaled)
        z = torch.zeros((len(live), *s.p.shape), dtype=s.p.dtype, device=s.p.device)
        for zi, (seed, _) in zip(z, live):
            s.space.perturb_(zi, probe.opt.state[s.p], mix(seed, s.index), 1.0,
                             probe.scratch[s.p])
        draws[id(s.p)] = _Draw(s, probe.opt.state[s.p], z, scale(s), False)
    return draws


def _correct(mod, role, draw: _Draw, x, out, slices, a, b, j) -> None:
    """Add the perturbation's effect to slices ``a:b`` of a layer's output ``out``
    ``(slices, rows, features)``, in place; the coordinates of those slices start at ``j``."""
    y, rows = out[a:b], slice(j, j + b - a)
    scale = draw.scale[rows].view(-1, 1, 1)
    if role == _Role.BIAS:
        y += draw.z[rows].unsqueeze(1) * scale
        return
    A, B = draw.factors
    if isinstance(mod, torch.nn.Embedding):
        ids = x.reshape(slices, -1)[a:b]
        if A.dim() == 2:  # shared rows: one gather for every slice
            y.baddbmm_(A[ids] * scale, B[rows])
        else:
            picked = A[rows][torch.arange(b - a, device=ids.device).unsqueeze(1), ids]
            y.view(-1, y.shape[-1]).addmm_((picked * scale).flatten(0, 1), B)
        return
    # a linear layer: y += scale (x B^T) A^T, the shared factor applied to all slices at once
    x = x.reshape(slices, -1, x.shape[-1])[a:b]
    if A.dim() == 2:
        h = torch.bmm(x, B[rows].transpose(1, 2)).mul_(scale)
        y.view(-1, y.shape[-1]).addmm_(h.flatten(0, 1), A.T)
    else:
        h = (x.flatten(0, 1) @ B.T).view(b - a, -1, B.shape[0]).mul_(scale)
        y.baddbmm_(h, A[rows].transpose(1, 2))


def _recompute(mod, args, kwargs, output, entries, draws, runs, slices):
    """The module run again on each perturbed slice with its perturbed parameters."""
    rows = output.shape[0] // slices

    def part(v, i):
        return v[i * rows:(i + 1) * rows] if torch.is_tensor(v) and v.dim() and \
            v.shape[0] == output.shape[0] else v

    pieces = list(output.split(rows))
    for a, b, j in runs:
        for i in range(a, b):
            params = {name: getattr(mod, name) + draws[id(s.p)].z[j + i - a]
                      * draws[id(s.p)].scale[j + i - a] for name, _, s in entries}
            pieces[i] = functional_call(mod, params, tuple(part(v, i) for v in args),
                                        {k: part(v, i) for k, v in kwargs.items()})
    return torch.cat(pieces)


def _per_slice(p, d: _Draw | None, runs, slices) -> torch.Tensor:
    """A parameter's value in each slice, stacked ``(slices, *p.shape)``: perturbed in the
    runs' slices when it is optimized (``d``), as it is in the others."""
    values = p.detach().unsqueeze(0).repeat(slices, *([1] * p.dim()))
    if d is not None:
        for a, b, j in runs:
            scale = d.scale[j:j + b - a].view(-1, *([1] * p.dim()))
            values[a:b].addcmul_(d.z[j:j + b - a], scale)
    return values


def _layer_norm(mod, x, drawn: dict, runs, slices):
    """A layer norm on the stacked batch, each slice with its own gain and bias: the input
    normalized once, then ``xhat * gain_i + bias_i`` in one pass, in place."""
    shape = tuple(mod.normalized_shape)
    out = F.layer_norm(x.reshape(slices, -1, *shape), shape, None, None, mod.eps)
    gain, bias = ((None if p is None else
                   _per_slice(p, drawn.get(name), runs, slices).view(slices, 1, *shape))
                  for name, p in (("weight", mod.weight), ("bias", mod.bias)))
    if gain is not None and bias is not None:
        torch.addcmul(bias, out, gain, out=out)
    elif gain is not None:
        out.mul_(gain)
    elif bias is not None:
        out.add_(bias)
    return out.view(x.shape)
