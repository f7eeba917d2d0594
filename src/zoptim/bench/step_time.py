"""A time-to-target of one machine: each method's queries-to-target times its seconds a query,
with every method's training step timed on the machine that writes the benchmark's report.

A benchmark's cells may run on different machines, or be resumed on another, and then the
ratio of their wall-clock times to target mixes the machines' speeds. The steps timed here,
one method after another on the same first batch, put every method on one machine: a
method's ratio is its queries-to-target ratio against the baseline times its seconds a query
over the baseline's. Evaluation is left out (every cell evaluates on the same schedule).
"""

from __future__ import annotations

from zoptim.bench.figures import spread
from zoptim.bench.step_cost import median_seconds
from zoptim.runs import machine


def of_run(run, rounds: int = 5) -> dict:
    """The training step of a built run (``runs.run.build``) on its first batch: the median
    seconds of ``rounds`` steps after one untimed, the queries a step spends, their ratio, and
    the machine. The run's weights change."""
    from zoptim.runs.run import batch, step_loss

    loss = step_loss(run, batch(run, 0))
    opt = run.opt
    steps, queries = opt.steps, opt.queries
    seconds = median_seconds(lambda: opt.step(loss), rounds, warmup=1)
    per_step = (opt.queries - queries) / (opt.steps - steps)
    return {"seconds_per_step": seconds, "queries_per_step": per_step,
            "seconds_per_query": seconds / per_step, "rounds": rounds,
            "machine": machine.describe()}


def to_target(queries_to_target: dict, method: dict, baseline: dict) -> dict:
    """Per seed, a method's queries-to-target ratio (``{seed: ratio or None}``) times its
    seconds a query over the baseline's (``of_run``'s figures), and their spread."""
    cost = method["seconds_per_query"] / baseline["seconds_per_query"]
    per_seed = {seed: None if ratio is None else ratio * cost
                for seed, ratio in queries_to_target.items()}
    return {"per_seed": per_seed, **spread(list(per_seed.values()))}
