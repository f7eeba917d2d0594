"""The low-rank methods: LOZO, SubZero, subspace MeZO, the flagship ZO-Muon and ZO-MOPI.
Matrices are perturbed in a low-rank space; vectors (biases, norms) take dense steps. Given
the model, a step's evaluations run as one forward pass on a stacked batch (batched
queries)."""

from __future__ import annotations

import torch

from zoptim.parts import settings
from zoptim.engine.optimizer import ZOOptimizer
from zoptim.methods.dense import COMMON_ARGS, add_split_group
from zoptim.parts.estimators import Central, OneSided
from zoptim.parts.spaces import Dense, LowRank, Projected, TwoSided
from zoptim.parts.transforms import Momentum, Orthogonalize, PartialOrthogonalize

BATCHING_ARGS = """
        model: the module the closure runs. Given it, a step evaluates all its points in
            one forward pass on a stacked batch, the perturbations applied to activations
            (``zoptim.engine.evaluators.batched``): the closure is then called as
            ``closure(slices)`` and returns one loss per slice. A model the mode cannot
            serve falls back to in-place evaluation with a warning naming the parameter.
        batched: ``False`` keeps in-place evaluation although the model is given; ``True``
            requires the model.
        max_slices: at most this many points in one stacked forward pass (the activation
            memory); more are evaluated in chunks."""
LOW_RANK_ARGS = COMMON_ARGS + """
        rank: the rank of a matrix's perturbation (capped by the matrix).
        resample_every: steps between redraws of the fixed factors.""" + BATCHING_ARGS


def documented(cls):
    cls.__doc__ = cls.__doc__.replace("        {common}", LOW_RANK_ARGS.strip("\n"))
    return cls


class LowRankMethod(ZOOptimizer):
    """A method with a low-rank space for matrices and dense noise for vectors."""

    matrix_space: type
    uses_model = "optional"  # it turns batched queries on

    def __init__(self, params, defaults, estimator, vector_settings, *, seed, foreach,
                 model=None, batched: bool | None = None, max_slices: int | None = None):
        self._vector_settings = vector_settings
        super().__init__(params, defaults, estimator, seed=seed, foreach=foreach)
        self.batch_queries(model, batched, max_slices)

    def add_param_group(self, param_group: dict) -> None:
        # Every group, at construction or later, is split into its matrices and its vectors.
        add_split_group(self, param_group, self._vector_settings)

    def space(self, group):
        if group["matrix"]:
            return self.matrix_space(group["rank"], group["resample_every"], group["noise"])
        return Dense(group["noise"])


@documented
class LOZO(LowRankMethod):
    """LOZO (Chen et al., 2024, "Enhancing Zeroth-order Fine-tuning for Language Models with
    Low-rank Structures", arXiv 2410.07698): central differences along ``U V^T`` for matrices
    (``V`` redrawn every ``resample_every`` steps) and dense noise for vectors. With
    ``momentum > 0`` it is LOZO-M: an EMA of the estimate kept in the ``m x r`` factor and
    carried over to each new ``V`` as ``M V_old^T V_new / n``.

    The perturbation is unscaled, as in the authors' code: ``E|z|^2`` is ``rank`` times dense
    noise's, so the learning rate is ``rank`` times smaller than a MeZO one for the same step
    (ZO-Muon's code runs its LOZO baseline with ``z / rank`` instead; multiply this ``lr`` by
    ``rank`` to compare with it).

    Args:
        params: tensors or parameter groups.
        momentum: LOZO-M's EMA weight (0: plain LOZO).
        {common}
    """

    matrix_space = LowRank

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, rank: int = 2,
                 resample_every: int = 50, momentum: float = 0.0, weight_decay: float = 0.0,
                 noise: str = "gaussian", seed: int | None = None, foreach: bool | None = None,
                 **batching):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      momentum=momentum, weight_decay=weight_decay, noise=noise),
                         Central(1), lambda g: {}, seed=seed, foreach=foreach, **batching)

    def transforms(self, group):
        beta = group["momentum"]
        return [Momentum(beta, dampening=beta)] if beta else []


@documented
class SubZero(LowRankMethod):
    """SubZero (Yu et al., 2024, "SubZero: Random Subspace Zeroth-Order Optimization for
    Memory-Efficient LLM Fine-Tuning", arXiv 2410.08989): central differences along
    ``sqrt(mn)/r * U Z V^T`` with orthonormal ``U``, ``V`` redrawn every ``resample_every``
    steps, dense noise for vectors.

    Args:
        params: tensors or parameter groups.
        {common}
    """

    matrix_space = TwoSided

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, rank: int = 8,
                 resample_every: int = 1000, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None, **batching):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      weight_decay=weight_decay, noise=noise),
                         Central(1), lambda g: {}, seed=seed, foreach=foreach, **batching)


@documented
class SubspaceMeZO(LowRankMethod):
    """ZO-Muon's subspace without orthogonalization (the "subspace MeZO" baseline of Lang et
    al., 2026, arXiv 2602.17155): central differences along ``P Psi`` (``P`` orthonormal,
    ``m x r``, redrawn every ``resample_every`` steps), update ``-lr * c * P Psi``.

    Args:
        params: tensors or parameter groups.
        directions: random directions a step, two evaluations
            each.
        vector_lr: the learning rate of the dense MeZO steps of vectors (and of a language
            model's output layer, see ``dense_head``); the authors' code fixes it at 1e-7 for
            language models and 1e-4 for ViTs; 0 freezes them.
        dense_head: given the model, a language model's output layer (its vocabulary table,
            ``get_output_embeddings()``, often tied to the input embedding) takes the dense
            step at ``vector_lr`` instead of the subspace, as Muon leaves heads and embeddings
            to another optimizer; its steps are then evaluated in place, unless ``batched``
            says otherwise. Against the authors' code, which gives it a subspace like any
            matrix: ``P`` then spans ``rank`` of the vocabulary's rows at random, and the few
            rows a prompt classifier reads (its label words') receive almost nothing: on
            SmolLM2 the tied table carries half the gradient and took almost none of the
            step's signal (``benchmarks/results/fidelity_smollm2``). Input-only embeddings
            keep the subspace (MiniLM's took a fair share of the signal there).
        {common}
    """

    matrix_space = Projected
    own_settings: tuple[str, ...] = ()

    def __init__(self, params, lr: float = 1e-4, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, directions: int = 1, vector_lr: float = 1e-7,
                 dense_head: bool = True, weight_decay: float = 0.0,
                 noise: str = "gaussian", seed: int | None = None, foreach: bool | None = None,
                 model=None, batched: bool | None = None, max_slices: int | None = None,
                 **extra):
        settings.unknown(type(self), extra, self.own_settings)
        settings.check("directions", directions)
        if dense_head and model is not None:
            params, moved = dense_head_groups(params, model)
            # batched queries perturb activations, and a dense vocabulary table has no
            # low-rank form to apply there: such a step is evaluated in place
            batched = False if moved and batched is None else batched
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      vector_lr=vector_lr, weight_decay=weight_decay,
                                      noise=noise, **extra),
                         self._estimator(directions), _vector_lr, seed=seed, foreach=foreach,
                         model=model, batched=batched, max_slices=max_slices)

    @staticmethod
    def _estimator(directions):
        return Central(directions)


@documented
class ZOMuon(SubspaceMeZO):
    """ZO-Muon (Lang et al., 2026, "Powering Up Zeroth-Order Training via Subspace Gradient
    Orthogonalization", arXiv 2602.17155).

    For each weight matrix W (m x n): ``P`` (m x r) column-orthonormal from the QR of a
    Gaussian, redrawn every ``resample_every`` steps and shared by the step's directions; per
    direction ``Psi_i`` (r x n) Gaussian and one-sided differences against one baseline,
    ``c_i = (f(W + eps P Psi_i) - f(W)) / eps``; ``G = mean_i c_i Psi_i`` (r x n);
    ``W <- W - lr * (P orth(G) + wd W)``, ``orth`` by Newton-Schulz or SVD.
    ``directions + 1`` evaluations a step. Tensors of more than two dimensions are viewed as
    ``(shape[0], rest)``.

    Chosen here against the authors' code: ``P`` is drawn once per step before the queries
    (their code redraws it per query on resampling steps and keeps the last one).

    ``momentum > 0`` keeps what ZO-Muon drops from Muon (Jordan et al., 2024): an exponential
    moving average of ``G`` in the subspace, ``M <- beta M + (1 - beta) G`` (``M = G`` at the
    first step), orthogonalized in its place. When ``P`` is redrawn, ``M`` is carried into the
    new subspace as ``P_new^T P_old M`` (the part of ``P_old M`` the new subspace can hold).

    Args:
        params: tensors or parameter groups.
        directions: random directions a step (``queries`` in the paper),
            one evaluation each plus one baseline.
        ortho: ``"newton_schulz"`` (5 quintic steps, Muon's) or ``"svd"`` (exact).
        ns_steps: Newton-Schulz iterations.
        momentum: the EMA weight of the subspace estimate before orthogonalization (0: none,
            as in the paper).
        vector_lr: the vectors' dense MeZO learning rate (see :class:`SubspaceMeZO`).
        {common}
    """

    own_settings = ("ortho", "ns_steps", "momentum")

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, directions: int = 4, ortho: str = "newton_schulz",
                 ns_steps: int = 5, momentum: float = 0.0, **kw):
        super().__init__(params, lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                         directions=directions, ortho=ortho, ns_steps=ns_steps,
                         momentum=momentum, **kw)

    @staticmethod
    def _estimator(directions):
        return OneSided(directions)

    def transforms(self, group):
        if not group["matrix"]:
            return []
        beta = group.get("momentum", 0.0)  # groups saved before the option have none
        averaged = [Momentum(beta, dampening=beta)] if beta else []
        return averaged + [self._orthogonalize(group)]

    @staticmethod
    def _orthogonalize(group):
        return Orthogonalize(group["ortho"], group["ns_steps"])


@documented
class ZOMOPI(ZOMuon):
    """ZO-MOPI (Chen & Ma, 2026, arXiv 2605.09034): ZO-Muon's subspace estimate with momentum
    and *partial* orthogonalization. Per weight matrix, ``G = mean_i c_i Psi_i`` as ZO-Muon's
    (one-sided against one baseline), ``M <- beta M + (1 - beta) G`` in the subspace
    (``M = G`` at the first step), then ``O = U_k V_k^T`` from one warm-started power-iteration
    sweep a step (``parts.transforms.PartialOrthogonalize``): the top ``k`` singular
    directions of ``M`` at unit length, the rest dropped; ``W <- W - lr * (P O + wd W)``.

    Chosen here against the authors' code: when ``P`` is redrawn, ``M`` is carried into the
    new subspace as ``P_new^T P_old M``, as the paper describes (their code keeps ``M``'s
    coordinates against the new ``P``, and its script sets ``beta = 0``); the power
    iteration's vectors are kept across redraws (theirs restart from a random start) and the
    first step starts from the exact top-``k`` vectors.

    Args:
        params: tensors or parameter groups.
        k: singular directions kept (capped by the rank); ``rank // 2`` when ``None``, as in
            the authors' scripts (32 of 64).
        momentum: the EMA weight ``beta`` of the subspace estimate (0: none).
        directions: random directions a step, one evaluation each plus one baseline.
        vector_lr: the vectors' dense MeZO learning rate (see :class:`SubspaceMeZO`).
        {common}
    """

    own_settings = ("ortho", "ns_steps", "momentum", "k")

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, directions: int = 4, momentum: float = 0.9,
                 k: int | None = None, **kw):
        settings.unknown(type(self), {key: 0 for key in kw if key in ("ortho", "ns_steps")}, ())
        k = max(1, rank // 2) if k is None else k
        settings.check("k", k)
        super().__init__(params, lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                         directions=directions, momentum=momentum, k=k, **kw)

    @staticmethod
    def _orthogonalize(group):
        return PartialOrthogonalize(group["k"])


def _vector_lr(group: dict) -> dict:
    return {"lr": group["vector_lr"]}


def output_tables(model: torch.nn.Module) -> list[torch.Tensor]:
    """The output layers of the language models in ``model`` (``get_output_embeddings()``:
    a vocabulary table, often the input embedding's own, tied)."""
    found = {}
    for m in model.modules():
        head = getattr(m, "get_output_embeddings", lambda: None)()
        if head is not None and getattr(head, "weight", None) is not None:
            found.setdefault(id(head.weight), head.weight)
    return list(found.values())


def dense_head_groups(params, model: torch.nn.Module) -> tuple[list[dict], bool]:
    """``params`` (tensors or groups) with the model's output tables moved to groups of their
    own marked ``dense`` (they take the vectors' dense step, not the subspace), and whether
    any was moved."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    tables = {id(t) for t in output_tables(model)}
    out, moved_any = [], False
    for group in groups:
        ps = [group["params"]] if isinstance(group["params"], torch.Tensor) else \
            list(group["params"])
        rest = {k: v for k, v in group.items() if k != "params"}
        kept = [p for p in ps if id(p) not in tables]
        moved = [p for p in ps if id(p) in tables]
        out += [{**rest, "params": kept}] if kept else []
        out += [{**rest, "params": moved, "dense": True}] if moved else []
        moved_any = moved_any or bool(moved)
    return out, moved_any
