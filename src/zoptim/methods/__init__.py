"""The named methods, each a short composition of an estimator, a space per parameter group
and a chain of transforms, and the registry that ``zoptim train`` names them by."""

from __future__ import annotations

from zoptim.methods.composed import Composed
from zoptim.methods.dense import (
    FZOO,
    HiZOO,
    ZOSGD,
    ForwardGradient,
    MeZO,
    SparseMeZO,
    ZOAdam,
    ZOSGDConservative,
    ZOSGDMomentum,
    ZOSignSGD,
)
from zoptim.methods.evolution import EGGROLL, ES
from zoptim.methods.group_relative import GRZO
from zoptim.methods.ordinal import ZOComparison, ZORankSGD
from zoptim.methods.subspace import LOZO, ZOMOPI, SubspaceMeZO, SubZero, ZOMuon

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
    "zo-mopi": ZOMOPI,
    "fzoo": FZOO,
    "grzo": GRZO,
    "es": ES,
    "eggroll": EGGROLL,
    "zo-rank-sgd": ZORankSGD,
    "zo-comparison": ZOComparison,
}


def model_arguments(cls, model, stacked_closure: bool = True) -> dict:
    """The ``model=`` argument a method takes, if any: always where it needs the model
    (forward gradient), and where it only turns batched queries on, when the closure can
    evaluate a stacked batch (``closure(slices)``).

    Args:
        cls (type): the method's class.
        model (torch.nn.Module): the module the closure runs.
        stacked_closure (bool, optional): whether the closure evaluates a stacked batch.
            Default: True.

    Returns:
        ``{"model": model}``, or an empty dict.
    """
    uses = getattr(cls, "uses_model", None)
    if uses == "required" or (uses == "optional" and stacked_closure):
        return {"model": model}
    return {}


def batch_arguments(cls, batch_size: int) -> dict:
    """The ``examples=`` argument of a method that draws one direction per example of the
    batch (GRZO): the batch's size.

    Args:
        cls (type): the method's class.
        batch_size (int): the examples of a batch.

    Returns:
        ``{"examples": batch_size}``, or an empty dict.
    """
    return {"examples": batch_size} if getattr(cls, "per_example_directions", False) else {}


__all__ = ["METHODS", "model_arguments", "batch_arguments", "Composed", "ZOSGD",
           *(cls.__name__ for cls in METHODS.values())]
