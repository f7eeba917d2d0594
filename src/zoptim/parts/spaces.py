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
Bilinear        A @ B^T / sqrt(r)           [A; B] ((m+n) x r)  none
==============  ==========================  ==================  ===========================

The coordinates of a key are always the noise of that key in the coordinates' shape, so a
step draws the coordinates of many tensors at once (``engine.plan``, one kernel a set). The factored spaces
work on stacks: the tensors of one shape hold their factors in one ``(L, ...)`` tensor and
are lifted together (``lift``), which is how a step's operator calls stay independent of the
model's depth (``engine.plan``).

Factors that change on a schedule are regenerated from ``(seed, epoch, parameter index)``,
so a resumed run draws the same ones. When they change, state kept in coordinates (momentum)
is carried over by ``transfer``. Tensors of more than two dimensions are viewed as matrices
``(shape[0], rest)`` (convolution kernels, as Muon does).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from zoptim.noise import add_noise_, mix, noise, noise_stacks

# Salt separating the keys of scheduled factors from the keys of per-step noise.
_FACTOR_SALT = 0xFAC7


def as_matrix(p: torch.Tensor) -> torch.Tensor:
    """View a parameter of two or more dimensions as ``(shape[0], numel / shape[0])``; a matrix
    is returned as it is (no operator call)."""
    return p if p.dim() == 2 else p.view(p.shape[0], -1)


def orthonormal(key, rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (``key`` an int), or a stack of them
    (``key`` a list of ints): QR of a Gaussian, signs fixed by R's diagonal so that the draw
    is uniform (Haar) and does not depend on the QR routine's sign choice."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    keys = [key] if isinstance(key, int) else list(key)
    (gauss,) = noise_stacks([keys], [(rows, cols)], dtype=work, device=device)
    q, r = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    # row-major like every state tensor: a run resumed from a checkpoint (which stores
    # tensors contiguous) then multiplies the same layout, so its rounding is the same
    q = (q * signs.unsqueeze(-2)).to(dtype).contiguous()
    return q[0] if isinstance(key, int) else q


class Space:
    """Where a perturbation lives: the base of every space. Subclasses say how a key becomes a
    perturbation and how an estimate in coordinates becomes an update.

    ``own_perturbation`` declares that the perturbation is computed tensor by tensor by
    ``perturb_`` (a mask, a scaling), not drawn as plain noise of the coordinates' shape: the
    step plan then moves the tensor on its own. ``Factored`` spaces are low-rank products of
    factors kept in the state, moved as stacks.
    """

    own_perturbation = False

    def __init__(self, noise_kind: str = "gaussian"):
        self.noise_kind = noise_kind

    def signature(self) -> tuple:
        """What makes two spaces interchangeable: tensors whose spaces share it move together."""
        return (type(self).__name__, *sorted(vars(self).items()))

    def coords_shape(self, p: torch.Tensor, state: dict) -> tuple[int, ...]:
        """The shape of the coordinates of ``p``'s perturbations."""
        return tuple(p.shape)

    def prepare(self, p, state: dict, step: int, key: int, scratch: dict) -> None:
        """Per-step preparation of one tensor (own-perturbation spaces): masks, scalings."""

    def perturb_(self, p, state: dict, key: int, alpha: float, scratch: dict) -> None:
        """``p += alpha * z(key)``, one tensor, regenerating ``z``."""
        raise NotImplementedError

    def estimate(self, p, state: dict, keys: Sequence[int], coefs: Sequence[float], dirs, eps,
                 scratch: dict) -> torch.Tensor:
        """The gradient estimate of one tensor in coordinates, ``sum_i coef_i * coords(key_i)``,
        regenerating each direction's coordinates."""
        raise NotImplementedError


class Dense(Space):
    """Dense Gaussian (or Rademacher) perturbation of the whole tensor: MeZO's."""

    def perturb_(self, p, state, key, alpha, scratch):
        add_noise_(p, key, alpha, self.noise_kind)

    def estimate(self, p, state, keys, coefs, dirs, eps, scratch):
        g = None
        for key, c in zip(keys, coefs):
            z = noise(key, p.shape, self.noise_kind, p.dtype, p.device)
            g = z.mul_(c) if g is None else g.add_(z, alpha=c)
        return g


class Masked(Dense):
    """Sparse-MeZO: perturb and update only the small-magnitude entries of a weight.

    The threshold is the ``1 - sparsity`` quantile of ``|W|`` at the first step (fixed
    afterwards); the mask ``|W_t| <= threshold`` is recomputed from the unperturbed weights at
    the start of every step and held (one byte per entry) until the step ends.
    """

    own_perturbation = True

    def __init__(self, sparsity: float, noise_kind: str = "gaussian"):
        super().__init__(noise_kind)
        self.sparsity = sparsity

    def prepare(self, p, state, step, key, scratch):
        if "threshold" not in state:
            flat = p.detach().abs().flatten().float()
            k = max(1, math.ceil((1.0 - self.sparsity) * flat.numel()))
            state["threshold"] = flat.kthvalue(k).values
        scratch["mask"] = p.abs() <= state["threshold"].to(p.dtype)

    def _coords(self, p, key, scratch):
        return noise(key, p.shape, self.noise_kind, p.dtype, p.device).mul_(scratch["mask"])

    def perturb_(self, p, state, key, alpha, scratch):
        p.add_(self._coords(p, key, scratch), alpha=alpha)

    def estimate(self, p, state, keys, coefs, dirs, eps, scratch):
        g = None
        for key, c in zip(keys, coefs):
            z = self._coords(p, key, scratch)
            g = z.mul_(c) if g is None else g.add_(z, alpha=c)
        return g


class HessianScaled(Dense):
    """HiZOO: perturb along ``z / sqrt(H)`` with a diagonal Hessian estimate ``H`` (Zhao et al.,
    2024, arXiv 2402.15173), updated from the three-point curvature of each step:

        H <- (1 - alpha) H + alpha * |f(+) + f(-) - 2 f(0)| / (2 eps^2) * H * z * z

    The gradient estimate is then ``(f(+) - f(-)) / (2 eps) * z / sqrt(H_new)``.
    """

    own_perturbation = True

    def __init__(self, smoothing: float, noise_kind: str = "gaussian"):
        super().__init__(noise_kind)
        self.smoothing = smoothing

    def prepare(self, p, state, step, key, scratch):
        if "hessian" not in state:
            state["hessian"] = torch.ones_like(p)

    def perturb_(self, p, state, key, alpha, scratch):
        z = noise(key, p.shape, self.noise_kind, p.dtype, p.device)
        p.add_(z.div_(state["hessian"].sqrt()), alpha=alpha)

    def estimate(self, p, state, keys, coefs, dirs, eps, scratch):
        h = state["hessian"]
        g = torch.zeros_like(p)
        for key, c, d in zip(keys, coefs, dirs):
            z = noise(key, p.shape, self.noise_kind, p.dtype, p.device)
            curvature = abs(d.curv) / eps**2  # |f+ + f- - 2 f0| / (2 eps^2)
            observed = h * z * z  # the old H's, so computed before H is decayed
            h.mul_(1.0 - self.smoothing).add_(observed, alpha=self.smoothing * curvature)
            g.add_(z.div_(h.sqrt()), alpha=c)
        return g


class Factored(Space):
    """A low-rank perturbation ``A @ B`` of a matrix, one factor drawn per step in coordinates
    and the others kept in the state (``factors``), redrawn every ``resample_every`` steps.

    Every method takes stacks: ``factors`` maps each name to an ``(L, ...)`` tensor, one row
    per tensor of a set, and coordinates ``C`` are ``(L, *coords)``."""

    factors: tuple[str, ...] = ()

    def __init__(self, rank: int, resample_every: int, noise_kind: str = "gaussian"):
        super().__init__(noise_kind)
        self.rank = rank
        self.resample_every = resample_every

    def epoch(self, step: int) -> int:
        return step // self.resample_every

    def effective_rank(self, m: int, n: int) -> int:
        return min(self.rank, m)

    def coords_shape(self, p, state):
        m, n = as_matrix(p).shape
        return self.shape_of(m, n, self.effective_rank(m, n))

    def shape_of(self, m: int, n: int, r: int) -> tuple[int, int]:
        """The coordinates' shape of an ``m x n`` matrix at rank ``r``."""
        raise NotImplementedError

    def draw(self, keys: list[int], m: int, n: int, r: int, dtype, device) -> dict:
        """The factors of ``len(keys)`` matrices of shape ``m x n``, stacked."""
        raise NotImplementedError

    def lift(self, factors: dict, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` with ``s * A @ B`` the perturbations of coordinates ``C`` (stacks)."""
        raise NotImplementedError

    def transfer(self, c: torch.Tensor, old: dict, new: dict) -> torch.Tensor:
        """State kept in the old factors' coordinates, in the new ones' (stacks)."""
        raise NotImplementedError

    def scale(self, factors: dict) -> float:
        """The constant ``s`` of ``lift``."""
        return 1.0

    def slice_factors(self, factors: dict, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For per-slice coordinates ``Z`` ``(L, S, *coords)`` (already times ``s``), the
        factors ``(A, B)`` of each slice's perturbation: the one made from ``Z`` is
        ``(L, S, ...)``, the shared one ``(L, ...)``."""
        A, B, _ = self.lift(factors, Z)
        return A, B

    def perturb_(self, p, state, key, alpha, scratch):
        # one tensor on its own (forward-mode tangents): its factors as a stack of one
        factors = {name: state[name].unsqueeze(0) for name in self.factors}
        C = noise(key, self.coords_shape(p, state), self.noise_kind, p.dtype, p.device)
        a, b, s = self.lift(factors, C.unsqueeze(0))
        as_matrix(p).addmm_(a[0], b[0], alpha=alpha * s)


class Projected(Factored):
    """ZO-Muon's subspace (Lang et al., 2026, arXiv 2602.17155): ``z = P @ Psi`` with ``P``
    (m x r) column-orthonormal from the QR of a Gaussian, shared by every query of a step and
    redrawn every ``resample_every`` steps, and ``Psi`` (r x n) Gaussian per query."""

    factors = ("P",)

    def shape_of(self, m, n, r):
        return r, n

    def draw(self, keys, m, n, r, dtype, device):
        return {"P": orthonormal(keys, m, r, dtype, device)}

    def lift(self, factors, C):
        return factors["P"], C, 1.0

    def transfer(self, c, old, new):
        return new["P"].mT @ (old["P"] @ c)


class LowRank(Factored):
    """LOZO's low-rank perturbation (Chen et al., 2024, arXiv 2410.07698): ``z = U @ V^T`` with
    ``U`` (m x r) Gaussian per query and ``V`` (n x r) Gaussian, kept for ``resample_every``
    steps (lazy sampling).

    Unscaled, as in the authors' code: ``E|z|^2 = r m n``, ``r`` times dense noise's, so a
    learning rate tuned for MeZO is ``r`` times too large here (ZO-Muon's paper runs its LOZO
    baseline with ``z / r``; take ``lr / r`` to compare with it)."""

    factors = ("V",)

    def effective_rank(self, m, n):
        return min(self.rank, m, n)

    def shape_of(self, m, n, r):
        return m, r

    def draw(self, keys, m, n, r, dtype, device):
        (v,) = noise_stacks([list(keys)], [(n, r)], self.noise_kind, dtype, device)
        return {"V": v}

    def lift(self, factors, C):
        return C, factors["V"].mT, 1.0

    def transfer(self, c, old, new):
        # LOZO-M's momentum transfer: M V_old^T V_new / n (V_old^T V_new / n ~ I for V_new = V_old).
        return c @ (old["V"].mT @ new["V"]) / old["V"].shape[-2]


class TwoSided(Factored):
    """SubZero's random subspace (Yu et al., 2024, arXiv 2410.08989): ``z = s U Z V^T`` with
    ``U`` (m x r), ``V`` (n x r) column-orthonormal, redrawn every ``resample_every`` steps,
    ``Z`` (r x r) Gaussian per query, and ``s = sqrt(m n) / r`` so that ``E|z|^2 = m n`` as for
    dense Gaussian noise (the authors' code)."""

    factors = ("U", "V")

    def effective_rank(self, m, n):
        return min(self.rank, m, n)

    def shape_of(self, m, n, r):
        return r, r

    def draw(self, keys, m, n, r, dtype, device):
        return {"U": orthonormal([mix(k, 0) for k in keys], m, r, dtype, device),
                "V": orthonormal([mix(k, 1) for k in keys], n, r, dtype, device)}

    def scale(self, factors):
        U, V = factors["U"], factors["V"]
        return math.sqrt(U.shape[-2] * V.shape[-2]) / U.shape[-1]

    def lift(self, factors, C):
        return factors["U"], C @ factors["V"].mT, self.scale(factors)

    def slice_factors(self, factors, Z):
        return factors["U"], Z @ factors["V"].mT.unsqueeze(1)

    def transfer(self, c, old, new):
        return new["U"].mT @ old["U"] @ c @ old["V"].mT @ new["V"]


class Bilinear(Factored):
    """EGGROLL's perturbation ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025,
    arXiv 2511.16652): ``z = A @ B^T / sqrt(r)`` with ``A`` (m x r) and ``B`` (n x r) both
    Gaussian and both drawn per query, so nothing is kept between steps. The coordinates of
    a query are its two factors stacked, ``[A; B]`` ((m + n) x r).

    Unlike the other spaces, ``z`` is bilinear in its coordinates: a weighted sum of
    perturbations is not the perturbation of the weighted coordinates. The step plan keeps
    the directions apart (``engine.plan.PopulationSet``): the sum of ``k`` directions is the
    product of their factors side by side, ``[w_1 A_1, ..., w_k A_k] [B_1, ..., B_k]^T``, a
    rank-``k r`` matrix lifted in one product, never a dense noise tensor."""

    factors = ()

    def __init__(self, rank: int, noise_kind: str = "gaussian"):
        super().__init__(rank, resample_every=1, noise_kind=noise_kind)

    def effective_rank(self, m, n):
        return min(self.rank, m, n)

    def shape_of(self, m, n, r):
        return m + n, r

    def draw(self, keys, m, n, r, dtype, device):
        return {}

    def split(self, C: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(A, B^T)`` of stacked coordinates ``C`` (``(..., m + n, R)``)."""
        return C[..., :m, :], C[..., m:, :].mT

    def perturb_(self, p, state, key, alpha, scratch):
        m, n = as_matrix(p).shape
        r = self.effective_rank(m, n)
        C = noise(key, self.shape_of(m, n, r), self.noise_kind, p.dtype, p.device)
        a, bt = self.split(C, m)
        as_matrix(p).addmm_(a, bt, alpha=alpha / math.sqrt(r))


def factor_keys(space: Factored, seed: int, indices: list[int], epoch: int) -> list[int]:
    """The keys of the factors of the tensors at ``indices`` for ``epoch``."""
    return [mix(mix(seed, i), _FACTOR_SALT, epoch) for i in indices]
