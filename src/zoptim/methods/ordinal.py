"""Methods that read only the order of their values: a person or a judge model may rank or
compare the candidates instead of scoring them (``ask``/``tell``)."""

from __future__ import annotations

from zoptim.parts import settings
from zoptim.engine.optimizer import ZOOptimizer
from zoptim.parts.estimators import Comparison, Ranking


class ZORankSGD(ZOOptimizer):
    """ZO-RankSGD (Tang et al., 2024, ICLR, arXiv 2303.03751): ``candidates`` perturbations
    ``x + eps z_i`` are ranked, and the step follows the rank-weighted sum of their
    directions (``parts.estimators.Ranking``). The closure's values are used only through
    their order; with ``ask``/``tell(ranking=...)`` the objective need only rank the
    candidates. ``candidates`` evaluations a step.

    The update, with ``m`` candidates and ``r_k`` candidate ``k``'s place (0: best):

        g = sum_k (2 r_k - m + 1) / (m (m - 1) / 2) * z_k
        x <- x - lr * g

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): step length along the rank-weighted direction. Default: 1e-3.
        eps (float, optional): perturbation scale of the candidates. Default: 1e-2.
        candidates (int, optional): candidates ranked a step (at least 2). Default: 4.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every candidate derives from it (random when ``None``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-2, candidates: int = 4,
                 noise: str = "gaussian", seed: int | None = None):
        settings.check("candidates", candidates)
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), Ranking(candidates),
                         seed=seed)


class ZOComparison(ZOOptimizer):
    """Descent from a comparison oracle: per direction, only which of ``x + eps z`` and
    ``x - eps z`` is better is known (``parts.estimators.Comparison``, the one-bit estimator
    of Cai et al., 2022). With ``ask``/``tell(better=...)`` the objective need only compare.
    Two evaluations a pair.

    The update, with ``sign_i`` the comparison of pair ``i``:

        sign_i = sign(f(x + eps z_i) - f(x - eps z_i))
        x <- x - lr * mean_i sign_i z_i

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): step length along the mean of the better directions.
            Default: 1e-3.
        eps (float, optional): perturbation scale of the compared candidates. Default: 1e-2.
        pairs (int, optional): pairs compared a step (at least 1). Default: 1.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` perturbations.
            Default: ``"gaussian"``.
        seed (int, optional): every direction derives from it (random when ``None``).
            Default: None.
    """

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-2, pairs: int = 1,
                 noise: str = "gaussian", seed: int | None = None):
        settings.check("pairs", pairs)
        super().__init__(params, dict(lr=lr, eps=eps, noise=noise), Comparison(pairs), seed=seed)
