"""The named methods: each one an estimator, a space per parameter group and a list of
transforms. Defaults follow each method's paper or its authors' code; where they leave a
choice open the docstring says what is chosen here."""

from __future__ import annotations

import torch

from zoptim.evaluators.batched import BatchedQueries
from zoptim.engine.optimizer import ZOOptimizer, split_matrices
from zoptim.noise import mix
from zoptim.parts.estimators import JVP, Central, Comparison, Forward, Ranking, ThreePoint
from zoptim.parts.spaces import HessianScaled, LowRank, Masked, Projected, Space, TwoSided
from zoptim.parts.transforms import Adam, Momentum, Orthogonalize, Sign


class MeZO(ZOOptimizer):
    """ZO-SGD with seeded in-place perturbations: MeZO (Malladi et al., 2023, "Fine-Tuning
    Language Models with Just Forward Passes", arXiv 2305.17333).

    ``theta <- theta - lr * ((f(theta + eps z) - f(theta - eps z)) / (2 eps) * z + wd * theta)``,
    ``z ~ N(0, I)`` (or Rademacher, ``noise="rademacher"``). ``queries > 1`` averages that many
    directions (n-SPSA), 2 evaluations each. Weight decay applies to every tensor of a group;
    exclude biases and norms by putting them in a group with ``weight_decay=0``.
    """

    # Settings a subclass adds to the groups (passed through ``extra``); anything else is a typo.
    own_settings: tuple[str, ...] = ()

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 queries: int = 1, noise: str = "gaussian", seed: int | None = None, **extra):
        _check_settings(self, extra)
        _check_queries(queries)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise,
                                      **extra), Central(queries), seed=seed)


ZOSGD = MeZO


class ZOSGDMomentum(MeZO):
    """ZO-SGD with heavy-ball momentum (ZO-SGD-MMT in Zhang et al., 2024, "Revisiting
    Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark",
    arXiv 2402.11592): ``b <- momentum * b + g``, ``theta <- theta - lr * b``, as
    ``torch.optim.SGD`` (one dense buffer per parameter)."""

    own_settings = ("momentum",)

    def __init__(self, params, lr: float = 1e-6, momentum: float = 0.9, **kw):
        super().__init__(params, lr=lr, momentum=momentum, **kw)

    def transforms(self, group):
        return [Momentum(group["momentum"])]


class ZOSignSGD(MeZO):
    """ZO-signSGD (Liu et al., 2019, "signSGD via Zeroth-Order Oracle", ICLR): the update is
    the elementwise sign of the estimate, ``theta <- theta - lr * sign(g)``. (The benchmark
    code of arXiv 2402.11592 instead takes the sign of the scalar difference only.)"""

    def __init__(self, params, lr: float = 1e-7, **kw):
        super().__init__(params, lr=lr, **kw)

    def transforms(self, group):
        return [Sign()]


class ZOAdam(MeZO):
    """ZO-Adam (arXiv 2402.11592): Adam's bias-corrected moments of the ZO estimate
    ``g = c z``, as ``torch.optim.Adam`` (two dense buffers per parameter). Weight decay is
    decoupled (AdamW style)."""

    own_settings = ("betas", "adam_eps")

    def __init__(self, params, lr: float = 1e-5, betas=(0.9, 0.999), adam_eps: float = 1e-8,
                 **kw):
        super().__init__(params, lr=lr, betas=tuple(betas), adam_eps=adam_eps, **kw)

    def transforms(self, group):
        return [Adam(group["betas"], group["adam_eps"])]


class _OrdinalMethod(ZOOptimizer):
    """A method that reads only the order of its values: the estimate's scale comes from the
    ranks or signs, not from ``eps``, so ``lr`` is the step length along it."""

    @staticmethod
    def _coefs(slot, dirs) -> list[float]:
        return [d.diff / len(dirs) for d in dirs]


class ZORankSGD(_OrdinalMethod):
    """ZO-RankSGD (Tang et al., 2024, ICLR, arXiv 2303.03751): ``candidates`` perturbations
    ``x + eps z_i`` are ranked, and ``x <- x - lr * g`` with ``g`` the rank-weighted sum of
    ``estimators.Ranking``. The closure's values are used only through their order; with
    ``ask``/``tell(ranking=...)`` the objective need only rank the candidates."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-2, candidates: int = 4,
                 noise: str = "gaussian", seed: int | None = None):
        if not (isinstance(candidates, int) and candidates >= 2):
            raise ValueError(f"candidates={candidates!r} is invalid: rank at least 2")
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), Ranking(candidates),
                         seed=seed)


class ZOComparison(_OrdinalMethod):
    """Descent from a comparison oracle: per direction, only which of ``x + eps z`` and
    ``x - eps z`` is better is known (``estimators.Comparison``); ``x <- x - lr * mean_i
    sign_i z_i``. With ``ask``/``tell(better=...)`` the objective need only compare."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-2, pairs: int = 1,
                 noise: str = "gaussian", seed: int | None = None):
        if not (isinstance(pairs, int) and pairs >= 1):
            raise ValueError(f"pairs={pairs!r} is invalid: compare at least 1 pair")
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), Comparison(pairs), seed=seed)


class ZOSGDConservative(ZOOptimizer):
    """Conservative ZO-SGD (ZO-SGD-Cons, arXiv 2402.11592): after the ZO-SGD step, keep the
    best of ``theta - lr g``, ``theta + lr g`` and ``theta`` by their losses on the same batch.
    5 evaluations a step: ``f(theta)`` and the central difference, then the two candidates.
    Ties keep the earlier candidate in that order. No weight decay (none in the reference)."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, noise: str = "gaussian",
                 seed: int | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), ThreePoint(), seed=seed)

    def _move(self, probe, dirs, factor: float) -> None:
        """Move every tensor by ``factor * lr * g``."""
        for s in probe.slots:
            keys = [mix(d.seed, s.index) for d in dirs]
            weights = [factor * s.group["lr"] * c for c in self._coefs(s, dirs)]
            s.space.add_directions_(s.p, self.state[s.p], keys, weights, probe.scratch[s.p])

    def _after_update(self, probe, dirs, loss):
        descent = probe.evaluate()  # at theta - lr g
        self._move(probe, dirs, 2.0)
        ascent = probe.evaluate()  # at theta + lr g
        best = min((descent, -2.0), (ascent, 0.0), (loss, -1.0), key=lambda c: c[0])
        self._move(probe, dirs, best[1])


class ForwardGradient(ZOOptimizer):
    """Forward gradient (Baydin et al., 2022, "Gradients without Backpropagation"): the exact
    directional derivative along ``z ~ N(0, I)`` by ``torch.func.jvp``, ``g = (grad f . z) z``.
    Needs the ``model`` whose parameters the closure uses; one JVP counts as one query."""

    uses_model = True

    def __init__(self, params, model: torch.nn.Module, lr: float = 1e-6,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None):
        super().__init__(params, dict(lr=lr, eps=1.0, weight_decay=weight_decay, noise=noise),
                         JVP(model), seed=seed)


class SparseMeZO(MeZO):
    """Sparse-MeZO (Liu et al., 2024, "Sparse MeZO: Less Parameters for Better Performance in
    Zeroth-Order LLM Fine-Tuning", arXiv 2402.15751): perturb and update only the entries of
    each weight matrix whose magnitude is at most the threshold fixed at the first step, so
    that a fraction ``1 - sparsity`` is tuned; the mask is recomputed from the current weights
    every step. Chosen here: vectors (biases, norms) stay dense."""

    own_settings = ("sparsity",)

    def __init__(self, params, lr: float = 1e-6, sparsity: float = 0.8, **kw):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} is invalid: it must be in [0, 1)")
        super().__init__(params, lr=lr, sparsity=sparsity, **kw)

    def add_param_group(self, param_group: dict) -> None:
        add_split_group(self, param_group, lambda settings: {})

    def space(self, group):
        if group["matrix"]:
            return Masked(group["sparsity"], group["noise"])
        return Space(group["noise"])


class HiZOO(ZOOptimizer):
    """HiZOO (Zhao et al., 2024, "Second-Order Fine-Tuning without Pain for LLMs: A Hessian
    Informed Zeroth-Order Optimizer", arXiv 2402.15173): perturbations scaled by a diagonal
    Hessian estimate kept as an EMA with weight ``smoothing`` (the authors' ``alpha``), three
    evaluations a step. One dense buffer per parameter."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, smoothing: float = 1e-8,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None):
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing={smoothing!r} is invalid: it must be in [0, 1]")
        super().__init__(params, dict(lr=lr, eps=eps, smoothing=smoothing,
                                      weight_decay=weight_decay, noise=noise), ThreePoint(),
                         seed=seed)

    def space(self, group):
        return HessianScaled(group["smoothing"], group["noise"])


class _MatrixMethod(ZOOptimizer):
    """A method with a low-dimensional space for matrices and dense noise for vectors.

    Given ``model`` (the module the closure runs), a step evaluates all its points in one
    forward pass on a stacked batch, with the perturbations applied to activations
    (:mod:`zoptim.evaluators.batched`): the closure is then called as ``closure(slices)`` and returns one
    loss per slice. ``batched=False`` keeps in-place probing; ``max_slices`` caps the slices of
    one forward (the activation memory). A model the mode cannot serve falls back to in-place
    probing with a warning that names the parameter."""

    matrix_space: type
    uses_model = True  # optional here: it turns batched queries on

    def __init__(self, params, defaults, estimator, vector_settings, seed, model=None,
                 batched: bool | None = None, max_slices: int | None = None):
        self._vector_settings = vector_settings
        super().__init__(params, defaults, estimator, seed=seed)
        if batched and model is None:
            raise ValueError("batched queries need the model the closure runs: pass model=")
        if model is not None and batched is not False:
            self.batched = BatchedQueries(model, max_slices)

    def add_param_group(self, param_group: dict) -> None:
        # Every group, at construction or later, is split into its matrices and its vectors.
        add_split_group(self, param_group, self._vector_settings)

    def space(self, group):
        if group["matrix"]:
            return self.matrix_space(group["rank"], group["resample_every"], group["noise"])
        return Space(group["noise"])


class LOZO(_MatrixMethod):
    """LOZO (Chen et al., 2024, "Enhancing Zeroth-order Fine-tuning for Language Models with
    Low-rank Structures", arXiv 2410.07698): central differences along ``U V^T`` for matrices
    (``V`` redrawn every ``resample_every`` steps) and dense noise for vectors. With
    ``momentum > 0`` it is LOZO-M: an EMA of the estimate kept in the ``m x r`` factor and
    carried over to each new ``V`` as ``M V_old^T V_new / n``."""

    matrix_space = LowRank

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, rank: int = 2,
                 resample_every: int = 50, momentum: float = 0.0, weight_decay: float = 0.0,
                 noise: str = "gaussian", seed: int | None = None, **batching):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      momentum=momentum, weight_decay=weight_decay, noise=noise),
                         Central(1), lambda g: {}, seed, **batching)

    def transforms(self, group):
        beta = group["momentum"]
        return [Momentum(beta, dampening=beta)] if beta else []


class SubZero(_MatrixMethod):
    """SubZero (Yu et al., 2024, "SubZero: Random Subspace Zeroth-Order Optimization for
    Memory-Efficient LLM Fine-Tuning", arXiv 2410.08989): central differences along
    ``sqrt(mn)/r * U Z V^T`` with orthonormal ``U``, ``V`` redrawn every ``resample_every``
    steps, dense noise for vectors."""

    matrix_space = TwoSided

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, rank: int = 8,
                 resample_every: int = 1000, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, **batching):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      weight_decay=weight_decay, noise=noise),
                         Central(1), lambda g: {}, seed, **batching)


class SubspaceMeZO(_MatrixMethod):
    """ZO-Muon's subspace without orthogonalization (the "subspace MeZO" baseline of Lang et
    al., 2026, arXiv 2602.17155): central differences along ``P Psi`` (``P`` orthonormal,
    ``m x r``, redrawn every ``resample_every`` steps), update ``-lr * c * P Psi``.

    Vectors (biases, norms) take dense MeZO steps at ``vector_lr``; the authors' code fixes it
    at 1e-7 for language models and 1e-4 for ViTs. ``vector_lr=0`` freezes them."""

    matrix_space = Projected

    def __init__(self, params, lr: float = 1e-4, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, queries: int = 1, vector_lr: float = 1e-7,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None,
                 model=None, batched: bool | None = None, max_slices: int | None = None,
                 **extra):
        _check_settings(self, extra)
        _check_queries(queries)
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      vector_lr=vector_lr, weight_decay=weight_decay,
                                      noise=noise, **extra),
                         self._estimator(queries), _vector_lr, seed, model, batched, max_slices)

    @staticmethod
    def _estimator(queries):
        return Central(queries)


class ZOMuon(SubspaceMeZO):
    """ZO-Muon (Lang et al., 2026, "Powering Up Zeroth-Order Training via Subspace Gradient
    Orthogonalization", arXiv 2602.17155).

    For each weight matrix W (m x n): ``P`` (m x r) column-orthonormal from the QR of a
    Gaussian, redrawn every ``resample_every`` steps and shared by the step's queries; per
    query ``Psi_i`` (r x n) Gaussian and one-sided differences against one baseline,
    ``c_i = (f(W + eps P Psi_i) - f(W)) / eps``; ``G = mean_i c_i Psi_i`` (r x n);
    ``W <- W - lr * (P orth(G) + wd W)``, ``orth`` by Newton-Schulz (``ortho="newton_schulz"``)
    or SVD (``ortho="svd"``). ``queries + 1`` evaluations a step. Vectors as in
    :class:`SubspaceMeZO`; tensors of more than two dimensions are viewed as
    ``(shape[0], rest)``.

    Chosen here against the authors' code: ``P`` is drawn once per step before the queries
    (their code redraws it per query on resampling steps and keeps the last one).
    """

    own_settings = ("ortho", "ns_steps")

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, queries: int = 4, ortho: str = "newton_schulz",
                 ns_steps: int = 5, **kw):
        Orthogonalize(ortho, ns_steps)  # validates
        super().__init__(params, lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                         queries=queries, ortho=ortho, ns_steps=ns_steps, **kw)

    @staticmethod
    def _estimator(queries):
        return Forward(queries)

    def transforms(self, group):
        return [Orthogonalize(group["ortho"], group["ns_steps"])] if group["matrix"] else []


def add_split_group(opt: ZOOptimizer, param_group: dict, vector_settings) -> None:
    params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for part in split_matrices([{**param_group, "params": params}], opt.defaults,
                               vector_settings):
        ZOOptimizer.add_param_group(opt, part)


def _vector_lr(group: dict) -> dict:
    return {"lr": group["vector_lr"]}


def _check_settings(opt, extra: dict) -> None:
    unknown = sorted(set(extra) - set(getattr(opt, "own_settings", ())))
    if unknown:
        raise TypeError(f"{type(opt).__name__}() got an unexpected keyword argument {unknown[0]!r}")


def _check_queries(queries) -> None:
    if not (isinstance(queries, int) and queries >= 1):
        raise ValueError(f"queries={queries!r} is invalid: it must be an integer >= 1")


class Composed(ZOOptimizer):
    """A method assembled from parts, for what the named methods do not cover::

        from zoptim.parts.estimators import Central
        from zoptim.parts.spaces import Space
        from zoptim.parts.transforms import ClipNorm, Momentum

        opt = zoptim.Composed(model.parameters(), Central(queries=4), lr=1e-3,
                              space=lambda group: Space("rademacher"),
                              transforms=[ClipNorm(1.0), Momentum(0.9)])

    ``space`` maps a parameter group to its space (dense noise of the group's kind if
    omitted); ``transforms`` apply in order to every tensor's estimate.
    """

    def __init__(self, params, estimator, *, lr: float, eps: float = 1e-3,
                 weight_decay: float = 0.0, noise: str = "gaussian", space=None,
                 transforms=(), seed: int | None = None):
        self._space_of = space or (lambda group: Space(group["noise"]))
        self._chain = list(transforms)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         estimator, seed=seed)

    def space(self, group):
        return self._space_of(group)

    def transforms(self, group):
        return self._chain
