"""Memory of a training step against inference, side by side in one run.

For each setup it reports what a step holds: the parameters, the optimizer's persistent state
(and gradients for first-order training), and the peak of the step's own transient allocations
(activations, noise, temporaries), read from ``torch.profiler``'s allocator events.
Inference is one forward pass under ``no_grad``. First-order baselines are full fine-tuning
with AdamW and LoRA with AdamW (backpropagation).

    python -m zoptim.bench.memory [--out memory.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import zoptim

from zoptim.bench.step_cost import load_minilm, make_loss


def transient_peak(fn) -> int:
    """Peak bytes allocated during ``fn`` above what was live when it started."""
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA]
                                                     if torch.cuda.is_available() else [])],
                 profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def zeroth_order(model, loss, method: str, **settings) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = zoptim.METHODS[method](params, seed=0, **settings)
    opt.step(loss)  # warm up: state allocated, kernels compiled
    peak = transient_peak(lambda: opt.step(loss))
    return {"params": _bytes(model.parameters()), "state": _state_bytes(opt), "transient": peak}


def first_order(model, loss, lr: float = 1e-5) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss().backward()
        opt.step()

    step()
    peak = transient_peak(step)
    grads = _bytes(p.grad for p in params if p.grad is not None)
    return {"params": _bytes(model.parameters()), "state": _state_bytes(opt) + grads,
            "transient": peak}


def inference(model, loss) -> dict:
    with torch.no_grad():
        loss()
        peak = transient_peak(loss)
    return {"params": _bytes(model.parameters()), "state": 0, "transient": peak}


def of_run(run, examples: list, update: bool = True) -> dict:
    """What a built run (``runs.run.build``) holds for one step on ``examples``: its objective's
    parameters, the optimizer's persistent state and the step's transient peak (after one
    warm-up step); without ``update``, one evaluation of the loss under ``no_grad`` (a row that
    makes no update: zero-shot, in-context learning). The run's weights change."""
    from zoptim.runs.run import step_loss

    loss = step_loss(run, examples)
    if update:
        run.opt.step(loss)
        row = {"state": _state_bytes(run.opt), "transient": transient_peak(
            lambda: run.opt.step(loss))}
    else:
        with torch.no_grad():
            row = {"state": 0, "transient": transient_peak(loss)}
    row["params"] = _bytes(run.clf.parameters())
    row["total"] = row["params"] + row["state"] + row["transient"]
    return row


def with_lora(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear"))


def measure(model_factory, batch: int = 16, tokens: int = 48) -> list[dict]:
    rows = []

    def add(name, fn, lora=False):
        torch.manual_seed(0)
        model = model_factory().eval()
        if lora:
            model = with_lora(model)
        row = fn(model, make_loss(model, batch, tokens))
        row["name"] = name
        row["total"] = row["params"] + row["state"] + row["transient"]
        rows.append(row)

    add("inference (forward, no_grad)", inference)
    add("MeZO (full)", lambda m, f: zeroth_order(m, f, "mezo", lr=1e-7))
    add("ZO-Muon (full, rank 32)", lambda m, f: zeroth_order(m, f, "zo-muon", lr=1e-4, rank=32))
    add("MeZO (LoRA)", lambda m, f: zeroth_order(m, f, "mezo", lr=1e-5), lora=True)
    add("AdamW, backprop (full)", first_order)
    add("AdamW, backprop (LoRA)", first_order, lora=True)
    base = rows[0]["total"]
    for row in rows:
        row["vs_inference"] = row["total"] / base
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    rows = measure(load_minilm, args.batch, args.tokens)
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.tokens} tokens, fp32 (MiB)\n")
    print(f"{'setup':32s}{'params':>9s}{'state':>9s}{'step peak':>11s}{'total':>9s}"
          f"{'/ inference':>13s}")
    mib = 1 << 20
    for r in rows:
        print(f"{r['name']:32s}{r['params'] / mib:9.1f}{r['state'] / mib:9.1f}"
              f"{r['transient'] / mib:11.1f}{r['total'] / mib:9.1f}{r['vs_inference']:13.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "tokens": args.tokens, "rows": rows,
                       "command": ["python", "-m", "zoptim.bench.memory", *sys.argv[1:]]}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def grpo_step(run, examples: list) -> dict:
    """What a GRPO step holds, measured as ``bench.memory`` measures every row: the
    parameters, AdamW's state and the gradients, and the transient peak of one backward
    through the policy on one micro-batch of the step's ``len(examples) * generations``
    sequences of prompt plus ``max_new_tokens`` completion tokens (sampling, under
    ``no_grad``, holds less). The run's weights change."""
    clf, method = run.clf, run.opt
    new = run.cfg.task.max_new_tokens
    prompts = [clf.prompt_ids(e) for e in examples for _ in range(method.generations)]
    prompts = prompts[:method.micro_batch(len(examples))]  # one micro-batch's backward
    width = max(len(p) for p in prompts) + new
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(prompts), width), clf.tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left-padded as TRL pads, a sampled-like completion
        ids[row, width - new - len(p):width - new] = torch.tensor(p)
        ids[row, width - new:] = torch.randint(0, len(clf.tokenizer), (new,), generator=g)
        mask[row, width - new - len(p):] = 1
    model = clf.backbone.train()

    def loss():  # the completion's log-probabilities, as TRL computes them
        logits = model(input_ids=ids, attention_mask=mask,
                       logits_to_keep=new + 1).logits[:, :-1]
        return -logits.log_softmax(-1).gather(-1, ids[:, -new:, None]).mean()

    row = first_order(model, loss, lr=method.lr)
    row["total"] = row["params"] + row["state"] + row["transient"]
    return row
