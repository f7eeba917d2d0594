"""``lr = "auto"``: a zeroth-order method's learning rates, calibrated on the model before the
first step.

What one step does to a held-out loss is ``-lr s + lr^2 c / 2``: ``s = g . d``, the descent
along the method's update direction ``d``, and ``c = d^T H d``, the curvature along it, what
the step's noise costs. The fidelity benchmark (``bench.fidelity``) measured both: on MiniLM
``s`` is smaller than its own spread from one draw to the next (the gradients of two batches of
16 are nearly orthogonal at the start), so resolving it takes hundreds of draws, more than a
calibration can spend; ``c`` is steady from draw to draw and, near enough, the same whatever
the rate it is measured at. So the calibration measures ``c`` and sets each rate from what the
run can afford to pay for its noise:

    lr = sqrt(2 (phi / K) L0 / (T m c))

the rate at which the curvature cost summed over the run's ``T`` steps, ``T m lr^2 c / 2``, is
``phi / K`` of the starting held-out loss ``L0``: ``K`` is the number of rates calibrated (ZO-Muon
has two: ``lr`` for its matrices, ``vector_lr`` for its dense part), each costed on the part it
steps; ``m`` is how many steps' worth a step's noise moves the weights over the run
(``ZOOptimizer.step_memory``: 1 for a plain step, ``(1 + beta) / (1 - beta)`` for momentum
before an orthogonalization). ``phi`` (``PHI``) was chosen on MiniLM's tuned grids (the
selection seed's); the decoder's are the check (``benchmarks/results/calibration``).

Each draw takes one step of a throwaway copy of the method on a training batch (``d``, from
``runs.directions``), then evaluates a held-out batch at ``theta - lr' d_k`` and ``theta + lr'
d_k`` for each part ``k``: ``L(-) + L(+) - 2 L0 = lr'^2 c_k``, the descent cancelled exactly.
The probe rate ``lr'`` aims at a small rise (``PROBE_RISE`` of ``L0``), where the loss still bends
as a quadratic; a rise far off its aim is probed again nearer or further. The held-out batch is
as large as a training batch, so every evaluation is one query, and all of them count in the
run's budget: draws go on while they cost at most 5% of the run's queries (4 at least, 16 at
most). Every value evaluated is kept (``Calibration.values``), so that the choice can be
recomputed from the record (``check``), as a journal lets a run be replayed.

Where the calibration is weak: far from a minimum the curvature along random steps is mixed
in sign (SmolLM2 at the start), and its mean needs the full 16 draws; a run of a few hundred
queries affords 4. On the decoder's 300-query proxy MeZO's 4 draws chose 7x its tuned rate and
its run ended under zero-shot (``benchmarks/results/calibration``): give a decoder's run of a
few hundred queries its rate. The rule needs a loss: reward tasks and metrics of generations
take given rates.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from zoptim.parts.settings import is_rate
from zoptim.noise import mix
from zoptim.runs.directions import group_rates, losses_along, update_direction

PHI = 0.06
BUDGET_SHARE = 0.05
MIN_DRAWS, MAX_DRAWS = 4, 16
# A probe aims at a rise of PROBE_RISE of L0 (both sides): far above float32's rounding, and
# near enough for the loss to bend as a quadratic (SmolLM2's flattens out past 1e-3 of L0
# along MeZO's steps, and its tuned rate agrees with the bend measured near). A rise more
# than RESOLVED times off its aim is probed again, nearer or further, at most RETRIES times.
PROBE_RISE = 2e-4
RESOLVED = 4.0
RETRIES = 3
_SALT = 0xCA11B  # separates the calibration's seeds from the run's


class CalibrationError(ValueError):
    pass


@dataclass
class Calibration:
    """What a calibration measured and chose. ``values`` holds, per draw, the step's own
    values, then per calibrated rate each probe's ``[rate, L(-), L(+)]``; ``heldout_loss`` is
    ``L0``; ``curvature[key]`` the draws' curvatures along the part that ``key`` steps."""
    settings: dict  # the calibrated rates, by setting (lr, vector_lr, ...)
    queries: int
    draws: int
    steps: int  # the run's steps T the rates were chosen for
    step_queries: int  # the queries one step of the method spends
    phi: float
    heldout_loss: float
    curvature: dict[str, list[float]]
    # per rate: how many steps' worth a step's noise costs over the run (momentum's repeats,
    # ``ZOOptimizer.step_memory``), by which its measured curvature is multiplied
    memory: dict[str, float] = field(default_factory=dict)
    # the method's own rates, kept by a part whose curvature came out not positive
    defaults: dict[str, float] = field(default_factory=dict)
    values: list[list] = field(default_factory=list)

    @property
    def kept(self) -> list[str]:
        """The rates left at the method's default: their parts showed no curvature."""
        return [k for k, c in self.curvature.items() if _mean(c, self.memory.get(k, 1.0)) is None]

    @property
    def share(self) -> float:
        """The calibration's part of the run's queries."""
        return self.queries / max(1, self.queries + self.steps * self.step_queries)

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict) -> "Calibration":
        return cls(**data)

    def uncertain(self, key: str) -> bool:
        """Whether the draws leave ``key``'s mean curvature uncertain: its standard error is
        more than half of it (draws of mixed sign, or too few). A rate from such a mean can
        be several times off (MeZO's on the decoder's 300-query proxy)."""
        c = [x for x in self.curvature[key] if math.isfinite(x)]
        if len(c) < 2 or key in self.kept:
            return False
        return statistics.stdev(c) / math.sqrt(len(c)) > statistics.fmean(c) / 2

    def line(self) -> str:
        def said(k: str, v: float) -> str:
            if k in self.kept:
                return f"{k} {v:.3g} (the method's default: no curvature seen)"
            if self.uncertain(k):
                return f"{k} {v:.3g} (uncertain: the draws disagree; a short run may do better " \
                       "with a rate of its own)"
            return f"{k} {v:.3g}"

        rates = ", ".join(said(k, v) for k, v in self.settings.items())
        return (f"lr auto: {rates} (from the curvature along {self.draws} draws of the "
                f"method's step; {self.queries} queries, {self.share:.1%} of the run's)")


def _mean(curvature: list[float], memory: float) -> float | None:
    """The finite draws' mean curvature times ``memory``, or ``None`` where it is not
    positive (or no draw's is finite)."""
    finite = [c for c in curvature if math.isfinite(c)]
    c = statistics.fmean(finite) * memory if finite else math.nan
    return c if math.isfinite(c) and c > 0 else None


def rates(curvature: dict[str, list[float]], memory: dict[str, float], heldout_loss: float,
          steps: int, phi: float, defaults: dict[str, float]) -> dict[str, float]:
    """Every calibrated rate, ``sqrt(2 (phi / K) L0 / (T m c))``: the noise budget ``phi``
    shared equally among the ``K`` rates, each part's curvature counted ``memory`` times. A
    part whose mean curvature is not positive (a loss that bends down or not at all along
    its steps, which says nothing of their cost) keeps the method's default rate."""
    out = {}
    for key, c in curvature.items():
        mean = _mean(c, memory.get(key, 1.0))
        out[key] = defaults[key] if mean is None else \
            math.sqrt(2.0 * phi / len(curvature) * heldout_loss / (max(1, steps) * mean))
    return out


def calibrated_keys(settings: dict, defaults: dict) -> list[str]:
    """The rate settings a calibration chooses: those set to ``"auto"``, and, where ``lr``
    is, every other rate of the method (``*_lr`` in its ``defaults``) that is not given."""
    auto = settings.get("lr") == "auto"
    keys = [k for k in defaults if is_rate(k)]
    return [k for k in keys if settings.get(k, "auto" if auto else None) == "auto"]


def _probe(loss, params, origin, d, lr: float, l0: float, aim: float, record: list) -> float:
    """The curvature along ``d`` from the held-out loss at ``theta -/+ lr d``, probed nearer
    or further until the rise ``L(-) + L(+) - 2 L0`` is within ``RESOLVED`` times ``aim``;
    each probe's values go to ``record``. A rise that is not finite (a probe far too long)
    is probed again ten times nearer; the last probe's curvature is returned, finite or not."""
    for attempt in range(RETRIES + 1):
        minus, plus = losses_along(loss, params, origin, d, [lr, -lr])
        record.append([lr, minus, plus])
        rise = minus + plus - 2.0 * l0
        if attempt == RETRIES or (math.isfinite(rise) and
                                  aim / RESOLVED <= abs(rise) <= aim * RESOLVED):
            return rise / lr**2
        # as far as a quadratic would put the aim, within a factor of ten
        lr *= min(10.0, max(0.1, math.sqrt(aim / max(abs(rise), 1e-30)))) \
            if math.isfinite(rise) else 0.1
    raise AssertionError("unreachable")


# Rates a draw's optimizer is built with, one per calibrated setting, so that each group's
# rate names the setting it comes from (the step itself is taken at rate 1 everywhere).
def _sentinels(keys: list[str]) -> dict[str, float]:
    return {key: 1.0 + i + 0.123456789 for i, key in enumerate(keys)}


def _parts(opt, params: list, sentinels: dict[str, float]) -> dict[str, list[int]]:
    """For each calibrated rate setting, the indices of ``params`` its groups step."""
    rates = group_rates(opt, params)
    return {key: [i for i, r in enumerate(rates) if r == value]
            for key, value in sentinels.items()}


def _memory(opt, sentinels: dict[str, float]) -> dict[str, float]:
    """Per calibrated rate, the step memory of its groups (the largest)."""
    return {key: max((opt.step_memory(g) for g in opt.param_groups if g["lr"] == value),
                     default=1.0) for key, value in sentinels.items()}


def calibrate(make: Callable[[int, dict], object], closure_of: Callable[[list], Callable],
              loss_of: Callable[[list], float], params: list, train: list, *, steps: int,
              batch_size: int, seed: int, keys: list[str] | None = None) -> Calibration:
    """Choose the rates of a run of ``steps`` steps (see the module's docstring).

    Args:
        make: ``make(seed, rates)`` builds a throwaway optimizer of the run's method over
            ``params``, with ``rates`` (settings) over the run's own.
        closure_of: the run's closure (the training loss) on a list of examples.
        loss_of: the mean loss of a list of examples, without gradients.
        params: the trained tensors, left exactly as they were found.
        train: the training examples; the held-out batch and the draws' batches come from it.
        steps: the run's steps ``T``.
        batch_size: examples in a batch (held-out and draws).
        seed: the run's seed; the calibration's draws derive from it.
        keys: the rate settings to calibrate (``calibrated_keys``; ``["lr"]`` when ``None``);
            one whose groups hold none of ``params`` steps nothing, and is left as it is.
    """
    heldout, pool = _split(train, batch_size, seed)
    origin = [p.detach().clone() for p in params]
    loss = lambda: loss_of(heldout)  # noqa: E731
    l0 = _start_loss(loss)
    keys = ["lr"] if keys is None else keys
    defaults = make(0, {}).defaults  # the first probe's guess: the method's own rates
    sentinels = _sentinels(keys)
    queries, values, budget, step_queries = 1, [], 0.0, 0
    curvature: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    k = 0
    # draws until BUDGET_SHARE of the run's queries is spent, within MIN_DRAWS..MAX_DRAWS
    while k < MIN_DRAWS or (k < MAX_DRAWS and queries + queries / k <= budget):
        opt = make(mix(seed, _SALT, k), sentinels)
        parts = _parts(opt, params, sentinels)
        if k == 0:
            curvature = _calibrated(keys, parts)
        examples = random.Random(f"calibration:{seed}:{k}").sample(pool, min(batch_size, len(pool)))
        d = _direction(opt, closure_of(examples), params, origin)
        probed, spent = _probe_rates(loss, params, origin, d, parts, curvature, defaults, l0)
        values.append([list(opt.last_values), *probed])
        queries += spent + opt.queries
        if k == 0:
            memory = _memory(opt, {key: sentinels[key] for key in curvature})
            step_queries = opt.queries
            budget = BUDGET_SHARE * steps * step_queries
        k += 1
    own = {key: float(defaults[key]) for key in curvature}
    return Calibration(settings=rates(curvature, memory, l0, steps, PHI, own), queries=queries,
                       draws=k, steps=steps, step_queries=step_queries, phi=PHI,
                       heldout_loss=l0, curvature=curvature, memory=memory, defaults=own,
                       values=values)


def _split(train: list, batch_size: int, seed: int) -> tuple[list, list]:
    """The held-out batch, and the examples the draws' batches come from (the rest)."""
    rng = random.Random(f"calibration:{seed}")
    heldout = rng.sample(train, min(batch_size, max(1, len(train) // 2)))
    inside = {id(e) for e in heldout}
    return heldout, [e for e in train if id(e) not in inside] or train


def _start_loss(loss: Callable[[], float]) -> float:
    """The held-out loss at the starting weights, which the rates are scaled to."""
    with torch.no_grad():
        l0 = float(loss())
    if not (math.isfinite(l0) and l0 > 0):
        raise CalibrationError(f"the held-out loss is {l0:.4g}: the calibration scales the rate "
                               "to a positive loss; give a learning rate (method.settings.lr)")
    return l0


def _calibrated(keys: list[str], parts: dict[str, list[int]]) -> dict[str, list[float]]:
    """An empty list of curvatures for each rate that steps a trained tensor."""
    curvature = {key: [] for key in keys if parts[key]}
    if not curvature:
        raise CalibrationError(f"no trained tensor is stepped at {', '.join(keys)}: "
                               "nothing to calibrate")
    return curvature


def _direction(opt, closure: Callable, params: list, origin: list) -> list[torch.Tensor]:
    """The method's update direction from one step, refused when it is not finite."""
    d = update_direction(opt, closure, params, origin)
    if not all(bool(torch.isfinite(t).all()) for t in d):
        raise CalibrationError("a step of the method is not finite on this model at its "
                               "default settings: give a learning rate and check eps")
    return d


def _probe_rates(loss, params: list, origin: list, d: list, parts: dict, curvature: dict,
                 defaults: dict, l0: float) -> tuple[list, int]:
    """Probe each calibrated rate's part of the direction ``d``, appending its curvature to
    ``curvature``; returns each rate's probes and the queries they spent."""
    aim, record, queries = PROBE_RISE * l0, [], 0
    for key, so_far in curvature.items():
        idx = parts[key]
        # probe where the draws so far put the aimed rise (the method's own default rate first)
        c = _mean(so_far, 1.0)
        at = defaults[key] if c is None else math.sqrt(aim / c)
        probes: list = []
        so_far.append(_probe(loss, [params[i] for i in idx], [origin[i] for i in idx],
                             [d[i] for i in idx], at, l0, aim, probes))
        record.append(probes)
        queries += 2 * len(probes)
    return record, queries


def check(cal: Calibration) -> str | None:
    """Whether a recorded calibration's choice follows from its recorded values: ``None``, or
    what differs."""
    if cal.draws != len(cal.values):
        return f"it records {len(cal.values)} draws, not {cal.draws}"
    probes = sum(len(p) for record in cal.values for p in record[1:])
    if cal.queries != 1 + cal.draws * cal.step_queries + 2 * probes:
        return "its queries do not follow from its draws and probes"
    curvature = {key: [] for key in cal.curvature}
    for record in cal.values:
        for key, probed in zip(curvature, record[1:]):
            lr, minus, plus = probed[-1]
            curvature[key].append((minus + plus - 2.0 * cal.heldout_loss) / lr**2)
    # repr: exact for floats, and a NaN (a probe that never came out finite) equals its own
    if repr(curvature) != repr(cal.curvature):
        return "its curvatures do not follow from its recorded losses"
    if rates(curvature, cal.memory, cal.heldout_loss, cal.steps, cal.phi,
             cal.defaults) != cal.settings:
        return "its rates do not follow from its curvatures"
    return None
