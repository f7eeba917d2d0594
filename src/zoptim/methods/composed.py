"""A method assembled from parts, for what the named methods do not cover."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.parts.spaces import Dense, Space
from zoptim.parts.transforms import Transform


class Composed(ZOOptimizer):
    """An estimator, a space per group and a chain of transforms, chosen by hand::

        from zoptim.parts.estimators import Central
        from zoptim.parts.spaces import Dense
        from zoptim.parts.transforms import ClipNorm, Momentum

        opt = zoptim.Composed(model.parameters(), Central(directions=4), lr=1e-3,
                              space=lambda group: Dense("rademacher"),
                              transforms=[ClipNorm(1.0), Momentum(0.9)])

    The update, with ``g`` the estimator's directional derivatives lifted through each
    group's space and ``T_1, ..., T_k`` the transforms:

        theta <- theta - lr * (T_k(... T_1(g)) + weight_decay * theta)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        estimator (callable): how evaluations become directional derivatives
            (``parts.estimators``).
        lr (float): learning rate (required).
        eps (float, optional): perturbation scale. Default: 1e-3.
        weight_decay (float, optional): decoupled weight decay,
            ``p <- p (1 - lr * weight_decay)``, applied to every tensor of a group (put
            biases and norms in a group of their own to exempt them). Default: 0.0.
        noise (str, optional): ``"gaussian"`` or ``"rademacher"`` (the default space's
            noise). Default: ``"gaussian"``.
        space (callable, optional): a function of a parameter group giving its space (dense
            noise of the group's kind if ``None``). Default: None.
        transforms (sequence, optional): applied in order to every tensor's estimate.
            Default: ``()``.
        seed (int, optional): every direction derives from it (random when ``None``); two
            optimizers with one seed and one objective take the same steps. Default: None.
        foreach (bool, optional): write the tensors of one shape together (one
            ``_foreach_add_`` a set) rather than one by one; ``None``: on CUDA
            (``torch.optim``'s rule) and under batched queries (see ``ZOOptimizer``).
            Default: None.
    """

    def __init__(self, params, estimator: Callable, *, lr: float, eps: float = 1e-3,
                 weight_decay: float = 0.0, noise: str = "gaussian",
                 space: Callable[[dict], Space] | None = None,
                 transforms: Sequence[Transform] = (), seed: int | None = None,
                 foreach: bool | None = None):
        self._space_of = space or (lambda group: Dense(group["noise"]))
        self._chain = list(transforms)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, noise=noise),
                         estimator, seed=seed, foreach=foreach)

    def space(self, group):
        return self._space_of(group)

    def transforms(self, group):
        return self._chain
