"""DeepZero (Chen et al., ICLR 2024, "DeepZero: Scaling up Zeroth-Order Optimization for Deep
Model Training"): training small networks from scratch with coordinate-wise estimates.

- **Coordinate-wise gradient estimate (CGE)**: ``g_i = (f(theta + mu e_i) - f(theta)) / mu``,
  one query per coordinate, on a sparse set of coordinates.
- **Sparsity prior by ZO pruning (ZO-GraSP)**: at the start, GraSP's score
  ``-theta * (H g)`` is estimated from forward passes alone (``g`` by random directions,
  ``H g`` by a finite difference of two such estimates with common directions); keeping the
  top ``1 - sparsity`` scores gives each layer its density. Every step then estimates a fresh
  random set of coordinates per layer at that density (the sparse pattern moves, the
  layer-wise ratios stay).
- **Feature reuse**: the model is an ``nn.Sequential``; the input of every layer at the
  current parameters is kept, so a coordinate of layer ``l`` costs the forward pass of layers
  ``l`` onwards only.
- **Forward parallelism**: the coordinate queries are independent, so ``parallel`` of them
  (of one parameter) run as one vectorized forward (``torch.func.vmap`` over stacked copies of
  the layer's parameter, each with its coordinate shifted). The estimates equal the
  one-at-a-time ones up to floating-point rounding; memory grows with ``parallel`` times the
  activations of the layers after the perturbed one. ``parallel=1`` runs them one by one.

``step(inputs, targets)`` takes the batch itself (feature reuse needs the inputs); the loss is
``loss_fn(model(inputs), targets)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import functional_call, vmap

from zoptim.parts import settings
from zoptim.engine.optimizer import Counted
from zoptim.noise import mix, noise


def layer_densities(scores: list[torch.Tensor], sparsity: float) -> list[float]:
    """Each tensor's density when the ``1 - sparsity`` entries of largest score magnitude are
    kept over all tensors together (at least one entry per tensor).

    Ranked by magnitude, as DeepZero's code does (``torch.nn.utils.prune.L1Unstructured`` on
    the scores ``-theta * Hg``): GraSP itself prunes the largest signed scores instead, and
    ranking signed scores the other way (keeping the largest) follows neither."""
    flat = torch.cat([s.flatten() for s in scores]).abs()
    keep = max(1, math.ceil((1 - sparsity) * flat.numel()))
    threshold = flat.topk(keep).values.min()
    return [max(float((s.abs() >= threshold).float().mean()), 1 / s.numel()) for s in scores]


def _check(model, lr, mu, sparsity, parallel) -> None:
    if not isinstance(model, torch.nn.Sequential):
        raise ValueError("DeepZero reuses features layer by layer: give an nn.Sequential")
    settings.check("sparsity", sparsity)
    if not (lr > 0 and mu > 0):
        raise ValueError("lr and mu must be > 0")
    if parallel < 1:
        raise ValueError(f"parallel={parallel!r} is invalid: at least one query a forward")


class DeepZero(Counted, torch.optim.Optimizer):
    """DeepZero's training (Chen et al., ICLR 2024, "DeepZero: Scaling up Zeroth-Order
    Optimization for Deep Model Training"; the module's docstring describes its parts):
    coordinate-wise estimates on a fresh random set of coordinates a step, each layer's share
    from the ZO-GraSP prior, with feature reuse and forward parallelism.
    ``step(inputs, targets)``; a step costs one query at ``theta`` and one per sampled
    coordinate (and the prior's, once, before the first step).

    The update, with ``S`` the step's coordinates and ``e_i`` the ``i``-th unit vector:

        g_i = (f(theta + mu e_i) - f(theta)) / mu    for i in S,    g_i = 0 elsewhere
        b <- momentum * b + g                        (b = g at the first step)
        theta <- theta - lr * b

    Args:
        model (torch.nn.Sequential): an ``nn.Sequential`` (features are reused layer by
            layer); its trainable parameters are optimized.
        loss_fn (callable): ``loss_fn(outputs, targets)``, the objective.
        lr (float, optional): learning rate. Default: 0.1.
        mu (float, optional): the coordinate finite difference's step. Default: 5e-3.
        sparsity (float, optional): the fraction of coordinates left out of each step, in
            [0, 1); each layer's share comes from the ZO-GraSP prior. Default: 0.5.
        momentum (float, optional): heavy-ball momentum of the coordinate estimates.
            Default: 0.9.
        prior_queries (int, optional): random directions of each gradient estimate of the
            prior. Default: 64.
        parallel (int, optional): coordinate queries run in one vectorized forward (``1``:
            one by one). Default: 64.
        seed (int, optional): every random choice derives from it (random when ``None``).
            Default: None.
    """

    replayable = False

    def __init__(self, model: torch.nn.Sequential,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lr: float = 0.1, mu: float = 5e-3,
                 sparsity: float = 0.5, momentum: float = 0.9, prior_queries: int = 64,
                 parallel: int = 64, seed: int | None = None):
        _check(model, lr, mu, sparsity, parallel)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, mu=mu, momentum=momentum))
        self.model, self.loss_fn, self.sparsity = model, loss_fn, sparsity
        self.prior_queries, self.parallel = prior_queries, parallel
        self._start_counting(seed)
        # (layer index, parameter) for every optimized parameter, in order, and its name there
        named = [(i, n, p) for i, layer in enumerate(model) for n, p in layer.named_parameters()
                 if p.requires_grad]
        self._where = [(i, p) for i, _, p in named]
        self._names = [n for _, n, _ in named]
        self.density: list[float] | None = None  # per parameter, from the prior

    # -- evaluation with feature reuse ------------------------------------------------------
    def _features(self, x) -> list[torch.Tensor]:
        """The input of every layer at the current parameters."""
        feats = [x]
        for layer in self.model:
            feats.append(layer(feats[-1]))
        return feats

    def _loss_from(self, layer: int, feats, y) -> float:
        h = feats[layer]
        for m in list(self.model)[layer:]:
            h = m(h)
        self.queries += 1
        return float(self.loss_fn(h, y))

    def _losses_shifted(self, j: int, coords: torch.Tensor, feats, y, mu: float):
        """The losses with coordinate ``coords[k]`` of parameter ``j`` shifted by ``mu``, for
        every ``k`` at once: one vectorized forward of the layers from the parameter's on."""
        layer_index, p = self._where[j]
        layer, rest = self.model[layer_index], self.model[layer_index + 1:]
        params = dict(layer.named_parameters())
        copies = p.detach().reshape(1, -1).repeat(len(coords), 1)
        rows = torch.arange(len(coords))
        copies[rows, coords] = copies[rows, coords] + mu

        def loss(flat):
            shifted = {**params, self._names[j]: flat.view_as(p)}
            return self.loss_fn(rest(functional_call(layer, shifted, (feats[layer_index],))), y)

        self.queries += len(coords)
        return vmap(loss)(copies)

    # -- the sparsity prior -----------------------------------------------------------------
    def _rge(self, x, y, key: int) -> list[torch.Tensor]:
        """A random-direction gradient estimate with ``prior_queries`` directions."""
        mu = self.param_groups[0]["mu"]
        base = self._loss_from(0, [x], y)
        g = [torch.zeros_like(p) for _, p in self._where]
        for q in range(self.prior_queries):
            us = [noise(mix(key, q, j), p.shape, dtype=p.dtype, device=p.device) for j, (_, p) in
                  enumerate(self._where)]
            for (_, p), u in zip(self._where, us):
                p.add_(u, alpha=mu)
            diff = (self._loss_from(0, [x], y) - base) / mu
            for (_, p), u, gj in zip(self._where, us, g):
                p.sub_(u, alpha=mu)
                gj.add_(u, alpha=diff / self.prior_queries)
        return g

    @torch.no_grad()
    def prior(self, x, y) -> list[float]:
        """ZO-GraSP: the layer-wise densities from ``-theta * (H g)``, estimated on a batch.

        Args:
            x: the batch's inputs.
            y: the batch's targets.

        Returns:
            Each optimized parameter's density, in order.
        """
        key = mix(self.seed, 0x6A5)
        saved = [p.detach().clone() for _, p in self._where]
        g = self._rge(x, y, key)
        delta = 1e-2 / max(float(torch.cat([t.flatten() for t in g]).norm()), 1e-12)
        for (_, p), gj in zip(self._where, g):
            p.add_(gj, alpha=delta)
        g2 = self._rge(x, y, key)  # common directions: the difference is H g's estimate
        for (_, p), s in zip(self._where, saved):
            p.copy_(s)
        scores = [-(p * (b - a) / delta) for (_, p), a, b in zip(self._where, g, g2)]
        self.density = layer_densities(scores, self.sparsity)
        return self.density

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, x, y) -> float:  # type: ignore[override]
        """One step of CGE on a fresh sparse set of coordinates (the prior first, if it is
        not yet estimated).

        Args:
            x: the batch's inputs.
            y: the batch's targets.

        Returns:
            The loss at theta, before the update.
        """
        if self.density is None:
            self.prior(x, y)
        group = self.param_groups[0]
        mu, lr, beta = group["mu"], group["lr"], group["momentum"]
        feats = self._features(x)
        self.queries += 1
        base = float(self.loss_fn(feats[-1], y))
        step_key = mix(self.seed, self.steps)
        grads = []  # every estimate at the same theta, then the update
        for j, ((layer, p), density) in enumerate(zip(self._where, self.density)):
            flat = p.view(-1)
            n = flat.numel()
            count = max(1, round(density * n))
            g = torch.Generator().manual_seed(mix(step_key, j) & ((1 << 63) - 1))
            coords = torch.randperm(n, generator=g)[:count]
            grad = torch.zeros(n, dtype=p.dtype)
            if self.parallel > 1:
                for chunk in coords.split(self.parallel):
                    losses = self._losses_shifted(j, chunk.to(p.device), feats, y, mu)
                    grad[chunk] = ((losses.double() - base) / mu).cpu().to(p.dtype)
            else:
                for i in coords.tolist():
                    old = flat[i].clone()
                    flat[i] = old + mu
                    grad[i] = (self._loss_from(layer, feats, y) - base) / mu
                    flat[i] = old  # restored exactly
            grads.append(grad)
        for (_, p), grad in zip(self._where, grads):
            state = self.state[p]
            buf = state.get("momentum")
            buf = grad if buf is None else buf.mul_(beta).add_(grad)
            state["momentum"] = buf
            p.view(-1).sub_(buf.to(p.device), alpha=lr)
        self.steps += 1
        return base

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"]["density"] = self.density
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        density = state_dict["zo"].get("density")
        super().load_state_dict(state_dict)
        self.density = density
