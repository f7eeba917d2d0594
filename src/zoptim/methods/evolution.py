"""Evolution strategies: a population of perturbed models scored by their values alone,
the step a normalized average of the members' directions (rewards are maximized by running
on ``-reward``)."""

from __future__ import annotations

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.methods.dense import documented
from zoptim.parts.estimators import Population


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
        {common}
    """

    def __init__(self, params, lr: float = 5e-4, eps: float = 1e-3, members: int = 30,
                 antithetic: bool = False, rank_transform: bool = False,
                 weight_decay: float = 0.0, noise: str = "gaussian", seed: int | None = None,
                 foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         Population(members, antithetic, rank_transform), seed=seed,
                         foreach=foreach)
