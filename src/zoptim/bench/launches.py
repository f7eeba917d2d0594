"""Operator calls of a step beyond its forward passes, and how they grow with depth.

On a GPU every operator call is a kernel launch, whatever its size, so a step whose calls grow
with the number of tensors is launch-bound on small batches whatever the model. This counts,
with ``torch.profiler`` on any device, the ``aten::`` calls of one step of MeZO, ZO-Muon in
place and ZO-Muon with batched queries, on BERT-shaped encoders (all-MiniLM-L6-v2's widths,
random weights) of several depths:

- ``step``: the calls of one step (a step that does not redraw its factors),
- ``forwards``: the calls of the forward passes that step evaluates (two for MeZO, five for
  ZO-Muon in place, one stacked forward of five slices for ZO-Muon batched),
- ``extra``: their difference, what the step adds to the model's own work,
- the slope of ``extra`` per added layer (a least-squares line over the depths).

Calls are counted at the top level (an operator called inside another, as ``aten::addmm``
inside ``aten::linear``, is part of its caller) and in all (nested calls too). It also times
a step at a tiny batch, where overhead dominates, over the forward passes it evaluates.

    python -m zoptim.bench.launches [--layers 2,6,12] [--batch 1] [--tokens 8] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import zoptim

from zoptim.bench.step_cost import MINILM_SHAPE, interleaved_medians, make_loss, positive_ints


def encoder(layers: int, device: str):
    """A BERT encoder of MiniLM's widths with ``layers`` layers and random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**{**MINILM_SHAPE, "num_hidden_layers": layers})
    return BertModel(config, add_pooling_layer=False).eval().to(device)


def count_calls(fn) -> tuple[int, int]:
    """``(top-level, all)`` ``aten::`` calls made by ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(events)


def methods(model, rank: int, foreach: bool | None = None) -> dict:
    """name: (optimizer, the forward passes one step evaluates, as a function of the loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "MeZO": (zoptim.MeZO(params, lr=1e-7, seed=0, foreach=foreach),
                 lambda loss: [loss, loss]),
        "ZO-Muon in place": (zoptim.ZOMuon(params, lr=1e-4, rank=rank, directions=4, seed=0,
                                           batched=False, foreach=foreach),
                             lambda loss: [loss] * 5),
        "ZO-Muon batched": (zoptim.ZOMuon(params, lr=1e-4, rank=rank, directions=4, seed=0,
                                          model=model, foreach=foreach),
                            lambda loss: [lambda: loss(5)]),
    }


def measure(layers: int, args) -> list:
    """One row per method at this depth: calls of a step and of its forwards, and times."""
    model = encoder(layers, args.device)
    loss = make_loss(model, args.batch, args.tokens)
    rows = []
    with torch.no_grad():
        built = methods(model, args.rank, True if args.foreach else None)
        for opt, _ in built.values():  # factors drawn, kernels compiled
            for _ in range(2):
                opt.step(loss)
        timed = {"forward": loss, "stacked": lambda: loss(5)}
        timed.update({name: (lambda opt=opt: opt.step(loss)) for name, (opt, _) in built.items()})
        seconds = interleaved_medians(timed, args.rounds)
        for name, (opt, forwards) in built.items():
            step_top, step_all = count_calls(lambda: opt.step(loss))
            passes = forwards(loss)
            fwd_top, fwd_all = count_calls(lambda: [f() for f in passes])
            floor = seconds["stacked"] if name.endswith("batched") else \
                len(passes) * seconds["forward"]
            rows.append(dict(method=name, layers=layers, step_calls=step_top,
                             forward_calls=fwd_top, extra_calls=step_top - fwd_top,
                             step_calls_all=step_all, forward_calls_all=fwd_all,
                             extra_calls_all=step_all - fwd_all, step_s=seconds[name],
                             floor_s=floor, step_over_floor=seconds[name] / floor))
    return rows


def slope(points: list[tuple[int, int]]) -> float:
    """The least-squares slope of ``y`` over ``x``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=positive_ints, default=[2, 6, 12],
                        help="encoder depths, comma-separated (at least two)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per method")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--foreach", action="store_true",
                        help="every method writes each set of tensors with one _foreach_add_ "
                             "(by default: on a GPU, and under batched queries)")
    parser.add_argument("--out", help="write the figures to this JSON file")
    return parser


def _slopes(rows: list[dict]) -> dict:
    """Per method, the slope over depth of its extra calls (top-level and all)."""
    names = dict.fromkeys(r["method"] for r in rows)
    return {name: {key: slope([(r["layers"], r[key]) for r in rows if r["method"] == name])
                   for key in ("extra_calls", "extra_calls_all")} for name in names}


def _report(args, rows, slopes) -> None:
    print(f"BERT encoders of MiniLM's widths, batch {args.batch} x {args.tokens} tokens, rank "
          f"{args.rank}, {args.device}, torch {torch.__version__}"
          f"{', foreach writes' if args.foreach else ''}")
    print(f"{'method':20s}{'layers':>7s}{'step':>8s}{'fwds':>8s}{'extra':>8s}"
          f"{'extra (all)':>13s}{'step / fwds':>13s}")
    for r in rows:
        print(f"{r['method']:20s}{r['layers']:7d}{r['step_calls']:8d}{r['forward_calls']:8d}"
              f"{r['extra_calls']:8d}{r['extra_calls_all']:13d}{r['step_over_floor']:13.2f}")
    print("\nextra calls per added layer (top-level / all):")
    for name, s in slopes.items():
        print(f"  {name:20s}{s['extra_calls']:9.1f} / {s['extra_calls_all']:.1f}")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(set(args.layers)) < 2:
        parser.error("--layers needs at least two different depths for a slope")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs an NVIDIA GPU")
    rows = [r for n in args.layers for r in measure(n, args)]
    slopes = _slopes(rows)
    _report(args, rows, slopes)
    if args.out:
        record = dict(rows=rows, slopes=slopes, rank=args.rank, batch=args.batch,
                      tokens=args.tokens, device=args.device, foreach=args.foreach,
                      torch=torch.__version__, threads=torch.get_num_threads(),
                      machine=platform.machine(),
                      command=["python", "-m", "zoptim.bench.launches",
                               *(sys.argv[1:] if argv is None else argv)])
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
