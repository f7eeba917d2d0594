"""PolyStep (Le, 2026, arXiv 2605.01928): descent by loss evaluations at the vertices of small
polytopes in a compressed subspace, with a softmax assignment and a barycentric move (see
:class:`PolyStep`)."""

from __future__ import annotations

import math

import torch
from zoptim.engine.optimizer import Counted
from zoptim.noise import mix, noise
from zoptim.parts.spaces import as_matrix, orthonormal


def _check(rank, block, **positive) -> None:
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name}={value!r} is invalid: must be > 0")
    if not (isinstance(rank, int) and rank >= 1 and isinstance(block, int) and block >= 1):
        raise ValueError("rank and block must be integers >= 1")


def _rotation(key: int, n: int) -> torch.Tensor:
    """A Haar-random rotation of R^n (determinant +1)."""
    q = orthonormal(key, n, n, torch.float32, "cpu")
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class PolyStep(Counted, torch.optim.Optimizer):
    """PolyStep (Le, 2026, "Training Non-Differentiable Networks via Optimal Transport",
    arXiv 2605.01928): descent by loss evaluations at the vertices of small polytopes in a
    compressed subspace, with a softmax (one-sided entropic optimal transport) assignment and
    a barycentric move. ``step(closure)``; the closure returns the loss and runs ``model``,
    whose parameters are substituted for each probe (nothing is written in place during a
    step).

    The parameters are ``theta = theta_0 + P z``: a matrix ``W`` (``d_out x d_in``;
    higher-order kernels viewed as ``(shape[0], rest)``) has ``r (d_out + d_in)``
    coordinates through a fixed matrix with orthonormal columns, drawn from the seed
    (``r = min(rank, d_out, d_in)``); a vector's coordinates are its entries. ``z`` is cut
    into blocks of ``block`` coordinates. Each step, for every block ``i``: a fresh random
    rotation ``R_i``, the cross-polytope's vertices ``u_v = +-e_j`` (``2 * block`` of them),
    the loss ``C_iv`` with block ``i`` alone moved to ``z_i + probe_radius R_i u_v`` (every
    other block where it was), then

        w_iv = softmax_v(-C_iv / temperature)
        z_i <- z_i + step_radius R_i sum_v w_iv u_v

    The loss at ``theta`` itself is never evaluated; a step costs ``2 * block`` queries a
    block. A block with a non-finite probe stays where it was. The projection is stored: keep
    ``rank`` small for large layers (it is meant for the small, non-differentiable networks
    where gradients fail).

    Args:
        params (iterable): the tensors to optimize, all of them parameters of ``model``.
        model (torch.nn.Module): the module the closure runs.
        rank (int, optional): the rank of each matrix's compressed coordinates. Default: 4.
        block (int, optional): coordinates moved together (a polytope of ``2 * block``
            vertices a block). Default: 8.
        temperature (float, optional): the softmax's temperature over the vertices' losses.
            Default: 0.1.
        step_radius (float, optional): the length of a block's move. Default: 0.1.
        probe_radius (float, optional): the distance of a polytope's vertices from the
            current point. Default: 0.1.
        seed (int, optional): the projections and rotations derive from it (random when
            ``None``). Default: None.
    """

    replayable = False

    def __init__(self, params, model: torch.nn.Module, rank: int = 4, block: int = 8,
                 temperature: float = 0.1, step_radius: float = 0.1, probe_radius: float = 0.1,
                 seed: int | None = None):
        _check(rank, block, temperature=temperature, step_radius=step_radius,
               probe_radius=probe_radius)
        super().__init__(params, dict(temperature=temperature, step_radius=step_radius,
                                      probe_radius=probe_radius))
        self.model, self.rank, self.block = model, rank, block
        self._start_counting(seed)
        names = {id(p): n for n, p in model.named_parameters()}
        self._params = [p for g in self.param_groups for p in g["params"]]
        missing = [p for p in self._params if id(p) not in names]
        if missing:
            raise ValueError("every optimized parameter must belong to the model given")
        self._names = [names[id(p)] for p in self._params]
        self._build()
        for p in self._params:
            self.state[p]["base"] = p.detach().clone()
        self.state[self._params[0]]["z"] = torch.zeros(self._dim)

    def _build(self) -> None:
        """The projections (drawn from the seed) and the coordinates' layout."""
        self._proj = [self._projection(p, j) for j, p in enumerate(self._params)]
        self._sizes = [p.numel() if proj is None else proj.shape[1]
                       for p, proj in zip(self._params, self._proj)]
        self._dim = math.ceil(sum(self._sizes) / self.block) * self.block  # whole blocks

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._build()  # the restored seed's projections

    def _projection(self, p, index: int) -> torch.Tensor | None:
        if p.dim() < 2:
            return None
        rows, cols = as_matrix(p).shape
        r = min(self.rank, rows, cols)
        k = r * (rows + cols)
        key = mix(self.seed, index, 0x9017)
        if rows * cols >= k:
            return orthonormal(key, rows * cols, k, torch.float32, "cpu")
        return noise(key, (rows * cols, k)) / math.sqrt(k)

    def _theta(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for name, p, proj, size in zip(self._names, self._params, self._proj, self._sizes):
            zi = z[at:at + size]
            at += size
            move = zi if proj is None else proj @ zi
            out[name] = self.state[p]["base"] + move.view(p.shape).to(p.device, p.dtype)
        return out

    @torch.no_grad()
    def step(self, closure) -> float:  # type: ignore[override]
        """One step: every block's polytope probed and moved, then the model's parameters
        written at the new point.

        Args:
            closure (callable): runs ``model`` and returns the loss.

        Returns:
            The mean loss of the step's probes.
        """
        group = self.param_groups[0]
        z = self.state[self._params[0]]["z"]
        step_seed = mix(self.seed, self.steps)
        vertices = torch.cat([torch.eye(self.block), -torch.eye(self.block)])  # (2b, b)
        moves, losses = [], []
        for i in range(self._dim // self.block):
            rot = _rotation(mix(step_seed, i), self.block)
            dirs = vertices @ rot.T  # each row R u_v
            costs = []
            for d in dirs:
                probe = z.clone()
                probe[i * self.block:(i + 1) * self.block] += group["probe_radius"] * d
                costs.append(self._loss(closure, probe))
            self.queries += len(costs)
            c = torch.tensor(costs)
            losses.extend(costs)
            if not torch.isfinite(c).all():  # a block with a non-finite probe stays
                moves.append(torch.zeros(self.block))
                continue
            w = torch.softmax(-(c - c.min()) / group["temperature"], 0)
            moves.append(group["step_radius"] * (w @ dirs))
        z += torch.cat(moves)
        named = dict(self.model.named_parameters())
        for name, value in self._theta(z).items():
            named[name].copy_(value)
        self.steps += 1
        return sum(losses) / len(losses)

    def _loss(self, closure, z: torch.Tensor) -> float:
        """The closure's loss with the parameters at ``theta_0 + P z`` (substituted, not
        written)."""
        params = self._theta(z)
        original = {}
        named = dict(self.model.named_parameters())
        for name, value in params.items():
            original[name] = named[name].data
            named[name].data = value
        try:
            return float(closure())
        finally:
            for name, data in original.items():
                named[name].data = data
