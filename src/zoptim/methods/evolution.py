"""Evolution strategies: a population of perturbed models scored by their values alone,
the step a normalized average of the members' directions (rewards are maximized by running
on ``-reward``). ``ES`` perturbs with dense noise; ``EGGROLL`` with a rank-r product per
matrix, so a population is evaluated as slices of one stacked batch."""

from __future__ import annotations

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.methods.dense import documented
from zoptim.methods.subspace import BATCHING_ARGS, LowRankMethod
from zoptim.parts.estimators import Population
from zoptim.parts.spaces import Bilinear, Dense


@documented
class ES(ZOOptimizer):
    """Evolution strategies as "Evolution Strategies at Scale: LLM Fine-Tuning Beyond
    Reinforcement Learning" (Qiu et al., 2025, arXiv 2509.24372) fine-tunes LLMs:
    ``members`` Gaussian perturbations ``theta + sigma eps_n``, each member's value
    normalized across the population (``parts.estimators.Population``), and

    ``theta <- theta - lr * (mean_n z_n eps_n + wd * theta)``, ``z_n = (f_n - mean f) / std f``,

    which on ``f = -reward`` is the paper's ``theta <- theta + alpha / N sum_n z(R_n) eps_n``
    (``lr`` is its ``alpha``, ``eps`` its ``sigma``; no division by ``sigma``). ``members``
    evaluations a step, no baseline. The defaults are the paper's (N = 30, sigma = 1e-3,
    alpha = 5e-4). Chosen here against the authors' code: every tensor draws its own noise
    (their code reseeds each tensor with the member's seed, so same-shaped tensors share it).

    Args:
        params: tensors or parameter groups.
        members: the population's size ``N`` (at least 2).
        antithetic: mirrored sampling, ``+eps_n`` and ``-eps_n`` (off in the paper).
        rank_transform: centred ranks instead of values before the normalization (off in the
            paper).
        per_prompt: normalize each prompt's rewards across the members before averaging
            them (GRPO-style; the closure returns per-example values, see
            ``parts.estimators.Population``).
        {common}
    """

    def __init__(self, params, lr: float = 5e-4, eps: float = 1e-3, members: int = 30,
                 antithetic: bool = False, rank_transform: bool = False,
                 per_prompt: bool = False, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         Population(members, antithetic, rank_transform, per_prompt),
                         seed=seed, foreach=foreach)


@documented
class EGGROLL(LowRankMethod):
    """EGGROLL ("Evolution Strategies at the Hyperscale", Sarkar et al., 2025, arXiv
    2511.16652): evolution strategies whose members perturb every matrix by a rank-``r``
    product ``eps * A_n B_n^T / sqrt(r)`` (``A_n``, ``B_n`` Gaussian, regenerated from the
    member's seed: ``parts.spaces.Bilinear``), vectors (biases, norms) by dense noise, and

    ``theta <- theta - lr * (mean_n z_n A_n B_n^T / sqrt(r) + wd * theta)``, ``z_n`` the
    member's value normalized across the population (``parts.estimators.Population``).

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
        params: tensors or parameter groups.
        members: the population's size ``N`` (even when antithetic).
        antithetic: members in pairs ``+E_n``, ``-E_n`` (the authors' code always pairs).
        rank_transform: centred ranks instead of values before the normalization.
        per_prompt: normalize each prompt's rewards across the members first (see ``ES``).
        rank: the rank ``r`` of a matrix's perturbation (capped by the matrix).
        {common}
        {batching}
    """

    def __init__(self, params, lr: float = 5e-4, eps: float = 1e-3, rank: int = 1,
                 members: int = 30, antithetic: bool = True, rank_transform: bool = False,
                 per_prompt: bool = False, weight_decay: float = 0.0, noise: str = "gaussian",
                 seed: int | None = None, foreach: bool | None = None, **batching):
        super().__init__(params, dict(lr=lr, eps=eps, rank=rank, resample_every=1,
                                      weight_decay=weight_decay, noise=noise),
                         Population(members, antithetic, rank_transform, per_prompt),
                         lambda g: {},
                         seed=seed, foreach=foreach, **batching)

    def space(self, group):
        if group["matrix"]:
            return Bilinear(group["rank"], group["noise"])
        return Dense(group["noise"])


EGGROLL.__doc__ = EGGROLL.__doc__.replace("        {batching}", BATCHING_ARGS.strip("\n"))
