"""Greedy decoding of tokenized prompts, batched with the KV cache: what a generation task's
evaluation, a metric as the objective and a reward's rollouts share.

Prompts are sorted by length and decoded in batches padded on the left. Under batched
queries (``slices > 1``) each batch is stacked once per slice (``engine.evaluators.batched.stack``)
and decoded in one pass, every slice's rows through its own perturbation.
"""

from __future__ import annotations

import torch

from zoptim.engine.evaluators.batched import each_row, stack
from zoptim.integrations.sequences import left_padded


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
           batch_size: int = 16, *, use_cache: bool = True,
           slices: int = 1) -> list[tuple[str, bool]]:
    """The greedy continuations of ``prompts`` as text (special tokens skipped), each with
    whether it ended with the end-of-sequence token before ``max_new_tokens``: in the
    prompts' order, slice after slice. ``use_cache=False`` recomputes every position at every
    token (what the cache saves)."""
    from transformers import GenerationConfig

    if each_row():  # greedy batches prompts in its own order, not one row a point
        raise ValueError("per-example directions (GRZO) give each example its own point, which "
                         "greedy decoding cannot keep apart: a metric of generations or a "
                         "reward cannot be their objective; train on the loss")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, use_cache=use_cache)
    device = next(model.parameters()).device
    n = len(prompts)
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    out: list[tuple[str, bool]] = [("", False)] * (n * slices)
    for start in range(0, n, batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_padded([prompts[i] for i in chunk], tokenizer.pad_token_id)
        new = model.generate(input_ids=stack(ids.to(device), slices),
                             attention_mask=stack(mask.to(device), slices),
                             generation_config=config)[:, ids.shape[1]:]
        for row, (s, i) in enumerate((s, i) for s in range(slices) for i in chunk):
            ended = bool((new[row] == tokenizer.eos_token_id).any())
            out[s * n + i] = (tokenizer.decode(new[row], skip_special_tokens=True), ended)
    return out
