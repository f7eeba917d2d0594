"""The low-rank methods: LOZO, SubZero, subspace MeZO, the flagship ZO-Muon and ZO-MOPI.
Matrices are perturbed in a low-rank space; vectors (biases, norms) take dense steps. Given
the model, a step's evaluations run as one forward pass on a stacked batch (batched
queries)."""

from __future__ import annotations

import torch

from zoptim.parts import settings
from zoptim.engine.optimizer import ZOOptimizer
from zoptim.methods.dense import add_split_group
from zoptim.parts.estimators import Central, OneSided
from zoptim.parts.spaces import Dense, LowRank, Projected, TwoSided
from zoptim.parts.transforms import Momentum, Orthogonalize, PartialOrthogonalize


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


class LOZO(LowRankMethod):
    """LOZO (Chen et al., 2024, "Enhancing Zeroth-order Fine-tuning for Language Models with
    Low-rank Structures", arXiv 2410.07698): central differences along ``U V^T`` for matrices
    (``U`` Gaussian per query, ``V`` Gaussian, redrawn every ``resample_every`` steps) and
    dense noise for vectors. With ``momentum > 0`` it is LOZO-M: an EMA of the estimate kept in
    the ``m x r`` factor and carried over to each new ``V`` as ``M V_old^T V_new / n``.

    The update of a matrix ``W``, with ``z = U V^T`` (``E`` the EMA, ``momentum = 0``: ``g``
    itself):

        g = (f(W + eps z) - f(W - eps z)) / (2 eps) * z
        E <- momentum * E + (1 - momentum) * g         (E = g at the first step)
        W <- W - lr * (E + weight_decay * W)

    The perturbation is unscaled, as in the authors' code: ``E|z|^2`` is ``rank`` times dense
    noise's, so the learning rate is ``rank`` times smaller than a MeZO one for the same step
    (ZO-Muon's code runs its LOZO baseline with ``z / rank`` instead; multiply this ``lr`` by
    ``rank`` to compare with it).

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-7.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        rank (int, optional): the rank of a matrix's perturbation (capped by the matrix).
            Default: 2.
        resample_every (int, optional): steps between redraws of the fixed factor ``V``.
            Default: 50.
        momentum (float, optional): LOZO-M's EMA weight, in [0, 1) (0: plain LOZO).
            Default: 0.0.
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
        model (torch.nn.Module, optional): the module the closure runs. Given it, a step
            evaluates all its points in one forward pass on a stacked batch, the
            perturbations applied to activations (``zoptim.engine.evaluators.batched``): the
            closure is then called as ``closure(slices)`` and returns one loss per slice. A
            model the mode cannot serve falls back to in-place evaluation with a warning
            naming the parameter. Default: None.
        batched (bool, optional): ``False`` keeps in-place evaluation although the model is
            given; ``True`` requires the model; ``None``: batched when the model is given.
            Default: None.
        max_slices (int, optional): at most this many points in one stacked forward pass
            (the activation memory); more are evaluated in chunks (``None``: no limit).
            Default: None.
    """

    matrix_space = LowRank

    def __init__(self, params, lr: float = 1e-7, eps: float = 1e-3, rank: int = 2,
                 resample_every: int = 50, momentum: float = 0.0, weight_decay: float = 0.0,
                 noise: str = "gaussian", seed: int | None = None, foreach: bool | None = None,
                 *, model: torch.nn.Module | None = None, batched: bool | None = None,
                 max_slices: int | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      momentum=momentum, weight_decay=weight_decay, noise=noise),
                         Central(1), lambda g: {}, seed=seed, foreach=foreach, model=model,
                         batched=batched, max_slices=max_slices)

    def transforms(self, group):
        beta = group["momentum"]
        return [Momentum(beta, dampening=beta)] if beta else []


class SubZero(LowRankMethod):
    """SubZero (Yu et al., 2024, "SubZero: Random Subspace Zeroth-Order Optimization for
    Memory-Efficient LLM Fine-Tuning", arXiv 2410.08989): central differences along
    ``sqrt(mn)/r * U Z V^T`` with orthonormal ``U``, ``V`` redrawn every ``resample_every``
    steps (``Z``, ``r x r``, Gaussian per query), dense noise for vectors.

    The update of an ``m x n`` matrix ``W``, with ``z = sqrt(m n) / r * U Z V^T``:

        g = (f(W + eps z) - f(W - eps z)) / (2 eps) * z
        W <- W - lr * (g + weight_decay * W)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-6.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        rank (int, optional): the rank ``r`` of a matrix's perturbation (capped by the
            matrix). Default: 8.
        resample_every (int, optional): steps between redraws of the fixed factors ``U``,
            ``V``. Default: 1000.
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
        model (torch.nn.Module, optional): the module the closure runs. Given it, a step
            evaluates all its points in one forward pass on a stacked batch, the
            perturbations applied to activations (``zoptim.engine.evaluators.batched``): the
            closure is then called as ``closure(slices)`` and returns one loss per slice. A
            model the mode cannot serve falls back to in-place evaluation with a warning
            naming the parameter. Default: None.
        batched (bool, optional): ``False`` keeps in-place evaluation although the model is
            given; ``True`` requires the model; ``None``: batched when the model is given.
            Default: None.
        max_slices (int, optional): at most this many points in one stacked forward pass
            (the activation memory); more are evaluated in chunks (``None``: no limit).
            Default: None.
    """

    matrix_space = TwoSided

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, rank: int = 8,
                 resample_every: int = 1000, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None, *,
                 model: torch.nn.Module | None = None, batched: bool | None = None,
                 max_slices: int | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                                      weight_decay=weight_decay, noise=noise),
                         Central(1), lambda g: {}, seed=seed, foreach=foreach, model=model,
                         batched=batched, max_slices=max_slices)


class SubspaceMeZO(LowRankMethod):
    """ZO-Muon's subspace without orthogonalization (the "subspace MeZO" baseline of Lang et
    al., 2026, arXiv 2602.17155): central differences along ``P Psi`` (``P`` orthonormal,
    ``m x r``, redrawn every ``resample_every`` steps; ``Psi``, ``r x n``, Gaussian per
    direction); vectors take dense MeZO steps at ``vector_lr``.

    The update of a matrix ``W``:

        c_i = (f(W + eps P Psi_i) - f(W - eps P Psi_i)) / (2 eps)
        W <- W - lr * (P mean_i c_i Psi_i + weight_decay * W)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): the matrices' learning rate. Default: 1e-4.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        rank (int, optional): the rank ``r`` of a matrix's subspace (capped by the matrix).
            Default: 64.
        resample_every (int, optional): steps between redraws of ``P``. Default: 100.
        directions (int, optional): random directions a step, two evaluations each.
            Default: 1.
        vector_lr (float, optional): the learning rate of the dense MeZO steps of vectors
            (and of a language model's output layer, see ``dense_head``); the authors' code
            fixes it at 1e-7 for language models and 1e-4 for ViTs; 0 freezes them.
            Default: 1e-7.
        dense_head (bool, optional): given the model, a language model's output layer (its
            vocabulary table, ``get_output_embeddings()``, often tied to the input
            embedding) takes the dense step at ``vector_lr`` instead of the subspace, as Muon
            leaves heads and embeddings to another optimizer; its steps are then evaluated in
            place, unless ``batched`` says otherwise. Against the authors' code, which gives
            it a subspace like any matrix: ``P`` then spans ``rank`` of the vocabulary's rows
            at random, and the few rows a prompt classifier reads (its label words') receive
            almost nothing: on SmolLM2 the tied table carries half the gradient and took
            almost none of the step's signal (``benchmarks/results/fidelity_smollm2``).
            Input-only embeddings keep the subspace (MiniLM's took a fair share of the signal
            there). Default: True.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations of the
            vectors (and the distribution of ``Psi``). Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
        model (torch.nn.Module, optional): the module the closure runs. Given it, a step
            evaluates all its points in one forward pass on a stacked batch, the
            perturbations applied to activations (``zoptim.engine.evaluators.batched``): the
            closure is then called as ``closure(slices)`` and returns one loss per slice. A
            model the mode cannot serve falls back to in-place evaluation with a warning
            naming the parameter. Default: None.
        batched (bool, optional): ``False`` keeps in-place evaluation although the model is
            given; ``True`` requires the model; ``None``: batched when the model is given.
            Default: None.
        max_slices (int, optional): at most this many points in one stacked forward pass
            (the activation memory); more are evaluated in chunks (``None``: no limit).
            Default: None.
    """

    matrix_space = Projected

    def __init__(self, params, lr: float = 1e-4, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, directions: int = 1, vector_lr: float = 1e-7,
                 dense_head: bool = True, weight_decay: float = 0.0,
                 noise: str = "gaussian", seed: int | None = None, foreach: bool | None = None,
                 model: torch.nn.Module | None = None, batched: bool | None = None,
                 max_slices: int | None = None):
        self._setup(params, {}, lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                    directions=directions, vector_lr=vector_lr, dense_head=dense_head,
                    weight_decay=weight_decay, noise=noise, seed=seed, foreach=foreach,
                    model=model, batched=batched, max_slices=max_slices)

    def _setup(self, params, own: dict, *, lr: float, eps: float, rank: int,
               resample_every: int, directions: int, vector_lr: float, dense_head: bool,
               weight_decay: float, noise: str, seed: int | None, foreach: bool | None,
               model: torch.nn.Module | None, batched: bool | None,
               max_slices: int | None) -> None:
        """Build the optimizer; a subclass passes the settings it adds to the groups in
        ``own``."""
        settings.check("directions", directions)
        if dense_head and model is not None:
            params, moved = dense_head_groups(params, model)
            # batched queries perturb activations, and a dense vocabulary table has no
            # low-rank form to apply there: such a step is evaluated in place
            batched = False if moved and batched is None else batched
        LowRankMethod.__init__(
            self, params, dict(lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                               vector_lr=vector_lr, weight_decay=weight_decay, noise=noise,
                               **own),
            self._estimator(directions), _vector_lr, seed=seed, foreach=foreach, model=model,
            batched=batched, max_slices=max_slices)

    @staticmethod
    def _estimator(directions):
        return Central(directions)


class ZOMuon(SubspaceMeZO):
    """ZO-Muon (Lang et al., 2026, "Powering Up Zeroth-Order Training via Subspace Gradient
    Orthogonalization", arXiv 2602.17155): one-sided differences in a random subspace of each
    weight matrix, the subspace estimate orthogonalized as Muon's (Jordan et al., 2024)
    update; vectors take dense MeZO steps at ``vector_lr``. ``directions + 1`` evaluations a
    step. Tensors of more than two dimensions are viewed as ``(shape[0], rest)``.

    For each weight matrix ``W`` (``m x n``): ``P`` (``m x r``) column-orthonormal from the QR
    of a Gaussian, redrawn every ``resample_every`` steps and shared by the step's
    directions; per direction ``Psi_i`` (``r x n``) Gaussian and one-sided differences
    against one baseline; ``orth`` by Newton-Schulz or SVD:

        c_i = (f(W + eps P Psi_i) - f(W)) / eps
        G = mean_i c_i Psi_i                            (r x n)
        W <- W - lr * (P orth(G) + weight_decay * W)

    Chosen here against the authors' code: ``P`` is drawn once per step before the queries
    (their code redraws it per query on resampling steps and keeps the last one).

    ``momentum > 0`` keeps what ZO-Muon drops from Muon (Jordan et al., 2024): an exponential
    moving average of ``G`` in the subspace, ``M <- beta M + (1 - beta) G`` (``M = G`` at the
    first step), orthogonalized in its place. When ``P`` is redrawn, ``M`` is carried into the
    new subspace as ``P_new^T P_old M`` (the part of ``P_old M`` the new subspace can hold).

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): the matrices' learning rate. Default: 1e-2.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        rank (int, optional): the rank ``r`` of a matrix's subspace (capped by the matrix).
            Default: 64.
        resample_every (int, optional): steps between redraws of ``P``. Default: 100.
        directions (int, optional): random directions a step (``queries`` in the paper), one
            evaluation each plus one baseline. Default: 4.
        ortho (str, optional): ``"newton_schulz"`` (5 quintic steps, Muon's) or ``"svd"``
            (exact). Default: ``"newton_schulz"``.
        ns_steps (int, optional): Newton-Schulz iterations. Default: 5.
        momentum (float, optional): the EMA weight ``beta`` of the subspace estimate before
            orthogonalization, in [0, 1) (0: none, as in the paper). Default: 0.0.
        vector_lr (float, optional): the learning rate of the dense MeZO steps of vectors
            (and of a language model's output layer, see ``dense_head``); the authors' code
            fixes it at 1e-7 for language models and 1e-4 for ViTs; 0 freezes them.
            Default: 1e-7.
        dense_head (bool, optional): given the model, a language model's output layer (its
            vocabulary table, ``get_output_embeddings()``) takes the dense step at
            ``vector_lr`` instead of the subspace, against the authors' code (see
            :class:`SubspaceMeZO` for why); its steps are then evaluated in place, unless
            ``batched`` says otherwise. Default: True.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations of the
            vectors (and the distribution of ``Psi``). Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
        model (torch.nn.Module, optional): the module the closure runs. Given it, a step
            evaluates all its points in one forward pass on a stacked batch, the
            perturbations applied to activations (``zoptim.engine.evaluators.batched``): the
            closure is then called as ``closure(slices)`` and returns one loss per slice. A
            model the mode cannot serve falls back to in-place evaluation with a warning
            naming the parameter. Default: None.
        batched (bool, optional): ``False`` keeps in-place evaluation although the model is
            given; ``True`` requires the model; ``None``: batched when the model is given.
            Default: None.
        max_slices (int, optional): at most this many points in one stacked forward pass
            (the activation memory); more are evaluated in chunks (``None``: no limit).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, directions: int = 4, ortho: str = "newton_schulz",
                 ns_steps: int = 5, momentum: float = 0.0, *, vector_lr: float = 1e-7,
                 dense_head: bool = True, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None,
                 model: torch.nn.Module | None = None, batched: bool | None = None,
                 max_slices: int | None = None):
        self._setup(params, dict(ortho=ortho, ns_steps=ns_steps, momentum=momentum), lr=lr,
                    eps=eps, rank=rank, resample_every=resample_every, directions=directions,
                    vector_lr=vector_lr, dense_head=dense_head, weight_decay=weight_decay,
                    noise=noise, seed=seed, foreach=foreach, model=model, batched=batched,
                    max_slices=max_slices)

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


class ZOMOPI(ZOMuon):
    """ZO-MOPI (Chen & Ma, 2026, arXiv 2605.09034): ZO-Muon's subspace estimate with momentum
    and *partial* orthogonalization: the top ``k`` singular directions of the averaged
    estimate at unit length, the rest dropped, from one warm-started power-iteration sweep a
    step (``parts.transforms.PartialOrthogonalize``). Vectors take dense MeZO steps at
    ``vector_lr``; ``directions + 1`` evaluations a step.

    Per weight matrix, with ``P``, ``Psi_i`` and the one-sided ``c_i`` as ZO-Muon's (against
    one baseline):

        G = mean_i c_i Psi_i
        M <- beta M + (1 - beta) G                      (M = G at the first step)
        O = U_k V_k^T                                   (M's top k singular directions)
        W <- W - lr * (P O + weight_decay * W)

    Chosen here against the authors' code: when ``P`` is redrawn, ``M`` is carried into the
    new subspace as ``P_new^T P_old M``, as the paper describes (their code keeps ``M``'s
    coordinates against the new ``P``, and its script sets ``beta = 0``); the power
    iteration's vectors are kept across redraws (theirs restart from a random start) and the
    first step starts from the exact top-``k`` vectors.

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): the matrices' learning rate. Default: 1e-2.
        eps (float, optional): perturbation scale (the finite difference's step).
            Default: 1e-3.
        rank (int, optional): the rank ``r`` of a matrix's subspace (capped by the matrix).
            Default: 64.
        resample_every (int, optional): steps between redraws of ``P``. Default: 100.
        directions (int, optional): random directions a step, one evaluation each plus one
            baseline. Default: 4.
        momentum (float, optional): the EMA weight ``beta`` of the subspace estimate, in
            [0, 1) (0: none). Default: 0.9.
        k (int, optional): singular directions kept (capped by the rank); ``rank // 2`` when
            ``None``, as in the authors' scripts (32 of 64). Default: None.
        vector_lr (float, optional): the learning rate of the dense MeZO steps of vectors
            (and of a language model's output layer, see ``dense_head``); the authors' code
            fixes it at 1e-7 for language models and 1e-4 for ViTs; 0 freezes them.
            Default: 1e-7.
        dense_head (bool, optional): given the model, a language model's output layer (its
            vocabulary table, ``get_output_embeddings()``) takes the dense step at
            ``vector_lr`` instead of the subspace, against the authors' code (see
            :class:`SubspaceMeZO` for why); its steps are then evaluated in place, unless
            ``batched`` says otherwise. Default: True.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations of the
            vectors (and the distribution of ``Psi``). Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
        model (torch.nn.Module, optional): the module the closure runs. Given it, a step
            evaluates all its points in one forward pass on a stacked batch, the
            perturbations applied to activations (``zoptim.engine.evaluators.batched``): the
            closure is then called as ``closure(slices)`` and returns one loss per slice. A
            model the mode cannot serve falls back to in-place evaluation with a warning
            naming the parameter. Default: None.
        batched (bool, optional): ``False`` keeps in-place evaluation although the model is
            given; ``True`` requires the model; ``None``: batched when the model is given.
            Default: None.
        max_slices (int, optional): at most this many points in one stacked forward pass
            (the activation memory); more are evaluated in chunks (``None``: no limit).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-3, rank: int = 64,
                 resample_every: int = 100, directions: int = 4, momentum: float = 0.9,
                 k: int | None = None, *, vector_lr: float = 1e-7, dense_head: bool = True,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None, model: torch.nn.Module | None = None,
                 batched: bool | None = None, max_slices: int | None = None):
        k = max(1, rank // 2) if k is None else k
        settings.check("k", k)
        # ZO-Muon's orthogonalization settings stay in the groups at their defaults, unused
        own = dict(ortho="newton_schulz", ns_steps=5, momentum=momentum, k=k)
        self._setup(params, own, lr=lr, eps=eps, rank=rank, resample_every=resample_every,
                    directions=directions, vector_lr=vector_lr, dense_head=dense_head,
                    weight_decay=weight_decay, noise=noise, seed=seed, foreach=foreach,
                    model=model, batched=batched, max_slices=max_slices)

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
        parts, moved = _tables_apart(group, tables)
        out += parts
        moved_any = moved_any or moved
    return out, moved_any


def _tables_apart(group: dict, tables: set[int]) -> tuple[list[dict], bool]:
    """``group`` as its tensors other than ``tables`` and, in a group marked ``dense``, the
    tables among them (an empty part dropped), and whether it held any table."""
    ps = [group["params"]] if isinstance(group["params"], torch.Tensor) else \
        list(group["params"])
    rest = {k: v for k, v in group.items() if k != "params"}
    kept = [p for p in ps if id(p) not in tables]
    moved = [p for p in ps if id(p) in tables]
    parts = [{**rest, "params": kept}] if kept else []
    parts += [{**rest, "params": moved, "dense": True}] if moved else []
    return parts, bool(moved)
