"""How long a generation task's evaluation takes: greedy decoding of SQuAD-length prompts with
a decoder, batched with the KV cache (as ``CompletionObjective.score`` runs it) against the
same decoding without the cache, side by side in one run.

The prompts are built from the movie-review snippets, joined into passages of about the
length of a SQuAD context (``--words``, 120 by default), each followed by a question; the
answers do not matter to the timing. ``--examples`` is the size of the dev set to time (the
uncached decoding runs on a part of it, ``--uncached``, and is scaled up).

    python -m zoptim.bench.generation [--model smollm2-135m] [--examples 500] [--out gen.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from zoptim.integrations.completions import CompletionObjective
from zoptim.integrations.models import load_model
from zoptim.tasks.data import load_mr
from zoptim.tasks.kinds import Completion


def passages(snippets: list[str], count: int, words: int, seed: int = 0) -> list[Completion]:
    """``count`` SQuAD-like prompts of about ``words`` words of context each."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        text: list[str] = []
        while len(text) < words:
            text += rng.choice(snippets).split()
        out.append(Completion(f"Title: Review {i}\nContext: {' '.join(text[:words])}\n"
                              "Question: What is the review about?\nAnswer:", " a film",
                              ("a film",)))
    return out


def timed(objective: CompletionObjective, examples: list[Completion], batch_size: int,
          use_cache: bool) -> float:
    start = time.perf_counter()
    objective.generate(examples, batch_size, use_cache=use_cache)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task-path", default=None, help="the movie-review snippets file")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--uncached", type=int, default=32, help="examples decoded without cache")
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model, tokenizer, decoder = load_model(args.model)
    if not decoder:
        print(f"{args.model} is not a decoder", file=sys.stderr)
        return 2
    pool, _ = load_mr(args.task_path)
    examples = passages([e.text for e in pool], args.examples, args.words)
    objective = CompletionObjective(model, tokenizer, max_length=512,
                                    max_new_tokens=args.max_new_tokens)
    tokens = sum(len(objective.context_ids(e)) for e in examples) / len(examples)
    cached = timed(objective, examples, args.batch_size, use_cache=True)
    part = examples[:args.uncached]
    uncached = timed(objective, part, args.batch_size, use_cache=False) * len(examples) / \
        len(part)
    record = {"model": args.model, "examples": len(examples), "prompt_tokens_mean": tokens,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "cached_s": round(cached, 1),
              "uncached_s_scaled": round(uncached, 1),
              "cache_speedup": round(uncached / cached, 2)}
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
