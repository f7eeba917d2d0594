"""Zeroth-order methods on networks backpropagation cannot train, side by side in one run.

On scikit-learn's digits (1,257 training and 540 test images, 8 x 8), each method trains a
64-32-10 network whose hidden layer is a tanh (differentiable), a hard threshold or int8
(weights and inputs rounded in every pass), with the same budget of queries, and the table
gives test accuracy and queries spent (PolyStep and DeepZero, which spend many cheap queries a
step, get a longer budget). Beside them, the first-order ceiling: AdamW through
surrogate gradients (sigmoid slope for thresholds, straight-through for rounding), one
query per backpropagated batch, with the same budget.

    python -m zoptim.bench.nondiff [--queries 6000] [--out nondiff.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoptim
from zoptim.methods.deepzero import DeepZero
from zoptim.bench.demo import digits
from zoptim.integrations.nondiff import HardThreshold, Int8Linear, use_surrogates
from zoptim.methods.polystep import PolyStep

NETWORKS = ("tanh", "hard-threshold", "int8")


def network(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "int8":
        return nn.Sequential(Int8Linear(64, 32), nn.Tanh(), Int8Linear(32, 10))
    act = HardThreshold() if kind == "hard-threshold" else nn.Tanh()
    return nn.Sequential(nn.Linear(64, 32), act, nn.Linear(32, 10))


# name: (build the optimizer, eps of the ZO methods); eps is larger on piecewise-constant nets
METHODS = {
    "mezo": lambda ps, m, eps: zoptim.MeZO(ps, lr=1e-2, eps=eps, seed=1),
    "zo-rank-sgd": lambda ps, m, eps: zoptim.ZORankSGD(ps, lr=1e-2, eps=eps, seed=1),
    "zo-comparison": lambda ps, m, eps: zoptim.ZOComparison(ps, lr=1e-2, eps=eps, pairs=2,
                                                            seed=1),
    "zo-muon": lambda ps, m, eps: zoptim.ZOMuon(ps, lr=1e-1, eps=eps, rank=8, vector_lr=1e-2,
                                                seed=1),
    "polystep": lambda ps, m, eps: PolyStep(ps, model=m, rank=2, temperature=0.1,
                                            step_radius=2.0, probe_radius=1.0, seed=0),
    "deepzero": lambda ps, m, eps: DeepZero(m, F.cross_entropy, lr=0.05, mu=eps,
                                            sparsity=0.5, seed=0),
}
LONG = ("polystep", "deepzero")  # many cheap queries a step: given the long budget


def _batch(xs, ys, step, size=128):
    idx = torch.randint(0, len(xs), (size,), generator=torch.Generator().manual_seed(step))
    return xs[idx], ys[idx]


def run_zo(method, kind, queries, data, polystep_queries):
    xtr, xte, ytr, yte = data
    model = network(kind)
    eps = 1e-2 if kind != "hard-threshold" else 5e-2
    opt = METHODS[method](list(model.parameters()), model, eps)
    budget = polystep_queries if method in LONG else queries
    while opt.queries < budget:
        xb, yb = _batch(xtr, ytr, opt.steps, 256 if method == "polystep" else 128)
        if method == "deepzero":
            opt.step(xb, yb)
        else:
            opt.step(lambda: F.cross_entropy(model(xb), yb))
    return model, opt.queries


def run_first_order(kind, queries, data):
    xtr, xte, ytr, yte = data
    model = use_surrogates(network(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(queries):
        xb, yb = _batch(xtr, ytr, step)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    use_surrogates(model, False)
    return model, queries


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m zoptim.bench.nondiff``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=6000, help="budget of each ZO method")
    parser.add_argument("--polystep-queries", type=int, default=64000,
                        help="the budget of PolyStep and DeepZero, whose queries are many and "
                             "cheap (640 a PolyStep step here; DeepZero's are partial forwards)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="write the figures to this JSON file")
    return parser


def _chosen_methods(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated method names of ``--methods``; an unknown one is a usage error."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def _measure(name: str, kind: str, args, data) -> dict:
    """Train network ``kind`` with method ``name`` (or the first-order baseline) and return its
    test accuracy, queries spent and seconds taken."""
    xte, yte = data[1], data[3]
    start = time.perf_counter()
    if name in METHODS:
        model, spent = run_zo(name, kind, args.queries, data, args.polystep_queries)
    else:
        model, spent = run_first_order(kind, args.queries, data)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return {"test_accuracy": acc, "queries": spent, "seconds": time.perf_counter() - start}


def _print_row(name: str, row: dict) -> None:
    """Print one method's accuracy and queries on every network."""
    print(f"{name:30s}" + "".join(f"{kind}: {row[kind]['test_accuracy']:.3f} "
                                  f"({row[kind]['queries']} q)   " for kind in NETWORKS),
          flush=True)


def _write(out: str, rows: list[dict]) -> None:
    """Write the figures and the command line to the JSON file ``out``."""
    with open(out, "w") as f:
        json.dump({"data": "scikit-learn digits, 1257 train / 540 test", "rows": rows,
                   "command": ["python", "-m", "zoptim.bench.nondiff", *sys.argv[1:]]},
                  f, indent=2)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    methods = _chosen_methods(parser, args.methods)
    data = digits()
    rows = []
    for name in [*methods, "adamw (surrogate gradients)"]:
        row = {"method": name}
        for kind in NETWORKS:
            row[kind] = _measure(name, kind, args, data)
        rows.append(row)
        _print_row(name, row)
    if args.out:
        _write(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
