"""Queries per second against world size: perturbation and data parallelism on gloo.

MeZO with 4 directions (8 evaluations a step) trains MiniLM's architecture (random weights,
batch 16 x 48 tokens) on 1 process and on ``--world`` processes, each of the latter with
its share of the machine's cores. Perturbation parallelism deals the 8 evaluations out; data
parallelism gives each rank its share of the batch. Printed, side by side in one run:
queries per second (one query: the objective at one point on the whole batch), the speed-up
over one process with one rank's share of the cores (and, for scale, one process with all of
them), and the bytes all-reduced per step.

    python -m zoptim.bench.scaling [--world 2] [--steps 6] [--out scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zoptim
from zoptim.engine.evaluators.distributed import Parallel

from zoptim.bench.step_cost import load_minilm, make_loss


def _model(tiny: bool):
    if not tiny:
        return load_minilm(random_weights=True)
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, vocab_size=2000),
                     add_pooling_layer=False).eval()


def _worker(rank, world, mode, threads, steps, batch, tokens, tiny, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    model = _model(tiny)
    opt = zoptim.MeZO(model.parameters(), lr=1e-7, directions=4, seed=0)
    par = Parallel(data=world if mode == "data" else 1).attach(opt)
    # data parallelism: each rank's micro-batch is its share of the batch
    loss = make_loss(model, batch // par.data, tokens, seed=par.data_rank)
    opt.step(loss)  # warm-up: kernels compiled, caches filled
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step(loss)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": seconds, "queries": (opt.queries // (steps + 1)) * steps,
                       "bytes_per_step": par.bytes_reduced / (steps + 1)}, f)
    dist.destroy_process_group()


def measure(world: int, mode: str, steps: int, batch: int, tokens: int, threads: int,
            tiny: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, mode, threads, steps, batch, tokens, tiny,
                                os.path.join(tmp, "init"), out), nprocs=world)
        with open(out) as f:
            r = json.load(f)
    return {"world": world, "mode": mode, "threads_per_rank": threads,
            "queries_per_s": r["queries"] / r["seconds"], "bytes_per_step": r["bytes_per_step"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes of the parallel runs")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer BERT (to test the harness)")
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.world < 2 or args.batch % args.world:
        parser.error("--world must be at least 2 and divide --batch")
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.world)
    # one process with one rank's share of the cores, then with all of them: the speed-up is
    # over the first (per-process scaling); the second shows what threads alone give
    run = dict(steps=args.steps, batch=args.batch, tokens=args.tokens, tiny=args.tiny)
    rows = [measure(1, "single", threads=share, **run), measure(1, "single", threads=cores, **run)]
    for mode in ("perturbation", "data"):
        rows.append(measure(args.world, mode, threads=share, **run))
    model = "a 2-layer BERT" if args.tiny else "MiniLM architecture"
    print(f"{model}, MeZO 4 directions (8 evaluations a step), batch {args.batch} x "
          f"{args.tokens} tokens, {cores} cores, gloo\n")
    print(f"{'parallelism':14s}{'world':>7s}{'threads/rank':>14s}{'queries/s':>11s}"
          f"{'speed-up':>10s}{'bytes/step':>12s}")
    for r in rows:
        r["speedup"] = r["queries_per_s"] / rows[0]["queries_per_s"]
        print(f"{r['mode']:14s}{r['world']:7d}{r['threads_per_rank']:14d}"
              f"{r['queries_per_s']:11.2f}{r['speedup']:10.2f}{r['bytes_per_step']:12.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cores": cores, "batch": args.batch, "tokens": args.tokens,
                       "torch": torch.__version__,
                       "command": ["python", "-m", "zoptim.bench.scaling", *sys.argv[1:]],
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
