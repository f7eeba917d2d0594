"""``zoptim bench``: a matrix of methods x seeds on one task and model, each cell a
``zoptim train`` run, then the derived figures and a Markdown report.

The configuration (TOML or YAML) holds the run settings every cell shares (``[base]``, the
keys of a train config), the seeds, the baseline's label, and the methods::

    seeds = [0, 1, 2]
    baseline = "mezo"

    [base]
    steps = 1600
    eval_every = 100
    [base.task]
    train = 1000
    dev = 2000
    test = 5000

    [[methods]]
    label = "mezo"
    name = "mezo"
    settings = { lr = 1e-5, eps = 1e-3 }

    [[methods]]
    label = "zo-muon"
    name = "zo-muon"
    settings = { lr = 1e-2, rank = 32, directions = 4 }
    steps = 400          # optional: cells may differ in steps to equalize queries
    model = { scheme = "head" }   # optional: any run setting, merged into [base]
    grid = { lr = [3e-3, 1e-2, 3e-2] }   # optional: tuned on the selection seed

A method with ``steps = 0`` makes no update: it is an evaluation row, the starting model's
scores (zero-shot; with ``task = { demonstrations = 16 }``, in-context learning), and takes
neither a grid nor a name. Every row reports the memory of one of its steps (parameters,
optimizer state, the step's transient peak; one forward for an evaluation row) beside its
accuracy, measured once on the first seed's settings. Every row that trains also has its
training step timed on the machine writing the report (``bench.step_time``): its time at step
cost is a time-to-target ratio of one machine, whatever machines the cells ran on.

A method with a ``grid`` is tuned: every point (the product of the listed values, added to its
settings) runs on the selection seed (``selection_seed``, the first seed unless given), the
point with the best final dev accuracy is kept, and the other seeds run it. Every method must
get a grid of the same size, so each has the same tuning budget. Where any method is tuned,
the reported figures come from the other seeds alone, which no choice has seen; the selection
seed's cells appear in the tuning section only. Arrival at a target is read on smoothed dev
curves (``bench.figures``), and the final test accuracy is the score a report leads with.

Cells already finished (their ``summary.json`` has final figures) are not run again, so an
interrupted benchmark continues where it stopped. ``only`` runs and reports some of the
methods: their cells are the whole matrix's, so a later run of all of it in the same folder
keeps them.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from zoptim.runs import config as run_config, machine
from zoptim.runs.checkpoints import write_json
from zoptim.runs.run import Diverged, build, open_run, train
from zoptim.bench import step_time
from zoptim.bench.figures import SMOOTH, load_curve, spread, to_target
from zoptim.bench.folder import BenchError, Claimed, check_name, safe_name
from zoptim.bench.plots import accuracy_plots


@dataclass
class Method:
    label: str
    name: str
    settings: dict
    extra: dict  # per-method run settings (steps, eval_every, ...)
    grid: list[dict]  # the settings each tuning cell adds; [{}] when not tuned

    @property
    def evaluation(self) -> bool:
        """A row that makes no update (``steps = 0``): zero-shot or in-context learning."""
        return self.extra.get("steps") == 0


def _grid_points(grid: dict, label: str) -> list[dict]:
    if not grid:
        return [{}]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BenchError(f"method {label!r}: grid.{key} must be a non-empty list")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "fixed"


def point_folder(point: dict) -> str:
    """The folder name of a grid point's cell: its name, with every character that is not
    a plain name's (``bench.folder.NAME``) as ``_`` (``betas=[0.9, 0.99]`` ->
    ``betas=_0.9,_0.99_``)."""
    return safe_name(point_name(point))


def _method(m: dict) -> Method:
    """One ``[[methods]]`` entry as a ``Method``, its grid expanded to points."""
    label = m.get("label", m.get("name"))
    if label is not None:
        check_name("method label", label)
    extra = {k: v for k, v in m.items() if k not in ("label", "name", "settings", "grid")}
    if extra.get("steps") == 0:
        if label is None or m.get("grid"):
            raise BenchError(f"method {label!r}: a row of steps = 0 makes no update; give it a "
                             "label and no grid")
        # the optimizer is built but never steps; MeZO's has no state to hold
        return Method(label, m.get("name", "mezo"), m.get("settings", {}), extra, [{}])
    if "name" not in m:
        raise BenchError(f"method {label!r}: give its name (a method of zoptim train)")
    return Method(label, m["name"], m.get("settings", {}), extra,
                  _apart(label, _grid_points(m.get("grid") or {}, label)))


def _apart(label: str, points: list[dict]) -> list[dict]:
    """``points``, refused where two would share a cell folder."""
    folders = [point_folder(p) for p in points]
    if len(set(folders)) != len(folders):
        raise BenchError(f"method {label!r}: grid points {[point_name(p) for p in points]} "
                         "would share a cell folder; make their values differ in letters or "
                         "digits")
    return points


def _check_methods(methods: list[Method]) -> None:
    """Fail unless the labels are unique and every tuned method's grid has the same size (a
    row without a grid, at given or calibrated rates, is not tuned)."""
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise BenchError(f"method labels must be unique: {labels}")
    sizes = {m.label: len(m.grid) for m in methods if not m.evaluation and len(m.grid) > 1}
    if len(set(sizes.values())) > 1:
        raise BenchError(f"every tuned method must get the same tuning budget, but the grids "
                         f"have {sizes} points; give each a grid of the same size")


def _methods(spec: dict) -> list[Method]:
    raw = spec.get("methods") or []
    if not raw:
        raise BenchError("the benchmark config lists no [[methods]]")
    methods = [_method(m) for m in raw]
    _check_methods(methods)
    return methods


def _merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys set, tables merged key by key (a method's
    ``model = { scheme = "head" }`` keeps the shared model settings)."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _config(spec: dict, method: Method, point: dict, seed: int):
    # a benchmark measures the methods as they are: the spike test is off unless asked for
    base = _merged({"guard": {"spike": 0.0}}, json.loads(json.dumps(spec.get("base", {}))))
    data = _merged(base, method.extra)
    data["seed"] = seed
    data["method"] = {"name": method.name, "settings": {**method.settings, **point}}
    return run_config.build(data)


def _layout(spec: dict) -> tuple[list[Method], list[int], str]:
    """The methods, the seeds (the selection seed first) and the baseline's label, checked."""
    methods, seeds = _methods(spec), list(spec.get("seeds") or [0])
    baseline = _baseline(spec, methods)
    return methods, _selection_first(spec, methods, seeds), baseline


def _baseline(spec: dict, methods: list[Method]) -> str:
    """The baseline's label, checked to be that of a method that trains."""
    trained = [m.label for m in methods if not m.evaluation]
    baseline = spec.get("baseline", trained[0] if trained else None)
    if baseline not in trained:
        raise BenchError(f"baseline {baseline!r} is not one of the labels of the methods that "
                         f"train {trained}")
    return baseline


def _selection_first(spec: dict, methods: list[Method], seeds: list[int]) -> list[int]:
    """The seeds with the selection seed first, checked."""
    first = spec.get("selection_seed", seeds[0])
    if first not in seeds:
        raise BenchError(f"selection_seed {first!r} is not one of the seeds {seeds}")
    seeds = [first] + [s for s in seeds if s != first]
    if _tuned(methods) and len(seeds) < 2:
        raise BenchError("a tuned benchmark reports on seeds its tuning has not seen: list at "
                         "least one seed besides the selection seed")
    return seeds


def _tuned(methods: list[Method]) -> bool:
    """Whether any method is tuned on the selection seed."""
    return any(len(m.grid) > 1 for m in methods)


def select(spec: dict, labels: list[str] | None) -> dict:
    """``spec`` with only the methods labelled ``labels`` (in the config's order; all when
    None); the baseline must be one of them."""
    if labels is None:
        return spec
    known = [m.get("label", m.get("name")) for m in spec.get("methods") or []]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise BenchError(f"no method labelled {unknown} in the config; its labels: {known}")
    kept = [m for m, label in zip(spec["methods"], known) if label in labels]
    return {**spec, "methods": kept}


def _cells(spec: dict):
    """Every cell of the benchmark, validated: (label, seed, point, config). The tuning cells
    (every grid point) run on the selection seed; the other seeds run the chosen point."""
    methods, seeds, _ = _layout(spec)
    for m in methods:
        for point in m.grid:
            yield m.label, seeds[0], point, _config(spec, m, point, seeds[0])
        for seed in seeds[1:]:
            yield m.label, seed, None, _config(spec, m, m.grid[0], seed)  # checks the settings


def _finished(cell: Path) -> dict | None:
    summary = cell / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        if "after" in data:
            return data
    return None


def _check_same_run(cfg, cell: Path) -> None:
    """Refuse a finished cell that ran another seed, method or number of steps than its place
    in the benchmark now asks for (a changed ``selection_seed``, grid or config)."""
    # read as the current code reads it, so that a default added since is no difference
    saved = json.loads(run_config.build(json.loads((cell / "config.json").read_text()))
                       .model_dump_json())
    wanted = json.loads(cfg.model_dump_json())
    differ = [k for k in ("seed", "steps", "method") if saved.get(k) != wanted[k]]
    if differ:
        raise BenchError(f"{cell} holds a finished run of another {', '.join(differ)} than the "
                         "benchmark now asks for: move it away, or choose another --out")


def _run_cell(cfg, cell: Path, log, what: str) -> dict:
    done = _finished(cell)
    if done is not None:
        _check_same_run(cfg, cell)
    if done is None:
        log(f"{what}: {cfg.steps} steps")
        try:
            train(cfg, cell, resume=cell.exists(), progress=False, log=lambda *_: None)
        except Diverged as err:
            log(f"{what}: diverged ({err})")
            _record_divergence(cell, str(err))
        done = _finished(cell)
    return done


def _record_divergence(cell: Path, reason: str) -> None:
    """A diverged cell ends at its last good weights (saved when the run stopped): its final
    figures are theirs, marked ``diverged``, so one unstable setting does not stop the matrix."""
    run, _ = open_run(cell)
    path = cell / "summary.json"
    summary = json.loads(path.read_text())
    size = run.cfg.eval_batch_size
    summary["after"] = {"dev_acc": run.clf.score(run.splits.dev, size),
                        "test_acc": run.clf.score(run.splits.test, size),
                        "steps": run.opt.steps, "queries": run.opt.queries,
                        "skipped_steps": run.opt.skipped, "diverged": reason}
    write_json(path, summary)


def run(config_path: str, out: str | Path, log=print, command: list[str] | None = None,
        only: list[str] | None = None) -> dict:
    """Run every cell not yet finished, then write ``results.json`` and ``report.md``. A method
    with a grid is tuned first: each point runs on the selection seed, the point with the best
    final dev accuracy is kept (its cell appears in the tuning section only), and the other
    seeds run it.
    ``only``: the labels of the methods to run and report (all when None)."""
    spec = select(run_config.read_file(config_path), only)
    folder = Path(out)
    list(_cells(spec))  # validates every cell before any runs
    methods, seeds, baseline = _layout(spec)
    with Claimed(folder, config_path):
        cells, tuning, settings = _run_matrix(spec, methods, seeds, folder, log)
        results, curves = _figures(cells, tuning, baseline,
                                   seeds[0] if _tuned(methods) else None)
        _measure_steps(spec, methods, tuning, seeds[0], folder, results)
        _step_time_to_target(results)
        _add_choices(results, settings, tuning)
        results["environment"] = environment(config_path, command)
        _write_report(results, curves, folder, log)
    return results


def _run_matrix(spec: dict, methods: list[Method], seeds: list[int], folder: Path,
                log) -> tuple[dict[str, dict[int, Path]], dict, dict]:
    """Every method's run folders by seed, tuning record (if tuned) and settings as it ran."""
    cells: dict[str, dict[int, Path]] = {}
    tuning, settings = {}, {}
    for m in methods:
        if len(m.grid) > 1:
            tuning[m.label], chosen = _tune(spec, m, seeds[0], folder, log)
            cells[m.label] = {seeds[0]: _grid_cell(folder, m, chosen)}
            rest = seeds[1:]
        else:  # nothing to choose: the selection seed's cell would be left out anyway
            chosen, cells[m.label], rest = m.grid[0], {}, seeds[1:] if _tuned(methods) else seeds
        settings[m.label] = {**m.settings, **chosen}
        cells[m.label].update(_run_seeds(spec, m, chosen, rest, folder, log))
    return cells, tuning, settings


def _grid_cell(folder: Path, m: Method, point: dict) -> Path:
    """The run folder of a method's tuning cell at ``point``."""
    return folder / m.label / "grid" / point_folder(point)


def _tune(spec: dict, m: Method, seed: int, folder: Path, log) -> tuple[dict, dict]:
    """A tuned method's tuning record on the selection seed ``seed`` and its chosen point."""
    tried = {}
    for point in m.grid:
        summary = _run_cell(_config(spec, m, point, seed), _grid_cell(folder, m, point), log,
                            f"{m.label} tuning {point_name(point)}, seed {seed}")
        tried[point_name(point)] = summary["after"]["dev_acc"]
    # the best final dev accuracy; of equals, the first point listed
    best = max(range(len(m.grid)), key=lambda i: (tried[point_name(m.grid[i])], -i))
    chosen = m.grid[best]
    return {"tried": tried, "chosen": point_name(chosen), "seed": seed}, chosen


def _run_seeds(spec: dict, m: Method, point: dict, seeds: list[int], folder: Path,
               log) -> dict[int, Path]:
    """The run folders of a method's cells at ``point`` on ``seeds``, by seed."""
    cells = {}
    for seed in seeds:
        cell = folder / m.label / f"seed-{seed}"
        _run_cell(_config(spec, m, point, seed), cell, log, f"{m.label} seed {seed}")
        cells[seed] = cell
    return cells


def _figures(cells: dict[str, dict[int, Path]], tuning: dict, baseline: str,
             selection: int | None) -> tuple[dict, dict]:
    """The results' figures and curves of the reported cells (all but ``selection``'s)."""
    # where anything was chosen on the selection seed, its cells are left out of the figures
    reported = {label: {seed: cell for seed, cell in by_seed.items()
                        if selection is None or seed != selection}
                for label, by_seed in cells.items()}
    results, curves = collect(reported, baseline)
    results["selection_seed"] = selection
    results["seeds"] = sorted({seed for by_seed in reported.values() for seed in by_seed})
    _selection_ratios(tuning, cells, baseline, results["cost"])
    return results, curves


def _measure_steps(spec: dict, methods: list[Method], tuning: dict, seed: int, folder: Path,
                   results: dict) -> None:
    """Adds to each method's results its step's memory (and time, where cost is queries)."""
    for m in methods:
        _measure_step(_config(spec, m, _chosen(m, tuning), seed), m, folder,
                      results["methods"][m.label], timed=results["cost"] == "queries")


def _add_choices(results: dict, settings: dict, tuning: dict) -> None:
    """Adds to each method's results the settings it ran with and its tuning record, if any."""
    for label, entry in results["methods"].items():
        entry["settings"] = settings[label]
        if label in tuning:
            entry["tuning"] = tuning[label]


def _write_report(results: dict, curves: dict, folder: Path, log) -> None:
    """Writes the plots, ``results.json`` and ``report.md`` into ``folder``."""
    plots = accuracy_plots(curves, folder, reward=results["cost"] == "generations")
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    (folder / "report.md").write_text(report(results, [p.name for p in plots]))
    log(f"report: {folder / 'report.md'}")


def _selection_ratios(tuning: dict, cells: dict, baseline: str, cost: str) -> None:
    """Each tuned method's chosen point's cost to target on the selection seed, against the
    baseline's: what a choice between rows (a method's variants) may be made on."""
    if baseline not in tuning:
        return
    seed = tuning[baseline]["seed"]
    base = {seed: load_curve(cells[baseline][seed] / "metrics.jsonl")}
    for label, t in tuning.items():
        ours = {seed: load_curve(cells[label][seed] / "metrics.jsonl")}
        t[f"{cost}_to_target"] = to_target(ours, base, cost)[0][seed]


def _chosen(m: Method, tuning: dict) -> dict:
    """The grid point a method runs with: the tuned one, or its only point."""
    if m.label not in tuning:
        return m.grid[0]
    return next(p for p in m.grid if point_name(p) == tuning[m.label]["chosen"])


def _measure_step(cfg, m: Method, folder: Path, entry: dict, timed: bool) -> None:
    """Add to a method's ``entry`` the memory of one step of ``cfg``'s run and, if ``timed``
    and the method trains, its step's seconds a query on this machine; each kept in the
    method's folder, so a finished benchmark measures nothing again. One run serves both,
    built only if something is measured: memory first, on fresh weights; the step's time does
    not depend on them."""
    run = functools.cache(lambda: build(cfg))
    entry["memory"] = _kept(folder / m.label / "memory.json",
                            lambda: _memory(run(), not m.evaluation))
    if timed and not m.evaluation:
        entry["step_time"] = _kept(folder / m.label / "step_time.json",
                                   lambda: step_time.of_run(run()))


def _kept(path: Path, measure) -> dict:
    """``measure()``'s figures, kept in ``path``: a finished benchmark does not measure again."""
    if path.exists():
        return json.loads(path.read_text())
    row = measure()
    write_json(path, row)
    return row


def _memory(run, update: bool) -> dict:
    """The memory of one step of a built run (``bench.memory.of_run``) on its first training
    batch."""
    from zoptim.bench import memory
    from zoptim.runs.run import batch

    if run.cfg.method.name == "grpo":
        return memory.grpo_step(run, batch(run, 0))
    return memory.of_run(run, batch(run, 0), update)


def _step_time_to_target(results: dict) -> None:
    """Each timed method's time to target at its step's cost (``bench.step_time``): its
    queries-to-target ratios times its seconds a query over the baseline's."""
    methods = results["methods"]
    base = methods[results["baseline"]].get("step_time")
    if base is None:  # a benchmark counted in generations times no step
        return
    for entry in methods.values():
        if "step_time" in entry:
            entry["step_time_to_target"] = step_time.to_target(
                entry["queries_to_target"]["per_seed"], entry["step_time"], base)


def _evaluation_row(finals: dict) -> bool:
    """Whether a method's cells made no update (``steps = 0``)."""
    return all(s["after"]["steps"] == 0 for s in finals.values())


def _load_cells(cells: dict[str, dict[int, Path]]) -> tuple[dict, dict]:
    """The curves (``metrics.jsonl``; none for an evaluation row) and summaries
    (``summary.json``) of every cell, by label and seed."""
    finals = {label: {seed: json.loads((cell / "summary.json").read_text())
                      for seed, cell in by_seed.items()} for label, by_seed in cells.items()}
    curves = {label: {seed: load_curve(cell / "metrics.jsonl") for seed, cell in by_seed.items()}
              for label, by_seed in cells.items() if not _evaluation_row(finals[label])}
    return curves, finals


def cost_axis(finals: dict) -> str:
    """What a benchmark's budget is counted in: queries, or for a reward task generations
    (completions decoded), which zeroth-order methods and GRPO both spend."""
    reward = any(s.get("metric") == "reward" for by_seed in finals.values()
                 for s in by_seed.values())
    return "generations" if reward else "queries"


def _method_figures(curves: dict | None, base_curves: dict, finals: dict, cost: str) -> dict:
    """One method's derived figures from its curves (``None`` for an evaluation row) and
    summaries by seed, against the baseline's curves; ``cost`` is the budget's axis."""
    figures = {}
    if curves is not None:  # a row that trains
        q_seed, q = to_target(curves, base_curves, cost)
        t_seed, t = to_target(curves, base_curves, "seconds")
        figures = {f"{cost}_to_target": {"per_seed": q_seed, **q},
                   "time_to_target": {"per_seed": t_seed, **t}}
        if cost == "generations":
            figures["generations"] = spread([c.generations[-1] for c in curves.values()])
    return {
        **figures,
        "final_dev": spread([s["after"]["dev_acc"] for s in finals.values()]),
        "final_test": spread([s["after"]["test_acc"] for s in finals.values()]),
        "zero_shot_dev": spread([s["before"]["dev_acc"] for s in finals.values()]),
        "queries": spread([s["after"]["queries"] for s in finals.values()]),
        "diverged_seeds": [seed for seed, s in finals.items() if "diverged" in s["after"]],
    }


def collect(cells: dict[str, dict[int, Path]], baseline: str) -> tuple[dict, dict]:
    """Derived figures from the finished cells: ``cells[label][seed]`` is a run folder."""
    curves, finals = _load_cells(cells)
    cost = cost_axis(finals)
    out = {"baseline": baseline, "cost": cost, "methods": {}}
    for label in cells:
        out["methods"][label] = _method_figures(curves.get(label), curves[baseline],
                                                finals[label], cost)
        # where each seed's cell ran (``runs.machine``): its wall times are that machine's
        out["methods"][label]["machines"] = {seed: s.get("machines") or ["not recorded"]
                                             for seed, s in finals[label].items()}
    return out, curves


def environment(config_path: str, command: list[str] | None) -> dict:
    """The command, versions and machine (``runs.machine.describe``) of a report."""
    import platform
    import sys

    import torch

    from zoptim import __version__

    return {"command": command or ["zoptim", *sys.argv[1:]], "config": str(config_path),
            "zoptim": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": machine.describe()}


def _fmt(s: dict, digits: int = 3) -> str:
    """``median [min, max]`` over seeds; the median reads "not reached" when half the seeds or
    more never reached the target, and the range is that of the seeds that did."""
    if s["min"] is None:
        return "not reached"
    median = "not reached" if s["median"] is None else f"{s['median']:.{digits}f}"
    text = f"{median} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"
    missing = s.get("missing")
    return text + (f" ({missing} of {s['n'] + missing} seeds not reached)" if missing else "")


def _report_header(results: dict) -> list[str]:
    """The report's title, environment line, explanation and table header."""
    base, env, cost = results["baseline"], results["environment"], results.get("cost",
                                                                                 "queries")
    score = "mean greedy reward" if cost == "generations" else "accuracy"
    return ["# Benchmark report\n",
            f"Command: `{' '.join(env['command'])}`; zoptim {env['zoptim']}, torch {env['torch']}, "
            f"Python {env['python']}; {env['machine']}.\n",
            f"Median [min, max] over seeds {_seeds_text(results)}. The target of a seed is "
            f"{base}'s final dev {score} on it, smoothed over its last {SMOOTH} evaluations; a "
            f"ratio is the {cost} (or seconds) a method needed to reach it and stay there (its "
            f"curve smoothed likewise) over {base}'s. A seed that never reached it counts in "
            "the median as above every ratio.\n",
            "Memory is one step's: parameters, optimizer state and the step's transient peak "
            "(for a row that makes no update, one forward without gradients).\n",
            f"| method | {cost} to target / {base} | time to target / {base} | time at step "
            f"cost / {base} | final dev | final test | {cost} | memory (MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]


def _seeds_text(results: dict) -> str:
    """The seeds a report's figures come from, and the one its choices were made on."""
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    chosen = results.get("selection_seed")
    if chosen is None:
        return seeds
    return (f"{seeds}; every setting was chosen on seed {chosen}, whose cells are in the "
            "tuning section alone")


def _report_rows(results: dict) -> list[str]:
    """One table row a method."""
    def to_target(m: dict, key: str) -> str:
        if key in m:
            return _fmt(m[key], 2)
        return "-" if f"{cost}_to_target" in m else "no update"

    def memory(m: dict) -> str:
        return f"{m['memory']['total'] / (1 << 20):.0f}" if "memory" in m else "-"

    cost = results.get("cost", "queries")
    return [f"| {label} | {to_target(m, f'{cost}_to_target')} | "
            f"{to_target(m, 'time_to_target')} | {to_target(m, 'step_time_to_target')} | "
            f"{_fmt(m['final_dev'])} | "
            f"{_fmt(m['final_test'])} | {_fmt(m[cost], 0) if cost in m else '-'} | "
            f"{memory(m)} |" for label, m in results["methods"].items()]


def _report_diverged(results: dict) -> list[str]:
    """The note on diverged seeds, if any."""
    diverged = {label: m["diverged_seeds"] for label, m in results["methods"].items()
                if m.get("diverged_seeds")}
    if not diverged:
        return []
    return ["", "Diverged (stopped by the loss guard; figures at the last good weights): " +
            "; ".join(f"{label} seeds {seeds}" for label, seeds in diverged.items())]


def _report_machines(results: dict) -> list[str]:
    """Where the cells ran on more than one machine, which ran where: a time ratio between
    cells of different machines mixes the machines' speeds."""
    cells: dict[str, list[str]] = {}
    for label, m in results["methods"].items():
        for seed, machines in m["machines"].items():
            cells.setdefault(", then ".join(machines), []).append(f"{label} seed {seed}")
    if len(cells) < 2:
        return []
    return ["", "The cells ran on more than one machine: a time-to-target ratio between cells "
            "of different machines mixes their speeds (each cell's `queries_per_s` says how fast "
            "it ran).", "", *(f"- {machine}: {', '.join(where)}" for machine, where in
                              cells.items())]


def _report_step_time(results: dict) -> list[str]:
    """What the time at step cost is, and the seconds a query behind it."""
    timed = {label: m["step_time"] for label, m in results["methods"].items()
             if "step_time" in m}
    if not timed:
        return []
    machines = {t["machine"] for t in timed.values()}
    one = len(machines) == 1
    costs = "; ".join(f"{label} {t['seconds_per_query']:.3g} s" +
                      ("" if one else f" ({t['machine']})") for label, t in timed.items())
    return ["", f"Time at step cost: the queries to target times the seconds a query of the "
            f"method's training step, over {results['baseline']}'s, so that every method is "
            "timed on one machine whatever machines its cells ran on. Seconds a query (the "
            "median of each method's steps on its first training batch, one method after "
            f"another{' on ' + machines.pop() if one else ''}; evaluation left out): {costs}."]


def _tuning_line(label: str, tuning: dict) -> str:
    """One tuned method's grid points and their dev accuracy, the chosen one in bold."""
    points = [f"**{p}: {acc:.3f}**" if p == tuning["chosen"] else f"{p}: {acc:.3f}"
              for p, acc in tuning["tried"].items()]
    ratio = next((v for k, v in tuning.items() if k.endswith("_to_target")), "absent")
    arrival = "" if ratio == "absent" else \
        f" (chosen point's cost to target: {'not reached' if ratio is None else f'{ratio:.2f}'})"
    return f"- {label}: " + "; ".join(points) + arrival


def _report_tuning(results: dict) -> list[str]:
    """The tuning section, if any method was tuned."""
    tuned = {label: m for label, m in results["methods"].items() if "tuning" in m}
    if not tuned:
        return []
    return ["", "Tuning (final dev accuracy of each grid point on seed "
            f"{next(iter(tuned.values()))['tuning']['seed']}, the chosen point in bold, and "
            f"its {results.get('cost', 'queries')} to target over {results['baseline']}'s on "
            "that seed: what a choice among rows may be made on):", "",
            *(_tuning_line(label, m["tuning"]) for label, m in tuned.items())]


def report(results: dict, plots: list[str]) -> str:
    lines = [*_report_header(results), *_report_rows(results), *_report_diverged(results),
             *_report_machines(results), *_report_step_time(results), *_report_tuning(results)]
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
