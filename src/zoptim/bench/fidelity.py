"""Estimator fidelity: does a method's step go downhill on this model, and how far should it go?

At a checkpoint (the starting model, and points along a run), for each method and each of
``draws`` independent draws of its step on one training batch, this measures:

- the cosine between the step's update direction ``d`` (what the step subtracts, per unit of
  the learning rate) and the backpropagated gradient of the same batch, and of a held-out
  batch (training examples outside it), over the whole model and per kind of tensor
  (embeddings, attention, MLP, norms and biases, output head); mean and spread over draws,
  and the cosine of the draws' mean direction (what is left of the signal once the noise
  averages out over steps);
- the held-out loss change of one step, ``L_H(theta - lr d) - L_H(theta)``, on a grid of
  learning rates (each method's reference rate times ``lr_factors``), over the first
  ``curve_draws`` draws: the rate with the most descent per query can be read off;
- the size of ``d`` against the weights, per kind, at that rate.

Backpropagation is the measuring stick only. It needs the gradients of two batches, a copy of
the weights and one direction beside the model (about five times the weights' memory, plus a
backward pass's activations), which on this project's CPU machines covers models up to a few
hundred million parameters (SmolLM2-135M measured here).

A configuration (TOML or YAML) holds what ``zoptim bench`` takes for a matrix (``[base]``, the
run settings; ``[[methods]]``, each with its ``settings`` and a reference ``lr``) and
``kind = "fidelity"``::

    kind = "fidelity"
    draws = 64            # direction draws per method and point (cosines)
    curve_draws = 16      # of which the held-out loss is measured along the lr grid
                          # (a method may set its own draws: ES's step is 30 queries)
    heldout = 64          # held-out training examples
    lr_factors = [0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0]
    [along]               # optional: points along a run of this method
    name = "mezo"
    settings = { lr = 3e-5, eps = 1e-3 }
    steps = [100, 300]    # measured at these steps as well as at the start

Run it as ``zoptim bench --config F --out D`` or ``python -m zoptim.bench.fidelity --config F
--out D``; it writes ``fidelity.json`` and ``fidelity.png``. A point already measured (its
entry in ``fidelity.json`` has every method) is not measured again.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zoptim.bench import command
from zoptim.bench.folder import Claimed
from zoptim.noise import mix
from zoptim.runs import config as run_config
from zoptim.runs.checkpoints import write_json
from zoptim.runs.directions import group_rates, losses_along, update_direction
from zoptim.runs.run import Run, batch, build, open_run, step_loss, train

KINDS = ("embeddings", "attention", "mlp", "norms and biases", "head", "other")
ALL = "all"
LR_FACTORS = (0.01, 10 ** -1.5, 0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0)
_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "intermediate", "output.dense", "ffn", "fc1", "fc2", "dense_h_to_4h",
        "dense_4h_to_h")
_HEAD = ("head.", "lm_head", "classifier", "score.")


def tensor_kind(name: str, p: torch.Tensor) -> str:
    """The kind of a parameter, by its name and shape: vectors are norms and biases; matrices
    are embeddings, attention, MLP, the output head, or other."""
    if p.dim() < 2:
        return "norms and biases"
    if "embed" in name:
        return "embeddings"
    if name.startswith(_HEAD) or any(f".{h}" in name for h in _HEAD):
        return "head"
    if any(a in name for a in _ATTENTION):
        return "attention"
    if any(m in name for m in _MLP):
        return "mlp"
    return "other"


def mean_loss(run: Run, examples: list, chunk: int) -> torch.Tensor:
    """The mean loss over ``examples``, ``chunk`` at a time (differentiable)."""
    total = 0.0
    for i in range(0, len(examples), chunk):
        part = examples[i:i + chunk]
        total = total + run.clf.loss(part) * len(part)
    return total / len(examples)


def gradient(run: Run, examples: list, chunk: int) -> list[torch.Tensor]:
    """The backpropagated gradient of the mean loss over ``examples``, one tensor a parameter."""
    params = list(run.params.values())
    with torch.enable_grad():
        grads = torch.autograd.grad(mean_loss(run, examples, chunk), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _dots(a: list[torch.Tensor], b: list[torch.Tensor], kinds: list[str]) -> dict:
    """Per kind (and over all), the sums of ``a.b``, ``a.a`` and ``b.b`` in float64."""
    out: dict[str, list[float]] = {}
    for x, y, kind in zip(a, b, kinds):
        x64, y64 = x.double().flatten(), y.double().flatten()
        terms = (float(x64 @ y64), float(x64 @ x64), float(y64 @ y64))
        for key in (kind, ALL):
            acc = out.setdefault(key, [0.0, 0.0, 0.0])
            for j in range(3):
                acc[j] += terms[j]
    return out


def cosines(a: list[torch.Tensor], b: list[torch.Tensor], kinds: list[str]) -> dict[str, float]:
    """The cosine between ``a`` and ``b`` per kind of tensor and over all (NaN where either is
    zero)."""
    out = {}
    for key, (ab, aa, bb) in _dots(a, b, kinds).items():
        out[key] = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else float("nan")
    return out


def norms(a: list[torch.Tensor], kinds: list[str]) -> dict[str, float]:
    """The Euclidean norm of ``a`` per kind and over all."""
    return {key: math.sqrt(aa) for key, (_, aa, _) in _dots(a, a, kinds).items()}


def summary(values: list[float]) -> dict:
    """Mean, standard deviation, min and max of the finite values, and their count."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs),
            "max": max(xs), "n": len(xs)}


class Point:
    """One checkpoint of a run, ready to be measured: its training batch, held-out batch, the
    weights as they are (``origin``) and both backpropagated gradients."""

    def __init__(self, run: Run, step: int, heldout: int, seed: int):
        self.run, self.step = run, step
        self.names = list(run.params)
        self.params = [p for p in run.params.values()]
        self.kinds = [tensor_kind(n, p) for n, p in run.params.items()]
        self.chunk = run.cfg.eval_batch_size
        self.batch = batch(run, step)
        inside = {id(e) for e in self.batch}
        rest = [e for e in run.splits.train if id(e) not in inside]
        rng = random.Random(f"fidelity:{seed}:{step}")
        self.heldout = rng.sample(rest, min(heldout, len(rest)))
        self.origin = [p.detach().clone() for p in self.params]
        started = time.perf_counter()
        self.grad_batch = gradient(run, self.batch, self.chunk)
        self.grad_heldout = gradient(run, self.heldout, self.chunk)
        self.backprop_s = time.perf_counter() - started
        with torch.no_grad():
            self.loss_heldout = float(mean_loss(run, self.heldout, self.chunk))

    def heldout_loss(self) -> float:
        with torch.no_grad():
            return float(mean_loss(self.run, self.heldout, self.chunk))

    def describe(self) -> dict:
        return {"step": self.step, "batch": len(self.batch), "heldout": len(self.heldout),
                "heldout_loss": self.loss_heldout, "backprop_s": self.backprop_s,
                "parameters": {k: sum(p.numel() for p, kk in zip(self.params, self.kinds)
                                      if kk == k) for k in KINDS if k in self.kinds},
                "gradient_norm": {"batch": norms(self.grad_batch, self.kinds),
                                  "heldout": norms(self.grad_heldout, self.kinds)},
                # the ceiling of any estimate of the batch's gradient on held-out data
                "cos_batch_heldout": cosines(self.grad_batch, self.grad_heldout, self.kinds),
                "weight_norm": norms(self.origin, self.kinds)}


def measure_method(point: Point, name: str, settings: dict, draws: int, curve_draws: int,
                   lr_factors: list[float], seed: int) -> dict:
    """One method's fidelity at ``point`` (see the module's docstring)."""
    lr = float(settings["lr"])
    lrs = [lr * f for f in lr_factors]
    drawn = _draw(point, name, settings, draws, curve_draws, lrs, seed)
    keys = sorted(drawn.same[0], key=lambda key: (key != ALL, key))
    per_query = drawn.queries / draws
    d_norm = {key: statistics.fmean(n[key] for n in drawn.d_norms) for key in keys}
    descent = _descent(drawn.curves, lrs, per_query)
    return {
        "name": name, "settings": settings, "queries_per_step": per_query,
        "seconds_per_step": drawn.seconds / draws, "draws": draws,
        "cos_batch": {key: summary([c[key] for c in drawn.same]) for key in keys},
        "cos_heldout": {key: summary([c[key] for c in drawn.held]) for key in keys},
        "cos_mean_direction": {
            "batch": cosines(drawn.mean_d, point.grad_batch, point.kinds),
            "heldout": cosines(drawn.mean_d, point.grad_heldout, point.kinds)},
        "direction_norm": d_norm,
        "descent": descent,
        # the one step's quadratic model from the slope s and curvature c: the best rate
        # s / c and the most one step can descend, s^2 / 2c, per query
        "one_step": _one_step(drawn.slopes, drawn.bends, per_query),
        **_best(descent, per_query, d_norm, norms(point.origin, point.kinds)),
    }


@dataclass
class _Drawn:
    """What the draws of one method's step measured, draw by draw."""

    mean_d: list[torch.Tensor]  # the draws' mean direction
    same: list[dict] = field(default_factory=list)  # cosines with the batch's gradient
    held: list[dict] = field(default_factory=list)  # cosines with the held-out gradient
    d_norms: list[dict] = field(default_factory=list)  # the direction's norms
    curves: list[list[float]] = field(default_factory=list)  # held-out loss change per rate
    slopes: list[float] = field(default_factory=list)
    bends: list[float] = field(default_factory=list)
    queries: int = 0
    seconds: float = 0.0


def _draw(point: Point, name: str, settings: dict, draws: int, curve_draws: int,
          lrs: list[float], seed: int) -> _Drawn:
    """What ``draws`` draws of a method's step at ``point`` measured (curves: ``curve_draws``)."""
    lr = float(settings["lr"])
    closure = step_loss(point.run, point.batch)
    drawn = _Drawn([torch.zeros_like(p) for p in point.params])
    for k in range(draws):
        opt = point.run.optimizer(settings, mix(seed, k), name)
        started = time.perf_counter()
        d = update_direction(opt, closure, point.params, point.origin)
        drawn.seconds += time.perf_counter() - started
        # the step as the method takes it, per unit of its lr: each group at its rate's share
        torch._foreach_mul_(d, [r / lr for r in group_rates(opt, point.params)])
        drawn.queries += opt.queries
        drawn.same.append(cosines(d, point.grad_batch, point.kinds))
        drawn.held.append(cosines(d, point.grad_heldout, point.kinds))
        drawn.d_norms.append(norms(d, point.kinds))
        torch._foreach_add_(drawn.mean_d, d, alpha=1.0 / draws)
        if k < curve_draws:
            curve, slope, bend = _along(point, d, lr, lrs)
            drawn.curves.append(curve)
            drawn.slopes.append(slope)
            drawn.bends.append(bend)
    return drawn


def _along(point: Point, d: list[torch.Tensor], lr: float,
           lrs: list[float]) -> tuple[list[float], float, float]:
    """The held-out loss change along ``d`` at each of ``lrs``; slope and curvature at ``lr``."""
    # the curve, and the mirror point of the reference rate: the slope and the
    # curvature along d (``-lr s + lr^2 c / 2`` and its mirror image)
    losses = losses_along(point.heldout_loss, point.params, point.origin, d, lrs + [-lr])
    curve = [v - point.loss_heldout for v in losses[:-1]]
    at = losses[lrs.index(lr)] if lr in lrs else losses_along(
        point.heldout_loss, point.params, point.origin, d, [lr])[0]
    return (curve, (losses[-1] - at) / (2 * lr),
            (at + losses[-1] - 2 * point.loss_heldout) / lr**2)


def _descent(curves: list[list[float]], lrs: list[float], per_query: float) -> dict:
    """Per rate of ``lrs``: the held-out loss change, descent per query and share descending."""
    change = [summary([c[i] for c in curves]) for i in range(len(lrs))]
    return {
        "lr": lrs, "curve_draws": len(curves),
        "loss_change": change,
        "descent_per_query": [None if c["mean"] is None else -c["mean"] / per_query
                              for c in change],
        "share_descending": [statistics.fmean(cv[i] < 0 for cv in curves) if curves
                             else None for i in range(len(lrs))]}


def _best(descent: dict, per_query: float, d_norm: dict, w_norm: dict) -> dict:
    """The rate of the most mean held-out descent, its descent per query and relative update."""
    lrs, change = descent["lr"], descent["loss_change"]
    measured = [i for i in range(len(lrs)) if change[i]["mean"] is not None]
    if not measured:
        return {"best_lr": None, "best_descent_per_query": None, "relative_update_at_best": None}
    best = min(measured, key=lambda i: change[i]["mean"])
    return {
        "best_lr": lrs[best],
        "best_descent_per_query": -change[best]["mean"] / per_query,
        # how far one step at the best rate moves each kind of tensor, against its size
        "relative_update_at_best": {key: lrs[best] * d_norm[key] / w_norm[key]
                                    for key in d_norm if w_norm.get(key)},
    }


def _one_step(slopes: list[float], bends: list[float], per_query: float) -> dict:
    """The held-out descent's slope ``s`` and curvature ``c`` along the step over the draws,
    and what they give: the rate of the most descent, ``s / c``, and that descent per
    query, ``s^2 / (2 c q)`` (the slope's mean, so its spread over draws says how sure)."""
    out = {"slope": summary(slopes), "curvature": summary(bends)}
    s, c = out["slope"]["mean"], out["curvature"]["mean"]
    ok = s is not None and c is not None and c > 0
    out["rate"] = s / c if ok and s > 0 else None
    out["descent_per_query"] = s * s / (2 * c * per_query) if ok and s > 0 else None
    return out


# -- the benchmark ---------------------------------------------------------------------------

def _spec_methods(spec: dict) -> list[dict]:
    methods = spec.get("methods") or []
    if not methods:
        raise ValueError("the fidelity configuration lists no [[methods]]")
    out = []
    for m in methods:
        label = m.get("label", m.get("name"))
        if "name" not in m or "lr" not in (m.get("settings") or {}):
            raise ValueError(f"method {label!r}: give its name and settings.lr (the reference "
                             "rate the lr grid is scaled from)")
        out.append({"label": label, "name": m["name"], "settings": dict(m["settings"]),
                    "draws": m.get("draws")})
    labels = [m["label"] for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique: {labels}")
    return out


def _base_config(spec: dict, method: dict, steps: int = 0):
    data = json.loads(json.dumps(spec.get("base", {})))
    data.update(steps=steps, seed=int(spec.get("seed", 0)))
    data["method"] = {"name": method["name"], "settings": method["settings"]}
    data.setdefault("guard", {"spike": 0.0})
    return run_config.build(data)


def _points(spec: dict, out: Path, log):
    """``(step, make)`` for the start and each point along the run of ``[along]``: ``make()``
    builds the run at that point, the run along trained to it in ``out/along`` (resumed where
    it stopped), so that a point already measured builds nothing."""
    first = _spec_methods(spec)[0]
    yield 0, lambda: build(_base_config(spec, first))
    along = spec.get("along")
    if not along:
        return
    folder = out / "along"
    method = {"name": along["name"], "settings": dict(along.get("settings", {}))}

    def at(step: int):
        cfg = _base_config(spec, method, steps=step)
        cfg = cfg.model_copy(update={"save_every": step, "eval_every": step})
        log(f"along: {along['name']} to step {step}")
        train(cfg, folder, resume=folder.exists(), progress=False, log=lambda *_: None)
        return open_run(folder)[0]

    for step in sorted(int(s) for s in along.get("steps", [])):
        yield step, lambda step=step: at(step)


def run(config_path: str | Path, out: str | Path, log=print, spec: dict | None = None) -> dict:
    """Measure every method at every point of a fidelity configuration; write
    ``fidelity.json`` (after each method, so an interrupted run keeps what it measured) and
    ``fidelity.png``."""
    spec = spec if spec is not None else run_config.read_file(config_path)
    methods = _spec_methods(spec)
    settings, heldout, seed = _options(spec)
    out = Path(out)
    path = out / "fidelity.json"
    with Claimed(out, config_path):
        results = _kept_results(path, settings, config_path)
        for step, make in _points(spec, out, log):
            entry = results["points"].setdefault(str(step), {"methods": {}})
            todo = [m for m in methods if m["label"] not in entry["methods"]]
            if not todo:  # measured already: its run is not even built
                continue
            point = Point(make(), step, heldout, seed)
            entry.update(point.describe())
            _measure_methods(point, todo, entry["methods"], settings, seed,
                             lambda: write_json(path, results), log)
        write_json(path, results)
        plot(results, out / "fidelity.png")
        (out / "fidelity.md").write_text(report(results))
    log(f"fidelity: {path}")
    return results


def _options(spec: dict) -> tuple[dict, int, int]:
    """The settings ``fidelity.json`` records, the number of held-out examples and the seed."""
    draws, curve_draws = int(spec.get("draws", 64)), int(spec.get("curve_draws", 16))
    factors = [float(f) for f in spec.get("lr_factors", LR_FACTORS)]
    heldout, seed = int(spec.get("heldout", 64)), int(spec.get("seed", 0))
    if draws < 2 or not 0 <= curve_draws <= draws:
        raise ValueError("draws must be at least 2, and curve_draws between 0 and draws")
    settings = dict(draws=draws, curve_draws=curve_draws, lr_factors=factors,
                    base=spec.get("base", {}))
    return settings, heldout, seed


def _kept_results(path: Path, settings: dict, config_path: str | Path) -> dict:
    """The results kept in ``path`` (or none), checked against ``settings`` and set to them."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if any(results.get(k, v) != v for k, v in settings.items()):
        raise ValueError(f"{path} was measured with other draws, rates or base settings: "
                         "choose another --out")
    results.update(config=str(config_path), **settings)
    results.setdefault("points", {})
    return results


def _measure_methods(point: Point, methods: list[dict], measured: dict, settings: dict,
                     seed: int, save, log) -> None:
    """Adds each of ``methods``' fidelity at ``point`` to ``measured``, saving after each."""
    for m in methods:
        n = int(m["draws"] or settings["draws"])  # a costly step (a population) may take fewer
        log(f"step {point.step}: {m['label']} ({n} draws)")
        measured[m["label"]] = measure_method(point, m["name"], m["settings"], n,
                                              min(settings["curve_draws"], n),
                                              settings["lr_factors"], mix(seed, point.step))
        save()


def _cos(stats: dict) -> str:
    return "-" if stats.get("mean") is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def report(results: dict) -> str:
    """The tables of ``fidelity.json``: per point, each method's cosines with the
    backpropagated gradients (one draw's, mean ± standard deviation over draws; and the
    draws' mean direction's, per kind of tensor, against the held-out gradient), and what one
    step does to the held-out loss."""
    lines = [f"# Estimator fidelity\n\nConfiguration: `{results.get('config')}`. Cosines are "
             "with the backpropagated gradient of the step's own batch (\"batch\") and of "
             "held-out training examples (\"held-out\"); \"mean direction\" is the cosine of "
             "the draws' mean update with the held-out gradient, per kind of tensor. "
             "\"Best lr\" is the grid rate with the most mean held-out descent; \"one-step "
             "rate\" and \"descent per query\" come from the slope s and curvature c along the "
             "step (s / c and s^2 / 2cq; none where s or c is not positive). `fidelity.json` "
             "holds every figure and its spread.\n"]
    for step, entry in results["points"].items():
        means = [m["cos_mean_direction"]["heldout"] for m in entry["methods"].values()]
        kinds = [k for k in (ALL, *KINDS) if any(math.isfinite(c.get(k, math.nan))
                                                  for c in means)]
        lines += [f"## Step {step} (held-out loss {entry['heldout_loss']:.4f}; batch and held-out "
                  f"gradients' cosine {_num(entry['cos_batch_heldout'].get(ALL))})\n",
                  "| method | queries a step | draws | cos, batch | cos, held-out | "
                  + " | ".join(f"mean direction: {k}" for k in kinds)
                  + " | best lr | one-step rate | descent per query |",
                  "| --- " * (8 + len(kinds)) + "|"]
        for label, m in entry["methods"].items():
            mean = m["cos_mean_direction"]["heldout"]
            one = m.get("one_step", {})
            lines.append(f"| {label} | {m['queries_per_step']:.0f} | {m['draws']} | "
                         f"{_cos(m['cos_batch'][ALL])} | {_cos(m['cos_heldout'][ALL])} | "
                         + " | ".join(f"{mean[k]:.4f}" if math.isfinite(mean.get(k, math.nan))
                                      else "-" for k in kinds)
                         + f" | {_num(m['best_lr'])} | {_num(one.get('rate'))} | "
                         f"{_num(one.get('descent_per_query'))} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    """Per point, the held-out cosine per kind of tensor (mean and standard deviation over
    draws) and the held-out descent per query against the learning rate, one line a method."""
    plt = _pyplot()
    if plt is None:
        return None
    points = results["points"]
    fig, axes = plt.subplots(len(points), 2, figsize=(13, 4.2 * len(points)), squeeze=False)
    for row, (step, entry) in zip(axes, points.items()):
        _plot_cosines(row[0], step, entry["methods"])
        _plot_descent(row[1], step, entry["methods"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    """``matplotlib.pyplot`` drawing off screen, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot_cosines(ax, step: str, methods: dict) -> None:
    """Draws on ``ax`` each method's held-out cosine per kind of tensor, one bar a method."""
    kinds = _kinds_measured(methods)
    width = 0.8 / max(1, len(methods))
    for i, (label, m) in enumerate(methods.items()):
        xs = [j + i * width for j in range(len(kinds))]
        stats = [m["cos_heldout"].get(k, {}) for k in kinds]
        ax.bar(xs, [s.get("mean") or 0.0 for s in stats], width,
               yerr=[s.get("std") or 0.0 for s in stats], label=label, color=f"C{i % 10}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], kinds, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("cosine with held-out gradient")
    ax.set_title(f"step {step}: update direction against backpropagation")
    ax.legend(fontsize=7)


def _kinds_measured(methods: dict) -> list[str]:
    """The kinds of tensor (all of them first) any method has a held-out cosine for."""
    return [k for k in (ALL, *KINDS) if any(k in m["cos_heldout"] for m in methods.values())]


def _plot_descent(ax, step: str, methods: dict) -> None:
    """Draws on ``ax`` each method's held-out descent per query against the learning rate."""
    for i, (label, m) in enumerate(methods.items()):
        lrs, dpq = m["descent"]["lr"], m["descent"]["descent_per_query"]
        if any(v is not None for v in dpq):
            ax.plot(lrs, [math.nan if v is None else v for v in dpq], marker="o",
                    label=label, color=f"C{i % 10}")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out loss decrease per query")
    ax.set_title(f"step {step}: one step's held-out descent")
    if ax.get_legend_handles_labels()[0]:  # no curve where none was measured
        ax.legend(fontsize=7)


def main(argv=None) -> int:
    return command.main("fidelity", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
