"""Methods that read only the order of their values: a person or a judge model may rank or
compare the candidates instead of scoring them (``ask``/``tell``)."""

from __future__ import annotations

from zoptim.parts import settings
from zoptim.engine.optimizer import ZOOptimizer
from zoptim.parts.estimators import Comparison, Ranking


class ZORankSGD(ZOOptimizer):
    """ZO-RankSGD (Tang et al., 2024, ICLR, arXiv 2303.03751): ``candidates`` perturbations
    ``x + eps z_i`` are ranked, and ``x <- x - lr * g`` with ``g`` the rank-weighted sum of
    ``estimators.Ranking``. The closure's values are used only through their order; with
    ``ask``/``tell(ranking=...)`` the objective need only rank the candidates.

    Args:
        params: tensors or parameter groups.
        lr: step length along the rank-weighted direction.
        eps: perturbation scale of the candidates.
        candidates: candidates ranked a step (at least 2).
        noise: ``"gaussian"`` or ``"rademacher"``.
        seed: every candidate derives from it (random when ``None``).
    """

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-2, candidates: int = 4,
                 noise: str = "gaussian", seed: int | None = None):
        settings.check("candidates", candidates)
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), Ranking(candidates),
                         seed=seed)


class ZOComparison(ZOOptimizer):
    """Descent from a comparison oracle: per direction, only which of ``x + eps z`` and
    ``x - eps z`` is better is known (``estimators.Comparison``); ``x <- x - lr * mean_i
    sign_i z_i``. With ``ask``/``tell(better=...)`` the objective need only compare.

    Args:
        params: tensors or parameter groups.
        lr: step length along the mean of the better directions.
        eps: perturbation scale of the compared candidates.
        pairs: pairs compared a step (at least 1).
        noise: ``"gaussian"`` or ``"rademacher"``.
        seed: every direction derives from it (random when ``None``).
    """

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-2, pairs: int = 1,
                 noise: str = "gaussian", seed: int | None = None):
        settings.check("pairs", pairs)
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), Comparison(pairs), seed=seed)
