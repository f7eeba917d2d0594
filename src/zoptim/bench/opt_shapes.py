"""Step cost and peak memory of a two-point step on OPT shapes, the GPU mode of the benchmark.

OPT models are built from ``transformers.OPTConfig`` with random weights (no download), in half
precision on the chosen device, and trained as causal language models on random tokens. For
each shape and sequence length it measures, side by side in one run:

- one forward pass of the loss, and the peak memory of inference (``no_grad``),
- MeZO's two-point step (Gaussian noise) and ZO-Muon's two-point step (one query and its
  baseline), as step / (2 x forward), and their peak memory over inference's,
- ZO-Muon with 4 queries and a baseline, per evaluation (step / (5 x forward)), in place and
  with batched queries (one forward pass on a stacked batch).

    python -m zoptim.bench.opt_shapes --shapes 1.3b,6.7b --tokens 64,256 --out opt.json

``--shapes tiny --device cpu`` runs the same code on a small shape anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import zoptim
from zoptim.engine.evaluators.batched import per_slice, stack

from zoptim.bench.step_cost import median_seconds

# hidden size, layers, attention heads, feed-forward size (the published OPT configurations)
SHAPES = {
    "tiny": (64, 2, 4, 256),
    "125m": (768, 12, 12, 3072),
    "1.3b": (2048, 24, 32, 8192),
    "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480),
    "30b": (7168, 48, 56, 28672),
}


def build_opt(shape: str, device: str, dtype: torch.dtype):
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn = SHAPES[shape]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=ffn, word_embed_proj_dim=hidden, max_position_embeddings=2048,
                       vocab_size=50272, dropout=0.0, attention_dropout=0.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target precision, on the device, at once
    try:
        with torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def lm_loss(model, batch: int, tokens: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (batch, tokens), generator=g).to(device)

    def loss(slices=None):
        batch = ids if slices is None else stack(ids, slices)
        logits = model(input_ids=batch).logits[:, :-1]
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 batch[:, 1:].reshape(-1), reduction="none")
        return tokens.mean() if slices is None else per_slice(tokens, slices)

    return loss


def peak_bytes(fn, device: str) -> int | None:
    """Peak GPU memory allocated while ``fn`` runs (None off a GPU, where ``fn`` is not run)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure(shape: str, batch: int, tokens: int, device: str, dtype: torch.dtype,
            repeats: int) -> dict:
    model = build_opt(shape, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = lm_loss(model, batch, tokens, device)
    with torch.no_grad():
        forward = median_seconds(loss, repeats)
        inference_peak = peak_bytes(loss, device)
    methods = {
        "mezo": (zoptim.MeZO(params, lr=1e-7, eps=1e-3, seed=0), 2),
        "zo-muon, 1 query": (zoptim.ZOMuon(params, lr=1e-4, rank=32, directions=1, seed=0), 2),
        "zo-muon, 4 queries": (zoptim.ZOMuon(params, lr=1e-4, rank=32, directions=4, seed=0), 5),
        "zo-muon, 4 batched": (zoptim.ZOMuon(params, lr=1e-4, rank=32, directions=4, seed=0,
                                             model=model), 5),
    }
    rows = []
    for name, (opt, evaluations) in methods.items():
        seconds = median_seconds(lambda: opt.step(loss), repeats)
        peak = peak_bytes(lambda: opt.step(loss), device)
        rows.append({"method": name, "step_s": seconds, "evaluations": evaluations,
                     "step_over_evaluations": seconds / (evaluations * forward),
                     "peak_bytes": peak,
                     "peak_over_inference": None if peak is None else peak / inference_peak})
        del opt
    record = {"shape": shape, "parameters": sum(p.numel() for p in params), "batch": batch,
              "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "device": device,
              "forward_s": forward, "inference_peak_bytes": inference_peak, "rows": rows}
    del model, params
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


def add_shape_options(parser: argparse.ArgumentParser, shapes: str, repeats: int) -> None:
    """The options every OPT-shape benchmark takes (besides its sequence lengths)."""
    parser.add_argument("--shapes", default=shapes, help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed steps per method")
    parser.add_argument("--out", help="write the figures to this JSON file")


def checked_shapes(parser: argparse.ArgumentParser, args) -> list[str]:
    """``--shapes`` as a list, after refusing unknown shapes and a GPU that is not there."""
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs an NVIDIA GPU; use --device cpu (with small shapes)")
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_options(parser, shapes="1.3b,6.7b", repeats=10)
    parser.add_argument("--tokens", default="64,256", help="sequence lengths, comma-separated")
    args = parser.parse_args(argv)
    shapes = checked_shapes(parser, args)
    dtype = getattr(torch, args.dtype)
    records = []
    print(f"{'shape':>6s}{'tokens':>8s}{'forward':>10s}  {'method':20s}{'step':>10s}"
          f"{'step/(n x fwd)':>16s}{'peak/inference':>16s}")
    for shape in shapes:
        for tokens in (int(t) for t in args.tokens.split(",")):
            r = measure(shape, args.batch, tokens, args.device, dtype, args.repeats)
            records.append(r)
            for row in r["rows"]:
                mem = row["peak_over_inference"]
                print(f"{shape:>6s}{tokens:8d}{r['forward_s'] * 1e3:8.1f}ms  {row['method']:20s}"
                      f"{row['step_s'] * 1e3:8.1f}ms{row['step_over_evaluations']:16.2f}"
                      f"{'-' if mem is None else f'{mem:.2f}':>16s}")
    if args.out:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__,
                       "noise_backend": zoptim.noise.get_backend(),
                       "command": ["python", "-m", "zoptim.bench.opt_shapes", *sys.argv[1:]],
                       "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
