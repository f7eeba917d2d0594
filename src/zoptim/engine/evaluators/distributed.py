"""Zeroth-order training on several processes (``torchrun``): perturbation parallelism, data
parallelism, and both at once, on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

The world is a grid of ``perturbation x data`` ranks; rank ``r`` has perturbation rank
``r % perturbation`` and data rank ``r // perturbation`` (as in DistZO2, Wang et al., 2025).

- **Perturbation parallelism**: a step's points (its queries, each sign of a two-point
  difference) are dealt out: point ``i`` is evaluated by perturbation rank ``i % perturbation``.
- **Data parallelism**: every data rank evaluates every point on its own micro-batch (the
  closure reads ``shard`` of the batch); the values are averaged over data ranks.

One all-reduce of one float64 per point per step is all that crosses the network, whatever the
model's size. No parameter or gradient is ever exchanged after the first broadcast: every rank
applies the same writes in the same order (in place, each rank walks through every point and
runs the model only at its own; batched, it runs its own slices and writes nothing), from the
same reduced values, so replicas stay bit-identical, and equal to a one-process run with the
same seeds.

    torch.distributed.init_process_group("gloo")   # torchrun sets the rank and world size
    opt = zoptim.MeZO(model.parameters(), lr=1e-6, queries=2, seed=0)
    par = Parallel(data=2).attach(opt)             # perturbation = world / data
    opt.step(lambda: loss(model, par.shard(batch)))
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from zoptim.engine.evaluators import Evaluator


class Parallel:
    """How a step's evaluations are shared among the ranks of a process group."""

    def __init__(self, perturbation: int | None = None, data: int = 1, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("zoptim.engine.evaluators.distributed needs torch.distributed initialized "
                               "first (init_process_group; torchrun sets the rank and world "
                               "size)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if perturbation is None:
            perturbation = self.world // data if data >= 1 and self.world % data == 0 else 0
        if not (perturbation >= 1 and data >= 1 and perturbation * data == self.world):
            raise ValueError(f"perturbation x data parallelism ({perturbation} x {data}) must "
                             f"equal the world size ({self.world})")
        self.perturbation, self.data = perturbation, data
        self.perturbation_rank = self.rank % perturbation
        self.data_rank = self.rank // perturbation
        # NCCL reduces on the GPU; gloo on the CPU.
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.bytes_reduced = 0  # payload of every all-reduce so far
        self.reductions = 0

    def attach(self, optimizer) -> "Parallel":
        """Make ``optimizer`` evaluate its steps across the ranks (returns ``self``).
        Broadcasts rank 0's parameters and seed once, so every replica starts the same."""
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                dist.broadcast(p.data, src=src, group=self.group)
        seed = torch.tensor([optimizer.seed], dtype=torch.int64, device=self.device)
        dist.broadcast(seed, src=src, group=self.group)
        optimizer.seed = int(seed.item())
        optimizer.use(parallel=self)
        return self

    def owns(self, point: int) -> bool:
        """Whether this rank evaluates point ``point`` of a step."""
        return point % self.perturbation == self.perturbation_rank

    def shard(self, batch: Sequence):
        """This rank's micro-batch of ``batch``: every ``data``-th item from its data rank."""
        return batch[self.data_rank::self.data]

    def combine(self, values: list[float | None], everyone: bool = False) -> list[float]:
        """The step's values on every rank, from each rank's own (``None`` where another rank
        evaluates): one all-reduce. ``everyone``: every rank computed every value (on its
        micro-batch), and only perturbation rank 0's count."""
        mine = [v if v is not None and (not everyone or self.perturbation_rank == 0) else 0.0
                for v in values]
        buf = torch.tensor(mine, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=self.group)
        self.bytes_reduced += buf.numel() * buf.element_size()
        self.reductions += 1
        return (buf / self.data).tolist()


class Distributed(Evaluator):
    """Wraps an in-place or batched evaluator: each process evaluates the points it owns
    (``Parallel.owns``) and one all-reduce gives every process every value. In place, every
    process still walks through every point, so replicas apply the same writes."""

    def __init__(self, inner: Evaluator, parallel: Parallel):
        self.inner, self.parallel = inner, parallel
        self.name = f"{inner.name}, distributed"
        self.hold_all = inner.hold_all

    def partition(self, p):
        return self.inner.partition(p)

    def placement(self, p):
        return self.inner.placement(p)

    def check(self, plan):
        return self.inner.check(plan)

    def begin(self, plan, step, seed, undo):
        self.inner.begin(plan, step, seed, undo)

    def evaluate(self, plan, points, closure, wanted):
        mine = [w and self.parallel.owns(i) for i, w in enumerate(wanted)]
        ev = self.inner.evaluate(plan, points, closure, mine)
        ev.values = self.parallel.combine(ev.values)
        return ev

    def finish(self, plan, apply):
        self.inner.finish(plan, apply)

    def replaying(self):
        return self.inner.replaying()  # recorded values are every process's already

    def skipping(self):
        # Processes cannot rewind through a journal only the lead writes: a skipped step
        # walks as it did live.
        return self.inner.replaying()

    def reduce(self, values, everyone=False):
        return self.parallel.combine(values, everyone=everyone)
