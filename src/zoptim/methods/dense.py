"""MeZO and the methods that perturb whole tensors: momentum, sign, Adam, the conservative
step, Sparse-MeZO, HiZOO, FZOO and forward gradient. Defaults follow each method's paper or its
authors' code; where they leave a choice open the docstring says what is chosen here."""

from __future__ import annotations

import torch

from zoptim.parts import settings
from zoptim.engine.optimizer import ZOOptimizer, split_matrices
from zoptim.parts.estimators import JVP, Central, StdNormalized, ThreePoint
from zoptim.parts.spaces import Dense, HessianScaled, Masked
from zoptim.parts.transforms import Adam, Momentum, Sign

class MeZO(ZOOptimizer):
    """ZO-SGD with seeded in-place perturbations: MeZO (Malladi et al., 2023, "Fine-Tuning
    Language Models with Just Forward Passes", arXiv 2305.17333). A direction is regenerated
    from its seed whenever it is needed, so none is stored; ``directions > 1`` averages that
    many directions (n-SPSA), two evaluations each.

    The update, with ``z ~ N(0, I)`` (or Rademacher):

        g = (f(theta + eps z) - f(theta - eps z)) / (2 eps) * z
        theta <- theta - lr * (g + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-6.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        directions (int, optional): random directions a step; each costs two evaluations.
            Default: 1.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 directions: int = 1, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        self._setup(params, {}, lr=lr, eps=eps, weight_decay=weight_decay,
                    directions=directions, noise=noise, seed=seed, foreach=foreach)

    def _setup(self, params, own: dict, *, lr: float, eps: float, weight_decay: float,
               directions: int, noise: str, seed: int | None, foreach: bool | None) -> None:
        """Build the optimizer; a subclass passes the settings it adds to the groups in
        ``own``."""
        settings.check("directions", directions)
        ZOOptimizer.__init__(self, params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                                noise=noise, **own),
                             Central(directions), seed=seed, foreach=foreach)


ZOSGD = MeZO


class ZOSGDMomentum(MeZO):
    """ZO-SGD with heavy-ball momentum (ZO-SGD-MMT in Zhang et al., 2024, "Revisiting
    Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark",
    arXiv 2402.11592), as ``torch.optim.SGD`` (one dense buffer per parameter).

    The update, with ``g`` MeZO's estimate (central differences along ``z ~ N(0, I)``):

        b <- momentum * b + g                (b = g at the first step)
        theta <- theta - lr * (b + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-6.
        momentum (float, optional): the buffer's decay, in [0, 1). Default: 0.9.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        directions (int, optional): random directions a step; each costs two evaluations.
            Default: 1.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-6, momentum: float = 0.9, *, eps: float = 1e-3,
                 weight_decay: float = 0.0, directions: int = 1, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None):
        self._setup(params, dict(momentum=momentum), lr=lr, eps=eps, weight_decay=weight_decay,
                    directions=directions, noise=noise, seed=seed, foreach=foreach)

    def transforms(self, group):
        return [Momentum(group["momentum"])]


class ZOSignSGD(MeZO):
    """ZO-signSGD (Liu et al., 2019, "signSGD via Zeroth-Order Oracle", ICLR): the update is
    the elementwise sign of MeZO's estimate ``g``, so every entry moves by ``lr`` (hence the
    smaller default rate). (The benchmark code of arXiv 2402.11592 instead takes the sign of
    the scalar difference only.)

    The update:

        theta <- theta - lr * (sign(g) + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate, the length of every entry's move. Default: 1e-7.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        directions (int, optional): random directions a step; each costs two evaluations.
            Default: 1.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-7, *, eps: float = 1e-3, weight_decay: float = 0.0,
                 directions: int = 1, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        self._setup(params, {}, lr=lr, eps=eps, weight_decay=weight_decay,
                    directions=directions, noise=noise, seed=seed, foreach=foreach)

    def transforms(self, group):
        return [Sign()]


class ZOAdam(MeZO):
    """ZO-Adam (arXiv 2402.11592): Adam's bias-corrected moments of the ZO estimate
    ``g = c z`` (MeZO's), as ``torch.optim.Adam`` (two dense buffers per parameter). Weight
    decay is decoupled (AdamW style).

    The update, at step ``t``:

        m <- beta1 m + (1 - beta1) g,    v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr * ((m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + adam_eps)
                               + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-5.
        betas (tuple[float, float], optional): the moments' decays, each in [0, 1).
            Default: ``(0.9, 0.999)``.
        adam_eps (float, optional): Adam's denominator term (``eps`` is the perturbation
            scale). Default: 1e-8.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        directions (int, optional): random directions a step; each costs two evaluations.
            Default: 1.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, *, eps: float = 1e-3, weight_decay: float = 0.0,
                 directions: int = 1, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        self._setup(params, dict(betas=tuple(betas), adam_eps=adam_eps), lr=lr, eps=eps,
                    weight_decay=weight_decay, directions=directions, noise=noise, seed=seed,
                    foreach=foreach)

    def transforms(self, group):
        return [Adam(group["betas"], group["adam_eps"])]


class ZOSGDConservative(ZOOptimizer):
    """Conservative ZO-SGD (ZO-SGD-Cons, arXiv 2402.11592): after the ZO-SGD step, keep the
    best of ``theta - lr g``, ``theta + lr g`` and ``theta`` by their losses on the same batch.
    5 evaluations a step: ``f(theta)`` and the central difference, then the two candidates.
    Ties keep the earlier candidate in that order. No weight decay (none in the reference).

    The update, with ``g`` MeZO's estimate:

        theta <- argmin f(c)  over  c in (theta - lr g, theta + lr g, theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-6.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    evaluates_after_update = True

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), ThreePoint(), seed=seed,
                         foreach=foreach)

    def _after_update(self, probe, dirs, loss):
        descent = probe.evaluate()  # at theta - lr g
        self.move(probe, dirs, 2.0)
        ascent = probe.evaluate()  # at theta + lr g
        best = min((descent, -2.0), (ascent, 0.0), (loss, -1.0), key=lambda c: c[0])
        self.move(probe, dirs, best[1])


class ForwardGradient(ZOOptimizer):
    """Forward gradient (Baydin et al., 2022, "Gradients without Backpropagation"): the exact
    directional derivative along ``z ~ N(0, I)`` by ``torch.func.jvp``. One JVP counts as one
    query. The tangents are materialized: one extra copy of the optimized parameters.

    The update:

        g = (grad f . z) z
        theta <- theta - lr * (g + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        model (torch.nn.Module): the module the closure runs; every optimized parameter must
            belong to it.
        lr (float, optional): learning rate. Default: 1e-6.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` tangents.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    uses_model = "required"

    def __init__(self, params, model: torch.nn.Module, lr: float = 1e-6,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=1.0, weight_decay=weight_decay, noise=noise),
                         JVP(model), seed=seed, foreach=foreach)


class SparseMeZO(MeZO):
    """Sparse-MeZO (Liu et al., 2024, "Sparse MeZO: Less Parameters for Better Performance in
    Zeroth-Order LLM Fine-Tuning", arXiv 2402.15751): perturb and update only the entries of
    each weight matrix whose magnitude is at most the threshold fixed at the first step, so
    that a fraction ``1 - sparsity`` is tuned; the mask is recomputed from the current weights
    every step. Chosen here: vectors (biases, norms) stay dense.

    The update, with ``mask`` the entries at most the threshold (all of a vector's):

        g = (f(theta + eps mask * z) - f(theta - eps mask * z)) / (2 eps) * mask * z
        theta <- theta - lr * (g + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-6.
        sparsity (float, optional): the fraction of each matrix's entries left out, in
            [0, 1). Default: 0.8.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        directions (int, optional): random directions a step; each costs two evaluations.
            Default: 1.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-6, sparsity: float = 0.8, *, eps: float = 1e-3,
                 weight_decay: float = 0.0, directions: int = 1, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None):
        self._setup(params, dict(sparsity=sparsity), lr=lr, eps=eps, weight_decay=weight_decay,
                    directions=directions, noise=noise, seed=seed, foreach=foreach)

    def add_param_group(self, param_group: dict) -> None:
        add_split_group(self, param_group, lambda settings: {})

    def space(self, group):
        if group["matrix"]:
            return Masked(group["sparsity"], group["noise"])
        return Dense(group["noise"])


class HiZOO(ZOOptimizer):
    """HiZOO (Zhao et al., 2024, "Second-Order Fine-Tuning without Pain for LLMs: A Hessian
    Informed Zeroth-Order Optimizer", arXiv 2402.15173): perturbations scaled by a diagonal
    Hessian estimate kept as an EMA with weight ``smoothing`` (the authors' ``alpha``), three
    evaluations a step (``f(theta)`` and the central difference). One dense buffer per
    parameter.

    The update, with ``H`` the diagonal Hessian estimate (ones at the first step) and
    ``f(+-) = f(theta +- eps z / sqrt(H))``, ``f(0) = f(theta)``:

        H <- (1 - smoothing) H + smoothing * |f(+) + f(-) - 2 f(0)| / (2 eps^2) * H * z * z
        theta <- theta - lr * ((f(+) - f(-)) / (2 eps) * z / sqrt(H) + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-6.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        smoothing (float, optional): the Hessian estimate's EMA weight, in [0, 1].
            Default: 1e-8.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, smoothing: float = 1e-8,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, smoothing=smoothing,
                                      weight_decay=weight_decay, noise=noise), ThreePoint(),
                         seed=seed, foreach=foreach)

    def space(self, group):
        return HessianScaled(group["smoothing"], group["noise"])


class FZOO(ZOOptimizer):
    """FZOO (Dang et al., 2025, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large
    Language Models towards Adam-Scale Speed", arXiv 2506.09034): ``directions`` one-sided
    Rademacher queries against one baseline, the step divided by the spread of their losses
    (``parts.estimators.StdNormalized``), ``directions + 1`` evaluations a step.

    The update:

        c_i = (f(theta + eps u_i) - f(theta)) / std_i(f(theta + eps u_i))
        theta <- theta - lr * (mean_i c_i u_i + weight_decay * theta)

    As in the authors' code the differences are not divided by ``eps``: the normalized
    coefficients are unit-free, so the step's length is ``lr`` times a fixed scale of ``u``
    whatever ``eps`` and the loss's scale (the paper's ``eta`` is this ``lr`` times ``eps``).

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-5.
        eps (float, optional): perturbation scale of the queries. Default: 1e-3.
        directions (int, optional): perturbed queries a step (the authors' ``N``), at least 2.
            Default: 8.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"rademacher"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, directions: int = 8,
                 weight_decay: float = 0.0, noise: str = "rademacher", seed: int | None = None,
                 foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         StdNormalized(directions), seed=seed, foreach=foreach)


def add_split_group(opt: ZOOptimizer, param_group: dict, vector_settings) -> None:
    """Add a group as two: its matrices and its vectors (``vector_settings`` overrides)."""
    params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for part in split_matrices([{**param_group, "params": params}], opt.defaults,
                               vector_settings):
        ZOOptimizer.add_param_group(opt, part)
