"""``zoptim demo``: small networks on scikit-learn's digits, methods side by side under one
query budget."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from zoptim.engine.evaluators.batched import per_slice, stack
from zoptim.methods import METHODS, batch_arguments, model_arguments

# Settings that work for the demo's MLP (found by a small grid on one seed).
DEMO_SETTINGS = {
    "mezo": dict(lr=1e-2),
    "zo-sgd-momentum": dict(lr=2e-3),
    "zo-sign-sgd": dict(lr=1e-2),
    "zo-sgd-conservative": dict(lr=1e-2),
    "zo-adam": dict(lr=1e-2),
    "forward-gradient": dict(lr=1e-2),
    "sparse-mezo": dict(lr=1e-2, sparsity=0.5),
    "hizoo": dict(lr=1e-2, smoothing=1e-6),
    "lozo": dict(lr=1e-2, rank=4, resample_every=50),
    "subzero": dict(lr=1e-2, rank=4, resample_every=50),
    "subspace-mezo": dict(lr=3e-2, rank=8, resample_every=50, vector_lr=1e-2),
    "zo-muon": dict(lr=1e-1, rank=8, resample_every=50, vector_lr=1e-2),
    "grzo": dict(lr=1e-3, eps=1e-2),
}


def digits(seed: int = 0):
    """scikit-learn's digits scaled to [0, 1]: train and test inputs, train and test labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("scikit-learn's digits need scikit-learn: pip install 'zoptim[demo]'")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return train_test_split(x, torch.tensor(y), test_size=0.3, random_state=seed)


def _closure(model, xb, yb):
    """The batch's mean cross-entropy; given ``slices``, one per slice of the stacked batch."""
    def closure(slices=None):
        if slices is None:
            return F.cross_entropy(model(xb), yb)
        losses = F.cross_entropy(model(stack(xb, slices)), stack(yb, slices), reduction="none")
        return per_slice(losses, slices)

    return closure


def _train(name: str, data, queries: int, batch: int, seed: int, log_every: int) -> dict:
    xtr, xte, ytr, yte = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    cls = METHODS[name]
    # in place, except where the method needs batched queries (GRZO, one direction an example)
    opt = cls(model.parameters(), seed=seed, **DEMO_SETTINGS[name],
              **model_arguments(cls, model, stacked_closure=False),
              **batch_arguments(cls, batch))
    gen = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), float("nan")
    while opt.queries < queries:
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        loss = opt.step(_closure(model, xtr[idx], ytr[idx]))
        if log_every and opt.steps % log_every == 0:
            print(f"  {name:20s} step {opt.steps:5d}  queries {opt.queries:6d}  loss {loss:.4f}",
                  flush=True)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return dict(method=name, steps=opt.steps, queries=opt.queries, loss=loss, test_acc=acc,
                seconds=time.perf_counter() - start)


def run(args) -> int:
    names = args.methods  # parsed by the command line (cli.names)
    if args.queries < 1 or args.batch < 1:
        raise ValueError("--queries and --batch must be positive")
    data = digits(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[1])} test, MLP 64-32-10, "
          f"{args.queries} queries per method, batch {args.batch}")
    rows = [_train(n, data, args.queries, args.batch, args.seed, args.log_every) for n in names]
    print(f"\n{'method':22s}{'steps':>7s}{'queries':>9s}{'loss':>9s}{'test acc':>10s}{'time':>8s}")
    for r in rows:
        print(f"{r['method']:22s}{r['steps']:7d}{r['queries']:9d}{r['loss']:9.4f}"
              f"{r['test_acc']:10.3f}{r['seconds']:7.1f}s")
    return 0
