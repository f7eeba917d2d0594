"""Evolution strategies: a population of perturbed models scored by their values alone,
the step a normalized average of the members' directions (rewards are maximized by running
on ``-reward``). ``ES`` perturbs with dense noise; ``EGGROLL`` with a rank-r product per
matrix, so a population is evaluated as slices of one stacked batch."""

from __future__ import annotations

import torch

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.methods.subspace import LowRankMethod
from zoptim.parts.estimators import Population
from zoptim.parts.spaces import Bilinear, Dense


class ES(ZOOptimizer):
    """Evolution strategies as "Evolution Strategies at Scale: LLM Fine-Tuning Beyond
    Reinforcement Learning" (Qiu et al., 2025, arXiv 2509.24372) fine-tunes LLMs:
    ``members`` Gaussian perturbations ``theta + sigma eps_n``, each member's value
    normalized across the population (``parts.estimators.Population``). ``members``
    evaluations a step, no baseline. The defaults are the paper's (N = 30, sigma = 1e-3,
    alpha = 5e-4).

    The update, with ``f_n`` member ``n``'s value:

        z_n = (f_n - mean f) / std f
        theta <- theta - lr * (mean_n z_n eps_n + weight_decay * theta)

    which on ``f = -reward`` is the paper's ``theta <- theta + alpha / N sum_n z(R_n) eps_n``
    (``lr`` is its ``alpha``, ``eps`` its ``sigma``; no division by ``sigma``). Chosen here
    against the authors' code: every tensor draws its own noise (their code reseeds each
    tensor with the member's seed, so same-shaped tensors share it).

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate (the paper's ``alpha``). Default: 5e-4.
        eps (float, optional): perturbation scale (the paper's ``sigma``). Default: 1e-3.
        members (int, optional): the population's size ``N`` (at least 2). Default: 30.
        antithetic (bool, optional): mirrored sampling, ``+eps_n`` and ``-eps_n`` (off in the
            paper; an even ``members``). Default: False.
        rank_transform (bool, optional): centred ranks instead of values before the
            normalization (off in the paper). Default: False.
        per_prompt (bool, optional): normalize each prompt's rewards across the members
            before averaging them (GRPO-style; the closure returns per-example values, see
            ``parts.estimators.Population``). Default: False.
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

    def __init__(self, params, lr: float = 5e-4, eps: float = 1e-3, members: int = 30,
                 antithetic: bool = False, rank_transform: bool = False,
                 per_prompt: bool = False, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         Population(members, antithetic, rank_transform, per_prompt),
                         seed=seed, foreach=foreach)


class EGGROLL(LowRankMethod):
    """EGGROLL ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025, arXiv
    2511.16652): evolution strategies whose members perturb every matrix by a rank-``r``
    product ``eps * A_n B_n^T / sqrt(r)`` (``A_n``, ``B_n`` Gaussian, regenerated from the
    member's seed: ``parts.spaces.Bilinear``), vectors (biases, norms) by dense noise.
    ``members`` evaluations a step, no baseline.

    The update of a matrix ``W``, with ``z_n`` the member's value normalized across the
    population (``parts.estimators.Population``):

        W <- W - lr * (mean_n z_n A_n B_n^T / sqrt(r) + weight_decay * W)

    The update is assembled from the members' factors, ``[z_1 A_1, ..., z_N A_N]
    [B_1, ..., B_N]^T / (N sqrt(r))``: one product a set of matrices, no dense noise. Given
    the model, the population is evaluated as slices of one stacked batch, each layer adding
    ``eps (x B_n) A_n^T / sqrt(r)`` to its output (``engine.evaluators.batched``), chunked by
    ``max_slices``.

    Read against the authors' JAX code (ESHyperscale/HyperscaleES, ``noiser/eggroll.py``):
    members come in antithetic pairs there (always); here ``antithetic=True`` by default. Their
    update, through ``optax.sgd``, is ``lr' * eps * sqrt(N) * mean_n z_n E_n``: this ``lr``
    is their ``lr' * eps * sqrt(N)``. Their z-score divides by ``sqrt(var + 1e-5)``, this one
    by ``std + 1e-8`` as ``ES`` does. Their LLM runs freeze the vectors; here they are
    perturbed with dense noise, as their library does for non-matrix parameters (put them in
    no group to freeze them). Rank 1 is their LLM script's.

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate (their ``lr' * eps * sqrt(N)``). Default: 5e-4.
        eps (float, optional): perturbation scale. Default: 1e-3.
        rank (int, optional): the rank ``r`` of a matrix's perturbation (capped by the
            matrix). Default: 1.
        members (int, optional): the population's size ``N`` (even when antithetic).
            Default: 30.
        antithetic (bool, optional): members in pairs ``+E_n``, ``-E_n`` (the authors' code
            always pairs). Default: True.
        rank_transform (bool, optional): centred ranks instead of values before the
            normalization. Default: False.
        per_prompt (bool, optional): normalize each prompt's rewards across the members
            first (see :class:`ES`). Default: False.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations of the
            vectors. Default: ``"gaussian"``.
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

    def __init__(self, params, lr: float = 5e-4, eps: float = 1e-3, rank: int = 1,
                 members: int = 30, antithetic: bool = True, rank_transform: bool = False,
                 per_prompt: bool = False, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None, *,
                 model: torch.nn.Module | None = None, batched: bool | None = None,
                 max_slices: int | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=1,
                                      weight_decay=weight_decay, noise=noise),
                         Population(members, antithetic, rank_transform, per_prompt),
                         lambda g: {}, seed=seed, foreach=foreach, model=model,
                         batched=batched, max_slices=max_slices)

    def space(self, group):
        if group["matrix"]:
            return Bilinear(group["rank"], group["noise"])
        return Dense(group["noise"])
