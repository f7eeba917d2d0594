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

Each row is calibrated on its selection seed's configuration with the grid's keys set to
``"auto"`` and every other rate pinned where the grid held it (the method's default unless
the row sets it), so that the calibration chooses exactly what the grid chose among.

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
from zoptim.bench.matrix import BenchError, Method, _config, _methods, point_name
from zoptim.engine.settings import is_rate
from zoptim.runs import config as run_config
from zoptim.runs.checkpoints import write_json
from zoptim.runs.run import build, calibrate

WITHIN = 3.0  # the factor a calibrated rate is counted as close within


def _calibrated(spec: dict, method: Method, settings: dict, keys: set[str], seed: int):
    """The run of ``method`` on ``seed`` with ``keys`` set to ``"auto"`` and every other rate
    pinned where the grid held it (as given, or the method's default), calibrated."""
    auto = {**settings, **{k: "auto" for k in keys}}
    run = build(_config(spec, replace(method, settings=auto), {}, seed))
    pinned = {k: v for k, v in run.opt.defaults.items()
              if is_rate(k) and k not in keys and k not in settings}
    if pinned:
        run = build(_config(spec, replace(method, settings={**auto, **pinned}), {}, seed))
    return run, calibrate(run, log=lambda *_: None)


def row(spec: dict, label: str, results: dict, extra: dict) -> dict:
    """One tuned row of a kept benchmark: its grid and the calibration's choice for it."""
    method = next((m for m in _methods(spec) if m.label == label), None)
    tuning = results["methods"].get(label, {}).get("tuning")
    if method is None or tuning is None:
        raise BenchError(f"row {label!r} is not a tuned row of the benchmark")
    keys = set(method.grid[0])
    if not all(is_rate(k) for k in keys):
        raise BenchError(f"row {label!r}: its grid is over {', '.join(sorted(keys))}; only a "
                         "grid of rates is compared with the calibration")
    run, found = _calibrated(spec, method, {**method.settings, **extra}, keys, tuning["seed"])
    chosen = next(p for p in method.grid if point_name(p) == tuning["chosen"])
    auto = {k: found.settings[k] for k in keys}
    ratios = {k: auto[k] / chosen[k] for k in keys}
    nearest = min(method.grid, key=lambda p: sum(abs(math.log(auto[k] / p[k])) for k in keys))
    return {"label": label, "method": method.name, "steps": run.cfg.steps,
            "grid": [{**p, "dev": tuning["tried"][point_name(p)]} for p in method.grid],
            "tuned": chosen, "auto": auto, "ratio": ratios,
            "within": all(1 / WITHIN <= r <= WITHIN for r in ratios.values()),
            "nearest_point": nearest, "nearest_dev": tuning["tried"][point_name(nearest)],
            "tuned_dev": tuning["tried"][tuning["chosen"]], "queries": found.queries,
            "share": found.share, "draws": found.draws, "kept_default": found.kept}


def run(config_path: str | Path, out: str | Path, log=print) -> dict:
    """Every listed row, calibrated; ``calibration.json`` and ``report.md`` in ``out``."""
    spec = run_config.read_file(config_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration.json"
    done = json.loads(path.read_text()) if path.exists() else {"rows": []}
    seen = {(r["benchmark"], r["label"]) for r in done["rows"]}
    for bench in spec.get("benchmarks") or []:
        bench_spec = run_config.read_file(bench["config"])
        results = json.loads(Path(bench["results"]).read_text())
        for label in bench["labels"]:
            if (bench["config"], label) in seen:
                continue
            log(f"{bench['config']}: {label}")
            entry = row(bench_spec, label, results, (bench.get("settings") or {}).get(label, {}))
            done["rows"].append({"benchmark": bench["config"], "role": bench.get("role", "check"),
                                 **entry})
            write_json(path, done)
    (out / "report.md").write_text(report(done))
    log(f"calibration: {out / 'report.md'}")
    return done


def report(done: dict) -> str:
    from zoptim.runs.calibration import PHI

    rows = done["rows"]
    lines = ["# lr = \"auto\" against tuned grids\n",
             f"Each row: a tuned row of a kept benchmark, calibrated for its run (phi = {PHI}) "
             "on its selection seed with the grid's keys set to \"auto\". The ratio is the "
             "calibrated rate over the grid's choice; \"nearest\" is the grid point nearest the "
             f"calibrated rate, with its final dev accuracy beside the chosen point's. Rows of "
             "role \"selection\" chose phi; \"check\" rows did not.\n",
             "| benchmark | role | row | steps | grid (final dev) | tuned | auto | ratio | "
             f"within {WITHIN:g}x | nearest point's dev / tuned's | calibration queries |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        grid = ", ".join(f"{point_name({k: v for k, v in p.items() if k != 'dev'})}: "
                         f"{p['dev']:.3f}" for p in r["grid"])
        lines.append(
            f"| {Path(r['benchmark']).stem} | {r['role']} | {r['label']} | {r['steps']} | {grid} "
            f"| {point_name(r['tuned'])} | "
            f"{', '.join(f'{k}={v:.3g}' for k, v in r['auto'].items())} | "
            f"{', '.join(f'{v:.2f}' for v in r['ratio'].values())} | "
            f"{'yes' if r['within'] else 'no'} | {r['nearest_dev']:.3f} / {r['tuned_dev']:.3f} | "
            f"{r['queries']} ({r['share']:.1%}, {r['draws']} draws) |")
    for role in ("selection", "check"):
        mine = [r for r in rows if r["role"] == role]
        if mine:
            close = sum(r["tuned_dev"] - r["nearest_dev"] <= 0.01 for r in mine)
            lines.append(f"\n{role}: {sum(r['within'] for r in mine)} of {len(mine)} rows within "
                         f"{WITHIN:g}x of the tuned rate; the grid point nearest the calibrated "
                         f"rate within 1 dev point of the tuned one in {close} of {len(mine)}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return command.main("calibration", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
