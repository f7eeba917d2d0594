"""Offloading on OPT shapes: peak GPU memory and step time, streamed against resident.

For each shape an OPT model is built with random weights in half precision in CPU memory, then
trained with MeZO, side by side in one run:

- offloaded (``zoptim.engine.evaluators.offload``): its decoder layers stream from pinned CPU
  memory, once per step; the step's peak GPU memory and time,
- resident, where the model fits the GPU: the same step with every weight on the GPU.

    python -m zoptim.bench.offload --shapes 1.3b,13b --out offload.json

``--device cpu --shapes tiny`` runs the same code anywhere (CPU as both devices).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import zoptim
from zoptim.engine.evaluators.offload import Offload

from zoptim.bench.opt_shapes import (
    add_shape_options,
    build_opt,
    checked_shapes,
    lm_loss,
    peak_bytes,
)
from zoptim.bench.step_cost import median_seconds


def measure(shape: str, batch: int, tokens: int, device: str, dtype, repeats: int) -> dict:
    dev = torch.device(device)
    with torch.no_grad():
        model = build_opt(shape, "meta", dtype).to_empty(device="cpu")
        for p in model.parameters():  # drawn on the device: half-precision draws on a CPU crawl
            p.copy_(torch.randn(p.shape, dtype=p.dtype, device=dev) * 0.02)
    print(f"{shape}: built in CPU memory", file=sys.stderr, flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    record = {"shape": shape, "parameters": n_params, "batch": batch, "tokens": tokens,
              "dtype": str(dtype).removeprefix("torch."), "device": device}

    offload = Offload(model, device=dev)
    opt = zoptim.MeZO(model.parameters(), lr=1e-7, eps=1e-3, seed=0)
    offload.attach(opt)
    loss = lm_loss(model, batch, tokens, device)
    print(f"{shape}: streaming", file=sys.stderr, flush=True)
    record["offloaded_step_s"] = median_seconds(lambda: opt.step(loss), repeats, warmup=1)
    record["offloaded_peak_bytes"] = peak_bytes(lambda: opt.step(loss), device)
    offload.flush()

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fits = dev.type != "cuda" or \
        param_bytes < 0.7 * torch.cuda.get_device_properties(dev).total_memory
    if fits:
        model.to(dev)
        opt = zoptim.MeZO(model.parameters(), lr=1e-7, eps=1e-3, seed=0)
        record["resident_step_s"] = median_seconds(lambda: opt.step(loss), repeats, warmup=1)
        record["resident_peak_bytes"] = peak_bytes(lambda: opt.step(loss), device)
        record["offload_time_ratio"] = record["offloaded_step_s"] / record["resident_step_s"]
    del model, opt, offload
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_options(parser, shapes="1.3b,13b", repeats=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    shapes = checked_shapes(parser, args)

    def gb(v):
        return "-" if v is None else f"{v / 2**30:.2f} GB"

    records = []
    print(f"{'shape':>6s}{'params':>10s}  {'offloaded step':>15s}{'peak':>11s}"
          f"{'resident step':>15s}{'peak':>11s}{'time ratio':>12s}")
    for shape in shapes:
        r = measure(shape, args.batch, args.tokens, args.device, getattr(torch, args.dtype),
                    args.repeats)
        records.append(r)
        res = r.get("resident_step_s")
        print(f"{shape:>6s}{r['parameters'] / 1e9:9.2f}B  {r['offloaded_step_s'] * 1e3:13.0f}ms"
              f"{gb(r['offloaded_peak_bytes']):>11s}"
              f"{'-' if res is None else f'{res * 1e3:.0f}ms':>15s}"
              f"{gb(r.get('resident_peak_bytes')):>11s}"
              f"{r.get('offload_time_ratio', float('nan')):12.2f}", flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "method": "mezo",
                       "command": ["python", "-m", "zoptim.bench.offload", *sys.argv[1:]],
                       "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
