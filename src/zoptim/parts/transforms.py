"""Update rules applied to gradient estimates in their space's coordinates.

Each transform maps estimates to update directions, keeping its state in the optimizer's
per-parameter state under its own names (so ``state_dict`` saves it). They compose in a
list, applied in order, as ``optax.chain`` does. A transform works on a stack ``G`` of the
estimates of several same-shaped tensors ``(L, ...)`` at once, its state held in one stacked
tensor per name whose rows are the per-parameter entries (``StateStack``): a step's calls do
not grow with the number of tensors.

A transform whose state is a linear image of past estimates lists it in ``carried``: when a
space redraws its factors the optimizer maps that state into the new coordinates. State that
is not (Adam's second moment) is listed in ``restarted`` and is estimated afresh.
"""

from __future__ import annotations

import torch


class StateStack:
    """The per-parameter states of a stack of tensors, seen as stacked tensors: ``get(name)``
    is an ``(L, ...)`` tensor whose row ``i`` is ``states[i][name]`` (the entries are views of
    it, so ``state_dict`` sees them as usual). Rows loaded from a checkpoint are stacked again
    once; after that, reading a stack costs no operator call."""

    def __init__(self, states: list[dict]):
        self.states = states
        self._bound: dict[str, tuple[torch.Tensor, list]] = {}

    def __len__(self) -> int:
        return len(self.states)

    def get(self, name: str) -> torch.Tensor | None:
        """The stack of ``name``, or ``None`` when no tensor has it yet."""
        rows = [s.get(name) for s in self.states]
        bound = self._bound.get(name)
        if bound is not None and all(a is b for a, b in zip(rows, bound[1])):
            return bound[0]
        if all(r is None for r in rows):
            return None
        if any(r is None for r in rows):
            raise ValueError(f"state {name!r} is held by some tensors of a set and not others")
        if len(rows) == 1:  # a stack of one is a view, not a copy
            stack = rows[0].unsqueeze(0)
            self._bound[name] = (stack, rows)
            return stack
        return self.set(name, torch.stack(rows))

    def set(self, name: str, stack: torch.Tensor) -> torch.Tensor:
        """Make ``stack`` the state ``name`` of every tensor (row ``i`` for tensor ``i``)."""
        rows = list(stack.unbind(0))
        for s, r in zip(self.states, rows):
            s[name] = r
        self._bound[name] = (stack, rows)
        return stack

    def drop(self, name: str) -> None:
        for s in self.states:
            s.pop(name, None)
        self._bound.pop(name, None)

    def scalar(self, name: str, default=None):
        return self.states[0].get(name, default)

    def set_scalar(self, name: str, value) -> None:
        for s in self.states:
            s[name] = value


class Transform:
    carried: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    # Whether the output's size is set by the transform, not by the estimate's (a sign, a
    # polar factor): an average before it then repeats a step's noise in the steps after.
    normalizes = False

    def memory(self, later: list["Transform"]) -> float:
        """How many steps' worth a step's noise moves the weights over the run, given the
        transforms ``later`` in the chain (1: it moves them once, in its own step)."""
        return 1.0

    def stacked(self, G: torch.Tensor, state: StateStack) -> torch.Tensor:
        """The update directions of a stack of estimates ``(L, ...)``."""
        raise NotImplementedError

    def __call__(self, g: torch.Tensor, state: dict) -> torch.Tensor:
        """The update direction of one tensor's estimate."""
        return self.stacked(g.unsqueeze(0), StateStack([state]))[0]


class Momentum(Transform):
    """Heavy-ball momentum as ``torch.optim.SGD`` keeps it: ``b <- beta b + (1 - dampening) g``,
    with ``b = g`` at the first step. ``dampening = beta`` gives an exponential moving average
    (LOZO-M's form)."""

    carried = ("momentum_buffer",)

    def __init__(self, beta: float, dampening: float = 0.0, nesterov: bool = False):
        self.beta, self.dampening, self.nesterov = beta, dampening, nesterov

    def memory(self, later):
        """An estimate's noise enters the buffer and decays by ``beta`` a step: it moves the
        weights ``(1 - dampening) / (1 - beta)`` times over (heavy ball: ``1 / (1 - beta)``),
        so ``((1 - dampening) / (1 - beta))^2`` in squared size; an average (``dampening =
        beta``) moves them once. A normalizing transform after the average keeps each step's
        size while the average makes successive steps alike: their noise then adds up as
        ``(1 + beta) / (1 - beta)`` steps' would."""
        b = self.beta
        if any(t.normalizes for t in later):
            return (1.0 + b) / (1.0 - b)
        return ((1.0 - self.dampening) / (1.0 - b)) ** 2

    def stacked(self, G, state):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state.set("momentum_buffer", G.clone())
        else:
            buf.mul_(self.beta).add_(G, alpha=1.0 - self.dampening)
        return G.add(buf, alpha=self.beta) if self.nesterov else buf.clone()


class Sign(Transform):
    """Elementwise sign of the estimate (ZO-signSGD, Liu et al., ICLR 2019)."""

    normalizes = True

    def stacked(self, G, state):
        return G.sign_()


class Adam(Transform):
    """Adam's moments with bias correction (Kingma & Ba, 2015), as ``torch.optim.Adam``.

    When a space redraws its factors, both moments restart from zero with the bias
    correction: the second is not a linear image of past estimates, and a first moment
    carried into the new coordinates beside a second one restarted from a single estimate
    would be divided by ``1 - beta1`` against ``sqrt(g^2)``, a step hundreds of times too
    long."""

    restarted = ("exp_avg", "exp_avg_sq", "adam_step")

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-8):
        self.b1, self.b2 = betas
        self.eps = eps

    def memory(self, later):
        """1: the first moment spreads an estimate's noise over the steps after it with
        weights ``(1 - beta1) beta1^k`` that sum to one, and the second moment's divisor
        changes slowly (over ``1 / (1 - beta2)`` steps), so the noise moves the weights once
        in all, by what its first, bias-corrected step (``g / sqrt(g^2)``) measures."""
        return 1.0

    def stacked(self, G, state):
        m = state.get("exp_avg")
        if m is None:
            m = state.set("exp_avg", torch.zeros_like(G))
        v = state.get("exp_avg_sq")
        if v is None:
            v = state.set("exp_avg_sq", torch.zeros_like(G))
            state.set_scalar("adam_step", 0)
        t = state.scalar("adam_step") + 1
        state.set_scalar("adam_step", t)
        m.mul_(self.b1).add_(G, alpha=1 - self.b1)
        v.mul_(self.b2).addcmul_(G, G, value=1 - self.b2)
        denom = (v / (1 - self.b2**t)).sqrt_().add_(self.eps)
        return (m / (1 - self.b1**t)).div_(denom)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U V^T`` of ``g`` (Jordan et al., Muon), or of
    each matrix of a stack ``(..., m, n)``.

    A quintic iteration ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and coefficients
    (3.4445, -4.7750, 2.0315), chosen to push singular values up fast from near zero rather
    than to converge exactly: after 5 steps they lie roughly in [0.7, 1.2]. Runs in float32.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    fma = torch.addmm if x.dim() == 2 else torch.baddbmm  # beta * s + alpha * u @ v, one pass
    for _ in range(steps):
        gram = x @ x.mT
        x = fma(x, fma(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).to(g.dtype)


def polar(g: torch.Tensor) -> torch.Tensor:
    """The exact orthogonal polar factor ``U V^T`` of ``g`` (or of each matrix of a stack) by
    SVD, in float32."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return (u @ vh).to(g.dtype)


class Orthogonalize(Transform):
    """Replace a matrix estimate by its orthogonal polar factor: Newton-Schulz or SVD. A stack
    of estimates is orthogonalized in one batched iteration."""

    normalizes = True

    def __init__(self, method: str = "newton_schulz", steps: int = 5):
        if method not in ("newton_schulz", "svd"):
            raise ValueError(f"orthogonalization must be 'newton_schulz' or 'svd', got {method!r}")
        self.method, self.steps = method, steps

    def stacked(self, G, state):
        mats = G if G.dim() == 3 else G.reshape(G.shape[0], G.shape[1], -1)
        out = newton_schulz(mats, self.steps) if self.method == "newton_schulz" else polar(mats)
        return out.view_as(G)


class PartialOrthogonalize(Transform):
    """Keep the top ``k`` singular directions of a matrix estimate and drop the rest:
    ``U_k V_k^T`` (ZO-MOPI's partial orthogonalization, Chen & Ma, 2026, arXiv 2605.09034).
    One sweep of a streaming power iteration a step, warm-started from the last step's right
    vectors: ``V <- qr(M^T M V)``, ``U = M V`` with unit columns (as the authors' code; not
    orthogonalized, so its singular values are 1 only once the iteration has converged, when
    the result is the polar factor of the rank-``k`` SVD truncation). The result has rank
    ``k`` at most.

    The first step (and a change of ``k``) starts from ``M``'s exact top-``k`` right singular
    vectors, an SVD of the small estimate, so no random start is drawn. ``V`` lives on the
    estimate's column side, which a redraw of ZO-Muon's ``P`` (the row side) leaves in
    place: it is kept across redraws rather than restarted."""

    normalizes = True

    def __init__(self, k: int):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r} is invalid: it must be an integer >= 1")
        self.k = k

    def stacked(self, G, state):
        mats = G if G.dim() == 3 else G.reshape(G.shape[0], G.shape[1], -1)
        mats = mats.to(torch.promote_types(mats.dtype, torch.float32))  # half: in float32
        k = min(self.k, *mats.shape[-2:])
        v = state.get("power_v")
        if v is None or v.shape[-1] != k:
            v = torch.linalg.svd(mats, full_matrices=False).Vh[:, :k].mT
        else:
            v = torch.linalg.qr(mats.mT @ (mats @ v)).Q
        state.set("power_v", v.contiguous())
        u = mats @ v
        u = u / torch.linalg.vector_norm(u, dim=-2, keepdim=True).clamp_min(1e-12)
        return (u @ v.mT).to(G.dtype).view_as(G)


class ClipNorm(Transform):
    """Scale the estimate down to at most ``max_norm`` in Frobenius norm, per tensor."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def stacked(self, G, state):
        norms = torch.linalg.vector_norm(G.flatten(1), dim=1)
        scale = (self.max_norm / norms).clamp_(max=1.0)
        return G.mul_(scale.view(-1, *([1] * (G.dim() - 1))))
