"""How far ``lr = "auto"`` falls from tuned grids: for each tuned row of kept benchmarks, the
rates the calibration (``runs.calibration``) chooses for that row's run beside the rates its
grid tried, their final dev accuracy, and the one the grid chose.

A configuration lists kept benchmarks, each with its configuration, its ``results.json`` and
the labels of the rows to read, and whether its grids chose the calibration's constant
(``role = "selection"``) or only check it (``"check"``)::

    [[benchmarks]]
    config = "benchmarks/mr_minilm.toml"
    results = "benchmarks/results/mr_minilm/results.json"
    labels = ["mezo", "zo-muon"]
    role = "selection"
    # settings the kept cells ran with that the methods' defaults no longer give
    settings = { zo-muon = { dense_head = false } }
    # also train each row at its calibrated rates on the selection seed, to the end
    train = true

Each row is calibrated on its selection seed's configuration with the grid's keys set to
``"auto"`` and every other rate pinned where the grid held it (the method's default unless
the row sets it), so that the calibration chooses exactly what the grid chose among. A
benchmark with ``train = true`` also runs each row so calibrated on the selection seed, as
``zoptim train`` runs ``lr = "auto"`` (the calibration's queries in its count), with
``BUDGET_SHARE`` fewer steps than the grid's cells, so that calibration and steps spend about
their queries; its final dev accuracy stands beside the grid's best (cells under
``DIR/<benchmark>/<label>``, resumable).

    python -m zoptim.bench.calibration --config benchmarks/calibration.toml --out DIR

writes ``calibration.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from zoptim.bench import command
from zoptim.bench.folder import BenchError, Claimed
from zoptim.bench.matrix import (Method, _config, _methods, _run_cell,
                                 point_name)
from zoptim.parts.settings import is_rate
from zoptim.runs import config as run_config
from zoptim.runs.checkpoints import write_json
from zoptim.runs.calibration import BUDGET_SHARE
from zoptim.runs.run import build, calibrate

WITHIN = 3.0  # the factor a calibrated rate is counted as close within


def _auto(spec: dict, method: Method, settings: dict, keys: set[str], seed: int) -> Method:
    """``method`` with ``keys`` set to ``"auto"`` and every other rate pinned where the grid
    held it (as given, or the method's default)."""
    auto = replace(method, settings={**settings, **{k: "auto" for k in keys}})
    defaults = build(_config(spec, auto, {}, seed)).opt.defaults
    pinned = {k: v for k, v in defaults.items()
              if is_rate(k) and k not in keys and k not in settings}
    return replace(auto, settings={**auto.settings, **pinned})


def _trained(spec: dict, method: Method, seed: int, cell: Path, log) -> dict:
    """The final figures of ``method`` (rates "auto") trained on ``seed`` with BUDGET_SHARE
    fewer steps than its grid's cells."""
    steps = int(_config(spec, method, {}, seed).steps * (1 - BUDGET_SHARE))
    shorter = replace(method, extra={**method.extra, "steps": steps})
    return _run_cell(_config(spec, shorter, {}, seed), cell, log,
                     f"{method.label} at lr = \"auto\", seed {seed}")["after"]


def row(spec: dict, label: str, results: dict, extra: dict, cell: Path | None = None,
        log=print) -> dict:
    """One tuned row of a kept benchmark: its grid and the calibration's choice for it; with
    ``cell``, also the row trained at that choice (in ``cell``)."""
    method, tuning, keys = _tuned_row(spec, label, results)
    auto_method = _auto(spec, method, {**method.settings, **extra}, keys, tuning["seed"])
    run = build(_config(spec, auto_method, {}, tuning["seed"]))
    found = calibrate(run, log=lambda *_: None)
    return {"label": label, "method": method.name, "steps": run.cfg.steps,
            **_against_grid(method, tuning, keys, found.settings),
            "queries": found.queries,
            "step_queries": found.step_queries, "share": found.share, "draws": found.draws,
            "kept_default": found.kept,
            "trained": None if cell is None else
            _trained(spec, auto_method, tuning["seed"], cell, log)}


def _tuned_row(spec: dict, label: str, results: dict) -> tuple[Method, dict, set[str]]:
    """The row labelled ``label``, its tuning record and its grid's keys, all rates, checked."""
    method = next((m for m in _methods(spec) if m.label == label), None)
    tuning = results["methods"].get(label, {}).get("tuning")
    if method is None or tuning is None:
        raise BenchError(f"row {label!r} is not a tuned row of the benchmark")
    keys = set(method.grid[0])
    if not all(is_rate(k) for k in keys):
        raise BenchError(f"row {label!r}: its grid is over {', '.join(sorted(keys))}; only a "
                         "grid of rates is compared with the calibration")
    return method, tuning, keys


def _against_grid(method: Method, tuning: dict, keys: set[str], calibrated: dict) -> dict:
    """The grid's points and dev accuracy beside the calibrated rates of ``keys``, compared."""
    chosen = next(p for p in method.grid if point_name(p) == tuning["chosen"])
    auto = {k: calibrated[k] for k in keys}
    ratios = {k: auto[k] / chosen[k] for k in keys}
    nearest = min(method.grid, key=lambda p: sum(abs(math.log(auto[k] / p[k])) for k in keys))
    return {"grid": [{**p, "dev": tuning["tried"][point_name(p)]} for p in method.grid],
            "tuned": chosen, "auto": auto, "ratio": ratios,
            "within": all(1 / WITHIN <= r <= WITHIN for r in ratios.values()),
            "nearest_point": nearest, "nearest_dev": tuning["tried"][point_name(nearest)],
            "tuned_dev": tuning["tried"][tuning["chosen"]]}


def run(config_path: str | Path, out: str | Path, log=print) -> dict:
    """Every listed row, calibrated; ``calibration.json`` and ``report.md`` in ``out``."""
    spec = run_config.read_file(config_path)
    out = Path(out)
    path = out / "calibration.json"
    with Claimed(out, config_path):
        done = json.loads(path.read_text()) if path.exists() else {"rows": []}
        seen = {(r["benchmark"], r["label"]): r for r in done["rows"]}
        for bench in spec.get("benchmarks") or []:
            _calibrate_benchmark(bench, seen, done, out, lambda: write_json(path, done), log)
        (out / "report.md").write_text(report(done))
    log(f"calibration: {out / 'report.md'}")
    return done


def _calibrate_benchmark(bench: dict, seen: dict, done: dict, out: Path, save, log) -> None:
    """Adds to ``done`` the benchmark's rows not yet measured as it asks, saving after each."""
    bench_spec = run_config.read_file(bench["config"])
    results = json.loads(Path(bench["results"]).read_text())
    for label in bench["labels"]:
        kept = seen.get((bench["config"], label))
        if kept is not None and _stands(kept, bench):
            continue
        if kept is not None:
            done["rows"].remove(kept)
        log(f"{bench['config']}: {label}")
        done["rows"].append(_bench_row(bench, bench_spec, label, results, out, log))
        save()


def _stands(kept: dict, bench: dict) -> bool:
    """Whether a row kept from an earlier run stands as measured for ``bench``."""
    # a row to be trained that was measured without training is measured again
    return bool(kept.get("trained") or not bench.get("train"))


def _bench_row(bench: dict, bench_spec: dict, label: str, results: dict, out: Path,
               log) -> dict:
    """The ``calibration.json`` row of a benchmark's row ``label`` (trained where it asks)."""
    cell = out / Path(bench["config"]).stem / label if bench.get("train") else None
    entry = row(bench_spec, label, results, (bench.get("settings") or {}).get(label, {}),
                cell, log)
    return {"benchmark": bench["config"], "role": bench.get("role", "check"), **entry}


def report(done: dict) -> str:
    """The Markdown report of ``calibration.json``'s rows."""
    rows = done["rows"]
    lines = [*_report_header(), *(_row_line(r) for r in rows), *_report_roles(rows),
             *_report_trained([r for r in rows if r.get("trained")])]
    return "\n".join(lines) + "\n"


def _report_header() -> list[str]:
    """The report's title, explanation and table header."""
    from zoptim.runs.calibration import PHI

    return ["# lr = \"auto\" against tuned grids\n",
            f"Each row: a tuned row of a kept benchmark, calibrated for its run (phi = {PHI}) "
            "on its selection seed with the grid's keys set to \"auto\". The ratio is the "
            "calibrated rate over the grid's choice; \"nearest\" is the grid point nearest the "
            f"calibrated rate, with its final dev accuracy beside the chosen point's. Rows of "
            "role \"selection\" chose phi; \"check\" rows did not.\n",
            "| benchmark | role | row | steps | grid (final dev) | tuned | auto | ratio | "
            f"within {WITHIN:g}x | nearest point's dev / tuned's | calibration queries |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def _row_line(r: dict) -> str:
    """One row's line of the report's table."""
    grid = ", ".join(f"{point_name({k: v for k, v in p.items() if k != 'dev'})}: "
                     f"{p['dev']:.3f}" for p in r["grid"])
    return (f"| {Path(r['benchmark']).stem} | {r['role']} | {r['label']} | {r['steps']} | {grid} "
            f"| {point_name(r['tuned'])} | "
            f"{', '.join(f'{k}={v:.3g}' for k, v in r['auto'].items())} | "
            f"{', '.join(f'{v:.2f}' for v in r['ratio'].values())} | "
            f"{'yes' if r['within'] else 'no'} | {r['nearest_dev']:.3f} / {r['tuned_dev']:.3f} | "
            f"{r['queries']} ({r['share']:.1%}, {r['draws']} draws) |")


def _report_roles(rows: list[dict]) -> list[str]:
    """Per role with rows, how many are within WITHIN of the tuned rate and near its dev."""
    lines = []
    for role in ("selection", "check"):
        mine = [r for r in rows if r["role"] == role]
        if mine:
            close = sum(r["tuned_dev"] - r["nearest_dev"] <= 0.01 for r in mine)
            lines.append(f"\n{role}: {sum(r['within'] for r in mine)} of {len(mine)} rows within "
                         f"{WITHIN:g}x of the tuned rate; the grid point nearest the calibrated "
                         f"rate within 1 dev point of the tuned one in {close} of {len(mine)}.")
    return lines


def _report_trained(trained: list[dict]) -> list[str]:
    """The section on the rows trained at the calibrated rates, if any."""
    if not trained:
        return []
    return ["\n## Trained at the calibrated rates\n",
            "Each row trained on the selection seed at lr = \"auto\", calibration "
            "included, with 5% fewer steps than the grid's cells; its final dev accuracy "
            "beside the grid's best on the same seed.\n",
            "| benchmark | role | row | queries (grid's) | final dev: auto | grid's best | "
            "difference | within 1 point |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *(_trained_line(r) for r in trained),
            f"\n{sum(r['trained']['dev_acc'] - r['tuned_dev'] >= -0.01 for r in trained)}"
            f" of {len(trained)} trained rows end within 1 dev point of the grid's best."]


def _trained_line(r: dict) -> str:
    """One trained row's line of the trained section's table."""
    t, grid_queries = r["trained"], r["steps"] * r["step_queries"]
    diff = t["dev_acc"] - r["tuned_dev"]
    return (f"| {Path(r['benchmark']).stem} | {r['role']} | {r['label']} | "
            f"{t['queries']} ({grid_queries}) | {t['dev_acc']:.3f} | "
            f"{r['tuned_dev']:.3f} | {diff:+.3f} | {'yes' if diff >= -0.01 else 'no'} |")


def main(argv=None) -> int:
    return command.main("calibration", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
