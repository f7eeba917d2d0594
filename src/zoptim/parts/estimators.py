"""How forward evaluations become directional derivatives.

An estimator names the points it needs, each ``None`` (the current parameters) or
``(seed, scale)`` (every parameter moved by ``scale * eps * z(seed)``), and the probe evaluates
them (``probe.evaluate_points``, one query each) through the optimizer's evaluator
(``zoptim.engine.evaluators``: in place, batched, offloaded, distributed). ``probe.directional`` gives
a forward-mode derivative instead. It returns:

- the loss to report,
- one :class:`Direction` per query direction: its seed and ``diff``, the estimated directional
  derivative of the loss along the shift ``eps * z`` (so the gradient estimate of a tensor is
  ``diff / eps * z``, each parameter group dividing by its own eps),
- the shifts still applied, which the update undoes (fused with it where it can).

For the difference estimators here ``E[diff / eps * z] = grad f`` on a quadratic with
``E[z z^T] = I``. The normalized and ordinal ones (FZOO's ``StdNormalized``, evolution
strategies' ``Population``, ``Ranking``, ``Comparison``) declare ``unit_free``: their ``diff``
is a unit-free score the optimizer does not divide by ``eps``, so ``lr`` is the step's length
along the direction they point to. GRZO's ``GroupRelative`` normalizes its per-example
differences too, but divides by ``eps`` as its paper does.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoptim.parts import settings
from zoptim.noise import mix


@dataclass(frozen=True)
class Direction:
    seed: int
    diff: float
    curv: float = 0.0  # (f(+) + f(-) - 2 f(0)) / 2, where the estimator measures it


Point = tuple[int, float] | None
Pending = list[tuple[int, float]]


class Probe(Protocol):
    def evaluate_points(self, points: list[Point]) -> tuple[list[float], Pending]: ...


def _count(directions: int) -> int:
    settings.check("directions", directions)
    return directions


def _seeds(step_seed: int, n: int) -> list[int]:
    return [mix(step_seed, i) for i in range(n)]


class Central:
    """Two-point central difference per direction: ``(f(x + eps z) - f(x - eps z)) / 2``,
    ``directions`` directions averaged (MeZO; n-SPSA for ``directions > 1``). Two queries
    each."""

    forward_mode = False

    def __init__(self, directions: int = 1):
        self.directions = _count(directions)

    def __call__(self, probe: Probe, step_seed: int):
        seeds = _seeds(step_seed, self.directions)
        values, pending = probe.evaluate_points([pt for s in seeds for pt in ((s, 1.0), (s, -1.0))])
        pairs = list(zip(values[0::2], values[1::2]))
        dirs = [Direction(s, (plus - minus) / 2) for s, (plus, minus) in zip(seeds, pairs)]
        return sum((plus + minus) / 2 for plus, minus in pairs) / len(pairs), dirs, pending


class OneSided:
    """One-sided differences against one baseline: ``f(x + eps z_i) - f(x)`` for
    ``directions`` directions, ``directions + 1`` evaluations (ZO-Muon's multi-query
    estimator). (Not forward-mode: that is ``JVP``.)"""

    forward_mode = False

    def __init__(self, directions: int = 4):
        self.directions = _count(directions)

    def __call__(self, probe: Probe, step_seed: int):
        seeds = _seeds(step_seed, self.directions)
        (base, *values), pending = probe.evaluate_points([None] + [(s, 1.0) for s in seeds])
        return base, [Direction(s, v - base) for s, v in zip(seeds, values)], pending




class StdNormalized(OneSided):
    """FZOO's estimator (Dang et al., 2025, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning
    Large Language Models towards Adam-Scale Speed", arXiv 2506.09034): one-sided differences
    ``f(x + eps z_i) - f(x)`` against one baseline for ``directions`` directions, each divided
    by the standard deviation of the ``directions`` perturbed losses (the population's, as the
    authors' code computes it; the baseline not among them): a normalized step whose length
    does not change when the loss is scaled. ``directions + 1`` evaluations. Where the
    perturbed losses are all equal their spread says nothing, and every ``diff`` is 0 (the
    authors' code divides by zero there)."""

    forward_mode = False
    unit_free = True  # the optimizer does not divide these diffs by eps

    def __init__(self, directions: int = 8):
        super().__init__(directions)
        if self.directions < 2:
            raise ValueError(f"directions={directions!r} is invalid: a spread needs at least 2")

    def __call__(self, probe: Probe, step_seed: int):
        base, dirs, pending = super().__call__(probe, step_seed)
        # the differences' spread is the perturbed losses' (the baseline shifts them all)
        spread = statistics.pstdev([d.diff for d in dirs])
        return base, [Direction(d.seed, d.diff / spread if spread > 0 else 0.0)
                      for d in dirs], pending


class GroupRelative:
    """GRZO's estimator (Tan et al., 2026, "GRZO: Group-Relative Zeroth-Order Optimization for
    Large Language Model Fine-Tuning", arXiv 2606.02857): one direction per example of the
    batch, ``z_b`` perturbing example ``b`` alone, evaluated in two passes of the batch (every
    example at its ``+eps z_b``, then at its ``-eps z_b``: ``probe.evaluate_rows``, which
    needs batched queries). Each example's difference ``delta_b = f_b(x + eps z_b) -
    f_b(x - eps z_b)`` is divided by the spread of the batch's differences, ``a_b = delta_b /
    (std(delta) + 1e-8)`` (population std, no centring), and the estimate is
    ``sum_b a_b z_b / (2 eps B)``: ``diff_b = a_b / 2``, so ``lr`` is the paper's ``eta``.
    With ``normalize=False`` it is the plain per-example central difference, ``diff_b =
    delta_b / 2``, an unbiased estimate of the batch's mean loss's gradient.

    ``examples`` directions, two queries a step. Where the differences do not spread at all
    (a loss the step does not move, or a batch of identical examples) every ``diff`` is 0,
    where the paper's division would give ``delta / 1e-8``. Normalized, but not declared
    ``unit_free``: the estimate is divided by ``eps``, as the paper's is."""

    forward_mode = False

    def __init__(self, examples: int, normalize: bool = True):
        if not isinstance(examples, int) or examples < 2:
            raise ValueError(f"examples={examples!r} is invalid: a group needs at least 2 "
                             "examples (the batch size)")
        self.examples, self.normalize = examples, normalize

    def __call__(self, probe: Probe, step_seed: int):
        seeds = _seeds(step_seed, self.examples)
        plus, _ = probe.evaluate_rows([(s, 1.0) for s in seeds])
        minus, pending = probe.evaluate_rows([(s, -1.0) for s in seeds])
        scores = [p - m for p, m in zip(plus, minus)]
        if self.normalize:
            spread = statistics.pstdev(scores)
            scores = [d / (spread + 1e-8) if spread > 0 else 0.0 for d in scores]
        loss = sum(plus + minus) / (2 * len(seeds))
        return loss, [Direction(s, a / 2) for s, a in zip(seeds, scores)], pending


class Population:
    """Evolution strategies' estimator, as "Evolution Strategies at Scale: LLM Fine-Tuning
    Beyond Reinforcement Learning" (Qiu et al., 2025, arXiv 2509.24372) runs it: ``members``
    points ``x + eps z_n``, no baseline, and each member's value normalized across the
    population, ``(f_n - mean f) / (std f + 1e-8)`` (the population's std), as its ``diff``.
    The optimizer averages ``diff_n z_n`` over the members, with no division by ``eps``.

    Options the paper leaves off: ``antithetic`` evaluates ``members / 2`` directions at
    ``+z`` and ``-z`` (mirrored sampling, an even ``members``); ``rank_transform`` replaces the
    values by their centred ranks in ``[-0.5, 0.5]`` before the normalization (Salimans et
    al., 2017), which keeps one outlier from deciding the step; ``per_prompt`` normalizes each
    example's values across the members first, GRPO's group normalization with the members as
    the group (``per_example_scores``), and a member's value is the mean of its examples'
    scores (the closure then returns per-example values, ``ZOOptimizer``'s
    ``per_example=True``). Values are losses: a reward is maximized by running on
    ``-reward``."""

    forward_mode = False
    unit_free = True

    def __init__(self, members: int = 30, antithetic: bool = False,
                 rank_transform: bool = False, per_prompt: bool = False):
        settings.check("members", members)
        if antithetic and members % 2:
            raise ValueError(f"members={members} is invalid: antithetic pairs need an even "
                             "population")
        self.members, self.antithetic, self.rank_transform = members, antithetic, rank_transform
        self.per_prompt = per_prompt

    def _evaluate(self, probe: Probe, points: list[Point]):
        """The members' values (their batches' mean losses), fitness and pending shifts."""
        if not self.per_prompt:
            values, pending = probe.evaluate_points(points)
            return values, values, pending
        table, pending = probe.evaluate_examples(points)
        return [sum(row) / len(row) for row in table], per_example_scores(table), pending

    def __call__(self, probe: Probe, step_seed: int):
        if self.antithetic:
            seeds = _seeds(step_seed, self.members // 2)
            points = [pt for s in seeds for pt in ((s, 1.0), (s, -1.0))]
        else:
            seeds = _seeds(step_seed, self.members)
            points = [(s, 1.0) for s in seeds]
        values, fitness, pending = self._evaluate(probe, points)
        scores = normalized(centred_ranks(fitness) if self.rank_transform else fitness)
        if self.antithetic:  # the pair's two members, on one direction: the mean over members
            dirs = [Direction(s, (scores[2 * i] - scores[2 * i + 1]) / 2)
                    for i, s in enumerate(seeds)]
        else:
            dirs = [Direction(s, z) for s, z in zip(seeds, scores)]
        return sum(values) / len(values), dirs, pending


def per_example_scores(table: list[list[float]]) -> list[float]:
    """Each member's mean over examples of its value normalized across the members,
    ``mean_b (f_nb - mean_n f_nb) / (std_n f_nb + 1e-8)`` (population std): an example every
    member scores alike counts for nothing, one they split on counts fully, whatever its
    scale (GRPO's per-prompt normalization, Shao et al., 2024)."""
    f = torch.tensor(table, dtype=torch.float64)  # (members, examples)
    z = (f - f.mean(0)) / (f.std(0, unbiased=False) + 1e-8)
    return z.mean(1).tolist()


def centred_ranks(values: list[float]) -> list[float]:
    """Each value's rank (0: the lowest) scaled to ``[-0.5, 0.5]``; tied values share their
    average rank, so equal values never decide a step (discrete rewards tie often)."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in order[start:end + 1]:
            ranks[k] = (start + end) / 2 / (len(values) - 1) - 0.5
        start = end + 1
    return ranks


def normalized(values: list[float]) -> list[float]:
    """``(v - mean) / (std + 1e-8)`` with the population's std (the ES paper's z-score)."""
    mean = sum(values) / len(values)
    spread = statistics.pstdev(values)
    return [(v - mean) / (spread + 1e-8) for v in values]


class Ranking:
    """ZO-RankSGD's estimator (Tang et al., 2024, "Zeroth-Order Optimization Meets Human
    Feedback: Provable Learning via Ranking Oracles", ICLR): ``m`` candidates ``x + eps z_i``,
    of which only the order matters. Over every ordered pair (better ``i``, worse ``j``) it
    averages ``z_j - z_i``, which for a full ranking gives ``z_k`` the weight
    ``(2 r_k - m + 1) / (m (m - 1) / 2)``, ``r_k`` the candidate's place (0: best). The values
    may be the objective's or the places themselves; ties keep the candidates' order.
    ``diff`` carries ``m`` times that weight (the optimizer averages over directions)."""

    forward_mode = False
    unit_free = True  # the scale comes from the ranks, not from eps

    def __init__(self, candidates: int = 4):
        self.candidates = candidates

    def __call__(self, probe: Probe, step_seed: int):
        seeds = _seeds(step_seed, self.candidates)
        values, pending = probe.evaluate_points([(s, 1.0) for s in seeds])
        m = len(seeds)
        order = sorted(range(m), key=lambda k: values[k])
        place = {k: r for r, k in enumerate(order)}
        pairs = m * (m - 1) / 2
        dirs = [Direction(s, m * (2 * place[k] - m + 1) / pairs) for k, s in enumerate(seeds)]
        return min(values), dirs, pending


class Comparison:
    """A comparison oracle's estimator: for each of ``pairs`` directions the oracle only says
    which of ``x + eps z`` and ``x - eps z`` is better, and the estimate averages
    ``sign(f(x + eps z) - f(x - eps z)) z`` (the one-bit estimator of Cai et al., 2022, "A
    One-bit, Comparison-Based Gradient Estimator", ACHA). ``diff`` carries the sign."""

    forward_mode = False
    unit_free = True

    def __init__(self, pairs: int = 1):
        self.pairs = pairs

    def __call__(self, probe: Probe, step_seed: int):
        seeds = _seeds(step_seed, self.pairs)
        values, pending = probe.evaluate_points([pt for s in seeds for pt in ((s, 1.0), (s, -1.0))])
        pairs = list(zip(values[0::2], values[1::2]))
        sign = [(plus > minus) - (plus < minus) for plus, minus in pairs]
        return min(values), [Direction(s, float(c)) for s, c in zip(seeds, sign)], pending


class ThreePoint:
    """Baseline plus central difference, ``f(x)``, ``f(x + eps z)``, ``f(x - eps z)``: the
    directional derivative and the curvature along ``z`` (HiZOO; conservative ZO-SGD)."""

    forward_mode = False

    def __call__(self, probe: Probe, step_seed: int):
        (seed,) = _seeds(step_seed, 1)
        (base, plus, minus), pending = probe.evaluate_points([None, (seed, 1.0), (seed, -1.0)])
        return base, [Direction(seed, (plus - minus) / 2, (plus + minus - 2 * base) / 2)], pending


class _ClosureModule(torch.nn.Module):
    """Runs a closure as a module's forward, so ``functional_call`` can substitute the
    parameters of the model the closure uses."""

    def __init__(self, model: torch.nn.Module, closure):
        super().__init__()
        self.model = model
        # Kept out of the module tree: a closure that is itself a module (the model, say)
        # must not be registered, or functional_call would treat its weights as tied copies.
        self._closure = (closure,)

    def forward(self):
        return self._closure[0]()


def directional_derivative(model: torch.nn.Module, closure, params, tangents):
    """``(f, grad f . v)`` in one forward-mode pass (``torch.func.jvp``), where ``f`` is the
    closure's loss as a function of ``params`` (parameters of ``model``) and ``v`` the tangents."""
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError("forward gradient: every optimized parameter must belong to `model`")
    wrapper = _ClosureModule(model, closure)
    keys = [names[id(p)] for p in params]

    def f(*tensors):
        return functional_call(wrapper, dict(zip(keys, tensors)), (), strict=False)

    # Fused attention kernels have no forward-mode derivative; the math kernel does.
    with sdpa_kernel(SDPBackend.MATH):
        loss, d = jvp(f, tuple(p.detach() for p in params), tuple(tangents))
    return float(loss), float(d)


class JVP:
    """Forward gradient (Baydin et al., 2022): the exact directional derivative ``grad f . z``
    by forward-mode differentiation, one pass per direction, no finite difference. The
    tangents are materialized, so it needs one extra copy of the optimized parameters."""

    forward_mode = True  # declared: it names no points, so it cannot be asked/told

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, probe, step_seed: int):
        (seed,) = _seeds(step_seed, 1)
        loss, d = probe.directional(
            seed, lambda params, tangents: directional_derivative(self.model, probe.closure,
                                                                  params, tangents))
        return loss, [Direction(seed, d)], []
