"""zoptim: training and fine-tuning neural networks from forward evaluations alone.

The pipeline of a step, each stage a package: ``noise`` (seeded, regenerable perturbations)
-> ``parts`` (estimators, spaces, transforms) -> ``engine`` (the step plan and the optimizer)
-> ``evaluators`` (in place, batched, offloaded, distributed) -> ``methods`` (the named
compositions); ``runs`` trains from a configuration, ``bench`` measures.
"""

from zoptim import _moved
from zoptim.engine.optimizer import ZOOptimizer
from zoptim.evaluators.batched import per_slice, stack
from zoptim.methods import (
    FZOO,
    GRZO,
    LOZO,
    METHODS,
    ZOMOPI,
    ZOSGD,
    EGGROLL,
    ES,
    Composed,
    ForwardGradient,
    HiZOO,
    MeZO,
    SparseMeZO,
    SubspaceMeZO,
    SubZero,
    ZOAdam,
    ZOComparison,
    ZOMuon,
    ZORankSGD,
    ZOSGDConservative,
    ZOSGDMomentum,
    ZOSignSGD,
    batch_arguments,
    model_arguments,
)
from zoptim.methods.polystep import PolyStep

_moved.install()

__version__ = "0.1.0"

__all__ = ["ZOOptimizer", "Composed", "PolyStep", "METHODS", "ZOSGD", "model_arguments",
           "batch_arguments", "stack", "per_slice", *(cls.__name__ for cls in METHODS.values())]
