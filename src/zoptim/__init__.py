"""zoptim: training and fine-tuning neural networks from forward evaluations alone."""

from zoptim.engine.optimizer import ZOOptimizer
from zoptim.methods.named import (
    Composed,
    HiZOO,
    LOZO,
    ZOSGD,
    ForwardGradient,
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
)

from zoptim.methods.polystep import PolyStep
from zoptim import _moved

_moved.install()

__version__ = "0.1.0"

METHODS = {
    "mezo": MeZO,
    "zo-sgd-momentum": ZOSGDMomentum,
    "zo-sign-sgd": ZOSignSGD,
    "zo-sgd-conservative": ZOSGDConservative,
    "zo-adam": ZOAdam,
    "forward-gradient": ForwardGradient,
    "sparse-mezo": SparseMeZO,
    "hizoo": HiZOO,
    "lozo": LOZO,
    "subzero": SubZero,
    "subspace-mezo": SubspaceMeZO,
    "zo-muon": ZOMuon,
    "zo-rank-sgd": ZORankSGD,
    "zo-comparison": ZOComparison,
}

__all__ = ["ZOOptimizer", "Composed", "PolyStep", "METHODS", *(cls.__name__ for cls in METHODS.values()), "ZOSGD"]
