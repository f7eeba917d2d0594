"""What a population costs: one step of evolution strategies on a reward task against greedy
inference on the same prompts, side by side in one run.

For ``--members`` N and ``--prompts`` B it times, on the same model and Countdown prompts:

- inference of one batch: the B prompts decoded greedily (what one member's rollouts are);
- batched inference: the B prompts stacked N times, decoded in one pass, no perturbation
  (EGGROLL's reference: "throughput as a fraction of batched inference");
- an EGGROLL step: N rank-r members as slices of that stacked batch, and the update;
- an ES step: N dense members evaluated in place, one after another, and the update.

Each step is timed after one warm-up step; the figures are per member and as fractions.

    python -m zoptim.bench.population [--members 8] [--prompts 8] [--out population.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from zoptim.runs import config
from zoptim.runs.run import batch, build, step_loss


def _run(method: str, settings: str, args):
    overrides = ['task.name="countdown"', f"task.train={args.prompts}", "task.dev=1",
                 "task.test=1", f"task.max_new_tokens={args.max_new_tokens}",
                 f"batch_size={args.prompts}", f'model.name="{args.model}"',
                 "model.max_length=256", f'method.name="{method}"',
                 f"method.settings={{{settings}, members = {args.members}}}"]
    return build(config.load(None, overrides))


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernels, buffers, the allocator
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(args) -> dict:
    torch.manual_seed(0)
    egg = _run("eggroll", f"lr = 0.0, eps = 1e-3, rank = {args.rank}", args)
    examples = batch(egg, 0)
    clf, N, B = egg.clf, args.members, len(examples)
    ids = [clf.prompt_ids(e) for e in examples]

    def decode(slices: int):
        return lambda: clf.rewards(examples, B, slices=slices)

    rows = {"inference, one batch": _seconds(decode(1), args.repeats),
            "inference, stacked batch": _seconds(decode(N), args.repeats),
            "eggroll step": _seconds(lambda: egg.opt.step(step_loss(egg, examples)),
                                     args.repeats)}
    del egg, clf
    es = _run("es", "lr = 0.0, eps = 1e-3", args)
    rows["es step"] = _seconds(lambda: es.opt.step(step_loss(es, examples)), args.repeats)
    one = rows["inference, one batch"]
    return {"members": N, "prompts": B, "prompt_tokens": sum(map(len, ids)) / B,
            "max_new_tokens": args.max_new_tokens, "rank": args.rank, "seconds": rows,
            "per_member_over_one_batch": {k: rows[k] / N / one for k in ("eggroll step",
                                                                           "es step")},
            "fraction_of_batched_inference": {
                k: rows["inference, stacked batch"] / rows[k] for k in ("eggroll step",
                                                                         "es step")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if min(args.members, args.prompts, args.rank, args.max_new_tokens, args.repeats) < 1 or \
            args.members < 2:
        ap.error("members must be at least 2, and every count at least 1")
    got = measure(args)
    print(f"{args.model}: {got['members']} members x {got['prompts']} Countdown prompts "
          f"({got['prompt_tokens']:.0f} tokens), {got['max_new_tokens']} new tokens, "
          f"{torch.get_num_threads()} threads")
    for name, s in got["seconds"].items():
        print(f"  {name:26s} {s:8.2f} s")
    for name in ("eggroll step", "es step"):
        print(f"  {name}: {got['per_member_over_one_batch'][name]:.2f} x one batch's inference "
              f"per member; {got['fraction_of_batched_inference'][name]:.1%} of batched "
              "inference's throughput")
    if args.out:
        got["command"] = ["python", "-m", "zoptim.bench.population", *sys.argv[1:]]
        with open(args.out, "w") as f:
            json.dump(got, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
