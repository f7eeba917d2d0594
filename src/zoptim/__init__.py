"""zoptim: training and fine-tuning neural networks from forward evaluations alone.

The pipeline, each stage a package that imports only the stages below it (checked by
``lint-imports``): ``noise`` (seeded, regenerable perturbations) -> ``parts`` (estimators,
spaces, transforms and the settings' rules) -> ``engine`` (the step plan, the evaluators that
run a step's queries in place, batched, offloaded or distributed, and the optimizer) ->
``methods`` (the named compositions) -> ``tasks`` (data, prompts, metrics, rewards) ->
``integrations`` (models and libraries: transformers, peft, TRL, vision) -> ``runs``
(training from a configuration) -> ``bench`` (measurements) -> ``cli``.
"""

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.engine.evaluators.batched import per_slice, stack
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


__version__ = "0.1.0"

__all__ = ["ZOOptimizer", "Composed", "PolyStep", "METHODS", "ZOSGD", "model_arguments",
           "batch_arguments", "stack", "per_slice", *(cls.__name__ for cls in METHODS.values())]
