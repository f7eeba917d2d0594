"""Per-tensor update rules, applied to a gradient estimate in its space's coordinates.

Each transform maps an estimate ``g`` to an update direction, keeping its state in the
optimizer's per-parameter state under its own names (so ``state_dict`` saves it). They
compose in a list, applied in order, as ``optax.chain`` does. A transform whose state is a
linear image of past estimates lists it in ``carried``; when a space redraws its factors the
optimizer maps that state into the new coordinates.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class Transform:
    carried: tuple[str, ...] = ()

    def __call__(self, g: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def many(self, gs: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """The transform of several tensors' estimates (compact ones, held together): one by
        one unless a transform does better."""
        return [self(g, state) for g, state in zip(gs, states)]


class Momentum(Transform):
    """Heavy-ball momentum as ``torch.optim.SGD`` keeps it: ``b <- beta b + (1 - dampening) g``,
    with ``b = g`` at the first step. ``dampening = beta`` gives an exponential moving average
    (LOZO-M's form)."""

    carried = ("momentum_buffer",)

    def __init__(self, beta: float, dampening: float = 0.0, nesterov: bool = False):
        self.beta, self.dampening, self.nesterov = beta, dampening, nesterov

    def __call__(self, g, state):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.clone()
        else:
            buf.mul_(self.beta).add_(g, alpha=1.0 - self.dampening)
        return g.add(buf, alpha=self.beta) if self.nesterov else buf.clone()


class Sign(Transform):
    """Elementwise sign of the estimate (ZO-signSGD, Liu et al., ICLR 2019)."""

    def __call__(self, g, state):
        return g.sign_()


class Adam(Transform):
    """Adam's moments with bias correction (Kingma & Ba, 2015), as ``torch.optim.Adam``.

    The second moment is not a linear image of past estimates, so when a space redraws its
    factors it is re-estimated from zero (and the bias correction restarts with it)."""

    carried = ("exp_avg",)

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-8):
        self.b1, self.b2 = betas
        self.eps = eps

    def __call__(self, g, state):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
        if "exp_avg_sq" not in state or state["exp_avg_sq"].shape != g.shape:
            state["exp_avg_sq"] = torch.zeros_like(g)
            state["adam_step"] = 0
        state["adam_step"] += 1
        t = state["adam_step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        denom = (v / (1 - self.b2**t)).sqrt_().add_(self.eps)
        return (m / (1 - self.b1**t)).div_(denom)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U V^T`` of ``g`` (Jordan et al., Muon), or of
    each matrix of a stack ``(k, m, n)``.

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
    """Replace a matrix estimate by its orthogonal polar factor: Newton-Schulz or SVD."""

    def __init__(self, method: str = "newton_schulz", steps: int = 5):
        if method not in ("newton_schulz", "svd"):
            raise ValueError(f"orthogonalization must be 'newton_schulz' or 'svd', got {method!r}")
        self.method, self.steps = method, steps

    def __call__(self, g, state):
        return self.many([g], [state])[0]

    def many(self, gs, states):
        # same-shaped matrices in one stack: one batched iteration instead of one per matrix
        out: list = [None] * len(gs)
        alike = defaultdict(list)
        for i, g in enumerate(gs):
            alike[(g.shape, g.dtype, g.device)].append(i)
        for idx in alike.values():
            stack = torch.stack([gs[i].reshape(gs[i].shape[0], -1) for i in idx])
            stack = newton_schulz(stack, self.steps) if self.method == "newton_schulz" \
                else polar(stack)
            for i, o in zip(idx, stack):
                out[i] = o.view_as(gs[i])
        return out


class ClipNorm(Transform):
    """Scale the estimate down to at most ``max_norm`` in Frobenius norm, per tensor."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def __call__(self, g, state):
        norm = float(g.norm())
        return g.mul_(self.max_norm / norm) if norm > self.max_norm else g
