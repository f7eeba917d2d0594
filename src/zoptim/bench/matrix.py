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
    settings = { lr = 1e-2, rank = 32, queries = 4 }
    steps = 400          # optional: cells may differ in steps to equalize queries

Cells already finished (their ``summary.json`` has final figures) are not run again, so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import config as run_config
from ..train import train
from .figures import load_curve, spread, to_target
from .plots import accuracy_plots


class BenchError(ValueError):
    pass


def _cells(spec: dict):
    methods = spec.get("methods") or []
    seeds = spec.get("seeds") or [0]
    if not methods:
        raise BenchError("the benchmark config lists no [[methods]]")
    labels = [m.get("label", m.get("name")) for m in methods]
    if len(set(labels)) != len(labels):
        raise BenchError(f"method labels must be unique: {labels}")
    baseline = spec.get("baseline", labels[0])
    if baseline not in labels:
        raise BenchError(f"baseline {baseline!r} is not one of the method labels {labels}")
    for method, label in zip(methods, labels):
        extra = {k: v for k, v in method.items() if k not in ("label", "name", "settings")}
        for seed in seeds:
            data = json.loads(json.dumps(spec.get("base", {})))
            data.update(extra)
            data["seed"] = seed
            data["method"] = {"name": method["name"], "settings": method.get("settings", {})}
            yield label, seed, run_config.build(data)


def run(config_path: str, out: str | Path, log=print, command: list[str] | None = None) -> dict:
    spec = run_config.read_file(config_path)
    folder = Path(out)
    cells = list(_cells(spec))  # validates every cell before any runs
    labels = list(dict.fromkeys(label for label, _, _ in cells))
    baseline = spec.get("baseline", labels[0])
    for label, seed, cfg in cells:
        cell = folder / label / f"seed-{seed}"
        summary = cell / "summary.json"
        if summary.exists() and "after" in json.loads(summary.read_text()):
            continue
        log(f"{label} seed {seed}: {cfg.steps} steps")
        train(cfg, cell, resume=cell.exists(), progress=False, log=lambda *_: None)
    results, curves = collect(folder, labels, baseline)
    results["environment"] = environment(config_path, command)
    plots = accuracy_plots(curves, folder)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    (folder / "report.md").write_text(report(results, [p.name for p in plots]))
    log(f"report: {folder / 'report.md'}")
    return results


def collect(folder: Path, labels: list[str], baseline: str) -> dict:
    curves, finals = {}, {}
    for label in labels:
        curves[label], finals[label] = {}, {}
        for cell in sorted((folder / label).glob("seed-*")):
            seed = int(cell.name.split("-")[1])
            curves[label][seed] = load_curve(cell / "metrics.jsonl")
            finals[label][seed] = json.loads((cell / "summary.json").read_text())
    out = {"baseline": baseline, "methods": {}}
    for label in labels:
        q_seed, q = to_target(curves[label], curves[baseline], "queries")
        t_seed, t = to_target(curves[label], curves[baseline], "seconds")
        out["methods"][label] = {
            "queries_to_target": {"per_seed": q_seed, **q},
            "time_to_target": {"per_seed": t_seed, **t},
            "final_dev": spread([s["after"]["dev_acc"] for s in finals[label].values()]),
            "final_test": spread([s["after"]["test_acc"] for s in finals[label].values()]),
            "zero_shot_dev": spread([s["before"]["dev_acc"] for s in finals[label].values()]),
            "queries": spread([s["after"]["queries"] for s in finals[label].values()]),
        }
    return out, curves


def environment(config_path: str, command: list[str] | None) -> dict:
    import platform
    import sys

    import torch

    from .. import __version__

    return {"command": command or ["zoptim", *sys.argv[1:]], "config": str(config_path),
            "zoptim": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _fmt(s: dict, digits: int = 3) -> str:
    if s["median"] is None:
        return "not reached"
    text = f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"
    return text + (f" ({s['missing']} seeds not reached)" if s.get("missing") else "")


def report(results: dict, plots: list[str]) -> str:
    base, env = results["baseline"], results["environment"]
    lines = ["# Benchmark report\n",
             f"Command: `{' '.join(env['command'])}`; zoptim {env['zoptim']}, torch {env['torch']}, "
             f"Python {env['python']}, {env['machine']}, {env['threads']} threads, "
             f"GPU {env['cuda'] or 'none'}.\n",
             "Median [min, max] over seeds. The target of a "
             f"seed is {base}'s final dev accuracy on it; a ratio is the queries (or seconds) a "
             f"method needed to first reach it over {base}'s.\n",
             "| method | queries to target / " + base + " | time to target / " + base +
             " | final dev | final test | queries |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, m in results["methods"].items():
        lines.append(f"| {label} | {_fmt(m['queries_to_target'], 2)} | "
                     f"{_fmt(m['time_to_target'], 2)} | {_fmt(m['final_dev'])} | "
                     f"{_fmt(m['final_test'])} | {_fmt(m['queries'], 0)} |")
    lines += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
