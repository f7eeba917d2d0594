"""Command line.

- ``zoptim train``: fine-tune a language model on a task from a config (TOML or YAML) and
  ``--set key=value`` overrides; without any, a short ZO-Muon fine-tune of all-MiniLM-L6-v2
  on the movie-review snippets.
- ``zoptim eval RUN`` / ``zoptim replay RUN``: evaluate a saved run; redo it from its journal.
- ``zoptim demo``: small networks on scikit-learn's digits, methods side by side.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import METHODS

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
}


def _digits(seed: int):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("zoptim demo needs scikit-learn: pip install 'zoptim[demo]'")
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return train_test_split(x, torch.tensor(y), test_size=0.3, random_state=seed)


def _train(name: str, data, queries: int, batch: int, seed: int, log_every: int) -> dict:
    xtr, xte, ytr, yte = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    extra = {"model": model} if name == "forward-gradient" else {}
    opt = METHODS[name](model.parameters(), seed=seed, **DEMO_SETTINGS[name], **extra)
    gen = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), float("nan")
    while opt.queries < queries:
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        xb, yb = xtr[idx], ytr[idx]
        loss = opt.step(lambda: F.cross_entropy(model(xb), yb))
        if log_every and opt.steps % log_every == 0:
            print(f"  {name:20s} step {opt.steps:5d}  queries {opt.queries:6d}  loss {loss:.4f}",
                  flush=True)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return dict(method=name, steps=opt.steps, queries=opt.queries, loss=loss, test_acc=acc,
                seconds=time.perf_counter() - start)


def demo(args) -> int:
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEMO_SETTINGS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(DEMO_SETTINGS)}",
              file=sys.stderr)
        return 2
    if args.queries < 1 or args.batch < 1:
        print("--queries and --batch must be positive", file=sys.stderr)
        return 2
    data = _digits(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[1])} test, MLP 64-32-10, "
          f"{args.queries} queries per method, batch {args.batch}")
    rows = [_train(n, data, args.queries, args.batch, args.seed, args.log_every) for n in names]
    print(f"\n{'method':22s}{'steps':>7s}{'queries':>9s}{'loss':>9s}{'test acc':>10s}{'time':>8s}")
    for r in rows:
        print(f"{r['method']:22s}{r['steps']:7d}{r['queries']:9d}{r['loss']:9.4f}"
              f"{r['test_acc']:10.3f}{r['seconds']:7.1f}s")
    return 0


def _overrides(args) -> list[str]:
    sets = list(args.set or [])
    for flag, key in (("steps", "steps"), ("method", "method.name"), ("model", "model.name"),
                      ("task", "task.name"), ("task_path", "task.path"),
                      ("scheme", "model.scheme")):
        value = getattr(args, flag)
        if value is not None:
            sets.append(f"{key}={value}" if flag == "steps" else f"{key}={json_str(value)}")
    return sets


def json_str(value: str) -> str:
    import json

    return json.dumps(value)


def train_command(args) -> int:
    from . import config
    from .train import train

    cfg = config.load(args.config, _overrides(args))
    train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def eval_command(args) -> int:
    from .train import evaluate

    acc = evaluate(args.run_dir, args.split)
    print(f"{args.split} accuracy: {acc:.4f}")
    return 0


def replay_command(args) -> int:
    from pathlib import Path

    from .train import latest_checkpoint, replay
    from safetensors.torch import load_file

    run, steps = replay(args.run_dir)
    checkpoint = latest_checkpoint(Path(args.run_dir))
    print(f"replayed {steps} steps ({run.opt.queries} queries) without running the model")
    if checkpoint is not None and run.opt.steps == json_step(checkpoint):
        saved = load_file(str(checkpoint / "trainable.safetensors"))
        same = all(torch.equal(saved[n], p.detach()) for n, p in run.params.items())
        print(f"final weights {'equal' if same else 'DIFFER FROM'} {checkpoint.name}")
        return 0 if same else 1
    return 0


def json_step(checkpoint) -> int:
    return int(checkpoint.name.split("-")[-1])


def main(argv=None) -> int:
    from .config import ConfigError
    from .integrations.models import ModelError
    from .tasks.data import DataError
    from .train import RunError

    parser = argparse.ArgumentParser(prog="zoptim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a language model on a task")
    p.add_argument("--config", help="TOML or YAML file (defaults: zoptim.config.TrainConfig)")
    p.add_argument("--out", default="runs/default", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. --set method.settings.lr=1e-3 (repeatable)")
    p.add_argument("--steps", type=int)
    p.add_argument("--method")
    p.add_argument("--model")
    p.add_argument("--scheme")
    p.add_argument("--task")
    p.add_argument("--task-path", help="the task's data file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=train_command)

    p = sub.add_parser("eval", help="evaluate a saved run at its latest checkpoint")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--split", choices=["train", "dev", "test"], default="test")
    p.set_defaults(handler=eval_command)

    p = sub.add_parser("replay", help="redo a run from its journal and check the final weights")
    p.add_argument("run_dir", metavar="RUN")
    p.set_defaults(handler=replay_command)

    p = sub.add_parser("demo", help="train an MLP on digits with ZO methods side by side")
    p.add_argument("--methods", default="zo-muon,mezo",
                   help=f"comma-separated, from: {', '.join(DEMO_SETTINGS)}")
    p.add_argument("--queries", type=int, default=6000, help="objective evaluations per method")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=300, help="steps between progress lines")
    p.set_defaults(handler=demo)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError, ModelError, RunError, ValueError) as err:
        print(f"zoptim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
