"""A method assembled from parts, for what the named methods do not cover."""

from __future__ import annotations

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.parts.spaces import Dense


class Composed(ZOOptimizer):
    """An estimator, a space per group and a chain of transforms, chosen by hand::

        from zoptim.parts.estimators import Central
        from zoptim.parts.spaces import Dense
        from zoptim.parts.transforms import ClipNorm, Momentum

        opt = zoptim.Composed(model.parameters(), Central(directions=4), lr=1e-3,
                              space=lambda group: Dense("rademacher"),
                              transforms=[ClipNorm(1.0), Momentum(0.9)])

    Args:
        params: tensors or parameter groups.
        estimator: how evaluations become directional derivatives (``parts.estimators``).
        lr: learning rate.
        eps: perturbation scale.
        weight_decay: decoupled weight decay.
        noise: ``"gaussian"`` or ``"rademacher"`` (the default space's noise).
        space: a function of a parameter group giving its space (dense noise of the group's
            kind if omitted).
        transforms: applied in order to every tensor's estimate.
        seed: every direction derives from it (random when ``None``).
        foreach: as for every method (see ``ZOOptimizer``).
    """

    def __init__(self, params, estimator, *, lr: float, eps: float = 1e-3,
                 weight_decay: float = 0.0, noise: str = "gaussian", space=None,
                 transforms=(), seed: int | None = None, foreach: bool | None = None):
        self._space_of = space or (lambda group: Dense(group["noise"]))
        self._chain = list(transforms)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         estimator, seed=seed, foreach=foreach)

    def space(self, group):
        return self._space_of(group)

    def transforms(self, group):
        return self._chain
