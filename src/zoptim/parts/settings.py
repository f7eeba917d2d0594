"""Every method setting's rule, in one place: constructors, parameter groups added later and
run configurations are all checked here, and a bad value is refused with its key named."""

from __future__ import annotations

import math
from numbers import Real

from zoptim.noise import NOISE_KINDS


def _number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _fraction(v, closed: bool = False) -> bool:
    return _number(v) and 0 <= v and (v <= 1 if closed else v < 1)


RULES = {
    "lr": (lambda v: _number(v) and v >= 0, "the learning rate must be a finite number >= 0"),
    "eps": (lambda v: _number(v) and v > 0, "the perturbation scale must be a finite number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "weight decay must be a finite number >= 0"),
    "vector_lr": (lambda v: _number(v) and v >= 0, "must be a finite number >= 0"),
    "noise": (lambda v: v in NOISE_KINDS, f"choose one of {NOISE_KINDS}"),
    "rank": (lambda v: _integer(v, 1), "must be an integer >= 1"),
    "resample_every": (lambda v: _integer(v, 1), "must be an integer >= 1"),
    "directions": (lambda v: _integer(v, 1), "it must be an integer >= 1"),
    "candidates": (lambda v: _integer(v, 2), "rank at least 2"),
    "members": (lambda v: _integer(v, 2), "a population of at least 2"),
    "pairs": (lambda v: _integer(v, 1), "compare at least 1 pair"),
    "max_slices": (lambda v: v is None or _integer(v, 1), "must be at least 1"),
    "ns_steps": (lambda v: _integer(v, 1), "must be an integer >= 1"),
    "k": (lambda v: _integer(v, 1), "keep at least 1 singular direction"),
    "ortho": (lambda v: v in ("newton_schulz", "svd"), "orthogonalization must be "
              "'newton_schulz' or 'svd'"),
    "momentum": (_fraction, "it must be in [0, 1)"),
    "sparsity": (_fraction, "it must be in [0, 1)"),
    "smoothing": (lambda v: _fraction(v, closed=True), "it must be in [0, 1]"),
    "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2
              and all(_fraction(b) for b in v), "two numbers in [0, 1)"),
    "adam_eps": (lambda v: _number(v) and v > 0, "must be a finite number > 0"),
    "generations": (lambda v: _integer(v, 2), "GRPO normalizes rewards within a group of at "
                    "least 2 completions per prompt"),
    "temperature": (lambda v: _number(v) and v > 0, "completions are sampled: it must be > 0"),
    "beta": (lambda v: _number(v) and v >= 0, "the KL weight must be a finite number >= 0"),
    "max_grad_norm": (lambda v: _number(v) and v > 0, "must be a finite number > 0"),
    "micro_batches": (lambda v: _integer(v, 1), "must be an integer >= 1"),
}


def is_rate(key: str) -> bool:
    """Whether a setting is a learning rate (``lr``, ``vector_lr``, ...): what ``"auto"``
    calibrates (``runs.calibration``)."""
    return key == "lr" or key.endswith("_lr")


def check(key: str, value) -> None:
    """Refuse a bad value of a known setting, naming it; unknown keys pass."""
    rule = RULES.get(key)
    if rule is not None and not rule[0](value):
        raise ValueError(f"{key}={value!r} is invalid: {rule[1]}")


def checked(values: dict) -> dict:
    """``values`` after checking each known setting (returns it, for chaining)."""
    for key, value in values.items():
        check(key, value)
    return values

