"""Module paths of zoptim 0.1, kept importable: ``import zoptim.batched`` gives the module now at
``zoptim.evaluators.batched`` (the same module object), with a ``DeprecationWarning``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "zoptim.perturb": "zoptim.noise",
    "zoptim.perturb_triton": "zoptim.noise.triton",
    "zoptim.estimators": "zoptim.parts.estimators",
    "zoptim.subspace": "zoptim.parts.spaces",
    "zoptim.transforms": "zoptim.parts.transforms",
    "zoptim.core": "zoptim.engine.optimizer",
    "zoptim.optimizers": "zoptim.methods",
    "zoptim.deepzero": "zoptim.methods.deepzero",
    "zoptim.polystep": "zoptim.methods.polystep",
    "zoptim.first_order": "zoptim.methods.first_order",
    "zoptim.batched": "zoptim.evaluators.batched",
    "zoptim.offload": "zoptim.evaluators.offload",
    "zoptim.distributed": "zoptim.evaluators.distributed",
    "zoptim.train": "zoptim.runs.run",
    "zoptim.config": "zoptim.runs.config",
    "zoptim.journal": "zoptim.runs.journal",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
