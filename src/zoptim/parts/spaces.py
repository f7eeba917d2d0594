"""Where a parameter's perturbation lives.

A *space* turns a per-parameter key into a perturbation ``z`` of that parameter and keeps
whatever factors it needs between steps. It also owns the coordinates the gradient estimate
is written in, so nothing parameter-sized is stored where the space is small:

==============  ==========================  ==================  ===========================
space           perturbation z              coordinates         state kept between steps
==============  ==========================  ==================  ===========================
Dense           noise(key), shape of W      z itself            none
Masked          mask(W) * noise(key)        z itself            a magnitude threshold
HessianScaled   noise(key) / sqrt(H)        z itself            diagonal Hessian H
Projected       P @ Psi                     Psi  (r x n)        P  (m x r, orthonormal)
LowRank         U @ V^T                     U    (m x r)        V  (n x r, Gaussian)
TwoSided        s * U @ Z @ V^T             Z    (r x r)        U, V  (orthonormal)
==============  ==========================  ==================  ===========================

Factors that change on a schedule are regenerated from ``(seed, epoch, parameter index)``,
so a resumed run draws the same ones. When they change, state kept in coordinates (momentum)
is carried over by ``transfer``. Tensors of more than two dimensions are viewed as matrices
``(shape[0], rest)`` (convolution kernels as Muon does).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from zoptim.noise import add_noise_, mix, noise

# Salt separating the keys of scheduled factors from the keys of per-step noise.
_FACTOR_SALT = 0xFAC7


def as_matrix(p: torch.Tensor) -> torch.Tensor:
    """View a parameter of two or more dimensions as ``(shape[0], numel / shape[0])``."""
    return p.view(p.shape[0], -1)


def orthonormal(key: int, rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns: QR of a Gaussian, signs fixed by R's
    diagonal so the draw is uniform (Haar) and does not depend on the QR routine's sign choice."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q, r = torch.linalg.qr(noise(key, (rows, cols), dtype=work, device=device))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).to(dtype)


class Space:
    """Dense Gaussian (or Rademacher) perturbation of the whole tensor: MeZO's."""

    linear = True  # the update is a fixed linear function of the coefficients
    compact = False  # coordinates much smaller than the parameter: several may be held at once

    def __init__(self, noise_kind: str = "gaussian"):
        self.noise_kind = noise_kind

    def prepare(self, p, state, step: int, key: int, scratch: dict) -> Callable | None:
        """Called once per step before any perturbation. Returns a map that carries state kept
        in coordinates over to new factors, when the factors were just resampled."""
        return None

    def perturb_(self, p, state, key: int, alpha: float, scratch: dict) -> None:
        add_noise_(p, key, alpha, self.noise_kind)

    def coords_shape(self, p, state) -> tuple[int, ...]:
        """The shape of the coordinates, which are the noise of this shape (``coords``)."""
        return tuple(p.shape)

    def coords(self, p, state, key: int, scratch: dict) -> torch.Tensor:
        """The coordinates of ``key``'s perturbation. A batched evaluation draws every slice's
        at once and leaves them in ``scratch["coords"]``, where the update takes them (each
        once) instead of drawing them again."""
        drawn = scratch.get("coords")
        if drawn is not None and key in drawn:
            return drawn.pop(key)
        return noise(key, self.coords_shape(p, state), self.noise_kind, p.dtype, p.device)

    def add_lifted_(self, p, state, coords: torch.Tensor, alpha: float) -> None:
        p.add_(coords, alpha=alpha)

    def estimate(self, p, state, keys: Sequence[int], coefs: Sequence[float], probes, eps,
                 scratch: dict) -> torch.Tensor:
        """The gradient estimate in coordinates: sum_i coef_i * coords(key_i)."""
        g = None
        for key, c in zip(keys, coefs):
            z = self.coords(p, state, key, scratch)
            g = z.mul_(c) if g is None else g.add_(z, alpha=c)
        return g

    def add_directions_(self, p, state, keys: Sequence[int], weights: Sequence[float],
                        scratch: dict) -> None:
        """``p += sum_i weights_i * z(key_i)``: the whole update of a linear method."""
        for key, w in zip(keys, weights):
            self.perturb_(p, state, key, w, scratch)


class Masked(Space):
    """Sparse-MeZO: perturb and update only the small-magnitude entries of a weight.

    The threshold is the ``1 - sparsity`` quantile of ``|W|`` at the first step (fixed
    afterwards); the mask ``|W_t| <= threshold`` is recomputed from the unperturbed weights at
    the start of every step and held (one byte per entry) until the step ends.
    """

    def __init__(self, sparsity: float, noise_kind: str = "gaussian"):
        super().__init__(noise_kind)
        self.sparsity = sparsity

    def prepare(self, p, state, step, key, scratch):
        if "threshold" not in state:
            flat = p.detach().abs().flatten().float()
            k = max(1, math.ceil((1.0 - self.sparsity) * flat.numel()))
            state["threshold"] = flat.kthvalue(k).values
        scratch["mask"] = p.abs() <= state["threshold"].to(p.dtype)
        return None

    def coords(self, p, state, key, scratch):
        return noise(key, p.shape, self.noise_kind, p.dtype, p.device).mul_(scratch["mask"])

    def perturb_(self, p, state, key, alpha, scratch):
        p.add_(self.coords(p, state, key, scratch), alpha=alpha)


class HessianScaled(Space):
    """HiZOO: perturb along ``z / sqrt(H)`` with a diagonal Hessian estimate ``H`` (Zhao et al.,
    2024, arXiv 2402.15173), updated from the three-point curvature of each step:

        H <- (1 - alpha) H + alpha * |f(+) + f(-) - 2 f(0)| / (2 eps^2) * H * z * z

    The gradient estimate is then ``(f(+) - f(-)) / (2 eps) * z / sqrt(H_new)``.
    """

    linear = False

    def __init__(self, smoothing: float, noise_kind: str = "gaussian"):
        super().__init__(noise_kind)
        self.smoothing = smoothing

    def prepare(self, p, state, step, key, scratch):
        if "hessian" not in state:
            state["hessian"] = torch.ones_like(p)
        return None

    def perturb_(self, p, state, key, alpha, scratch):
        z = noise(key, p.shape, self.noise_kind, p.dtype, p.device)
        p.add_(z.div_(state["hessian"].sqrt()), alpha=alpha)

    def estimate(self, p, state, keys, coefs, probes, eps, scratch):
        h = state["hessian"]
        g = torch.zeros_like(p)
        for key, c, probe in zip(keys, coefs, probes):
            z = noise(key, p.shape, self.noise_kind, p.dtype, p.device)
            curvature = abs(probe.curv) / eps**2  # |f+ + f- - 2 f0| / (2 eps^2)
            observed = h * z * z  # the old H's, so computed before H is decayed
            h.mul_(1.0 - self.smoothing).add_(observed, alpha=self.smoothing * curvature)
            g.add_(z.div_(h.sqrt()), alpha=c)
        return g


class _Factored(Space):
    """Shared machinery of the matrix spaces: a rank, a resampling period and factors."""

    factors: tuple[str, ...] = ()
    compact = True

    def __init__(self, rank: int, resample_every: int, noise_kind: str = "gaussian"):
        super().__init__(noise_kind)
        self.rank = rank
        self.resample_every = resample_every

    def effective_rank(self, m: int, n: int) -> int:
        return min(self.rank, m)

    def prepare(self, p, state, step, key, scratch):
        epoch = step // self.resample_every
        if state.get("factor_epoch") == epoch:
            return None
        old = {name: state[name] for name in self.factors if name in state}
        m, n = as_matrix(p).shape
        new = self.draw(mix(key, _FACTOR_SALT, epoch), m, n, self.effective_rank(m, n),
                        p.dtype, p.device)
        state.update(new)
        state["factor_epoch"] = epoch
        if not old:
            return None
        return lambda c: self.transfer(c, old, new)

    def draw(self, key, m, n, r, dtype, device) -> dict:
        raise NotImplementedError

    def transfer(self, c, old: dict, new: dict) -> torch.Tensor:
        raise NotImplementedError

    def batched_factors(self, p, state, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a stack of coordinates ``(k, ...)``, ``(A, B)`` with ``A[i] @ B[i]`` the matrix
        view of ``coords[i]`` lifted to the parameter: a rank-r product, which lets a layer
        apply the perturbation to its activations. One factor is shared by every coordinate
        and returned once, two-dimensional (ZO-Muon's ``P``, LOZO's ``V^T``)."""
        raise NotImplementedError

    def lifted_factors(self, p, state, coords) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``A @ B`` the matrix view of ``coords`` lifted to the parameter."""
        a, b = self.batched_factors(p, state, coords.unsqueeze(0))
        return (a[0] if a.dim() == 3 else a), (b[0] if b.dim() == 3 else b)

    def add_lifted_(self, p, state, coords, alpha):
        a, b = self.lifted_factors(p, state, coords)
        as_matrix(p).addmm_(a, b, alpha=alpha)

    def perturb_(self, p, state, key, alpha, scratch):
        self.add_lifted_(p, state, self.coords(p, state, key, scratch), alpha)

    def add_directions_(self, p, state, keys, weights, scratch):
        # A linear combination of directions is one direction in coordinates: one write to p.
        self.add_lifted_(p, state, self.estimate(p, state, keys, weights, None, None, scratch), 1.0)


class Projected(_Factored):
    """ZO-Muon's subspace (Lang et al., 2026, arXiv 2602.17155): ``z = P @ Psi`` with ``P``
    (m x r) column-orthonormal from the QR of a Gaussian, shared by every query of a step and
    redrawn every ``resample_every`` steps, and ``Psi`` (r x n) Gaussian per query."""

    factors = ("P",)

    def draw(self, key, m, n, r, dtype, device):
        return {"P": orthonormal(key, m, r, dtype, device)}

    def coords_shape(self, p, state):
        return state["P"].shape[1], as_matrix(p).shape[1]

    def batched_factors(self, p, state, coords):
        return state["P"], coords

    def transfer(self, c, old, new):
        return new["P"].T @ (old["P"] @ c)


class LowRank(_Factored):
    """LOZO's low-rank perturbation (Chen et al., 2024, arXiv 2410.07698): ``z = U @ V^T`` with
    ``U`` (m x r) Gaussian per query and ``V`` (n x r) Gaussian, kept for ``resample_every``
    steps (lazy sampling). Unscaled, as in the authors' code."""

    factors = ("V",)

    def effective_rank(self, m, n):
        return min(self.rank, m, n)

    def draw(self, key, m, n, r, dtype, device):
        return {"V": noise(key, (n, r), self.noise_kind, dtype, device)}

    def coords_shape(self, p, state):
        return as_matrix(p).shape[0], state["V"].shape[1]

    def batched_factors(self, p, state, coords):
        return coords, state["V"].T

    def transfer(self, c, old, new):
        # LOZO-M's momentum transfer: M V_old^T V_new / n (V_old^T V_new / n ~ I for V_new = V_old).
        return c @ (old["V"].T @ new["V"]) / old["V"].shape[0]


class TwoSided(_Factored):
    """SubZero's random subspace (Yu et al., 2024, arXiv 2410.08989): ``z = s U Z V^T`` with
    ``U`` (m x r), ``V`` (n x r) column-orthonormal, redrawn every ``resample_every`` steps,
    ``Z`` (r x r) Gaussian per query, and ``s = sqrt(m n) / r`` so that ``E|z|^2 = m n`` as for
    dense Gaussian noise (the authors' code)."""

    factors = ("U", "V")

    def effective_rank(self, m, n):
        return min(self.rank, m, n)

    def draw(self, key, m, n, r, dtype, device):
        return {"U": orthonormal(mix(key, 0), m, r, dtype, device),
                "V": orthonormal(mix(key, 1), n, r, dtype, device)}

    def coords_shape(self, p, state):
        r = state["U"].shape[1]
        return r, r

    def batched_factors(self, p, state, coords):
        m, n = as_matrix(p).shape
        scale = math.sqrt(m * n) / state["U"].shape[1]
        return state["U"], (coords @ state["V"].T).mul_(scale)

    def transfer(self, c, old, new):
        return new["U"].T @ old["U"] @ c @ old["V"].T @ new["V"]
