"""The first-order baseline of reward-only fine-tuning: GRPO through TRL
(``integrations.grpo``), run by ``zoptim train`` with ``method.name = "grpo"`` on a reward
task, on the same model, prompts and reward as the zeroth-order methods, and writing what
their runs write (``summary.json``, ``metrics.jsonl``), so that ``zoptim bench`` puts them
side by side.

Its budget is counted in generations, ``steps * batch_size * generations``, against a
zeroth-order step's ``queries * batch_size``. Before and after, and every ``eval_every``
steps, the dev prompts are scored greedily, as every reward run is.

An interrupted GRPO run starts again from its first step (TRL's own checkpoints are not
kept); the final weights are not saved.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from zoptim.integrations.grpo import trainer
from zoptim.runs import folder as run_folder
from zoptim.runs.checkpoints import write_json
from zoptim.runs.folder import FolderError, Lock
from zoptim.runs.run import RunError, build


def train(cfg, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """``zoptim train`` with ``method.name = "grpo"`` (see the module's docstring); a finished
    run is not run again. Its folder keeps a run folder's rules (``runs.folder``): checked
    before anything is written, locked while written, and left empty by a run that fails
    before it trains."""
    folder = run_folder.absolute(out)
    summary_path = folder / "summary.json"
    if resume and summary_path.exists() and "after" in json.loads(summary_path.read_text()):
        return json.loads(summary_path.read_text())
    try:
        had_run = run_folder.check(folder, resume)
    except FolderError as err:
        raise RunError(str(err)) from None
    run = build(cfg)
    lock = Lock(folder)
    try:
        lock.acquire()
    except FolderError as err:
        raise RunError(str(err)) from None
    try:
        summary = _trained(run, folder, progress, log)
    except BaseException:
        if not had_run and not summary_path.exists():
            lock.discard()  # failed before it scored the starting model: nothing stays
        raise
    finally:
        lock.release()
    return summary


def _trained(run, folder: Path, progress: bool, log) -> dict:
    """The run trained by TRL in ``folder``, its records written; its summary."""
    cfg, method = run.cfg, run.opt
    summary_path = folder / "summary.json"
    write_json(folder / "config.json", json.loads(cfg.model_dump_json()))
    write_json(folder / "split.json", run.splits.record)
    (folder / "metrics.jsonl").write_text("")  # an interrupted run starts again
    clf, size = run.clf, cfg.eval_batch_size
    before = {"dev_acc": clf.score(run.splits.dev, size),
              "test_acc": clf.score(run.splits.test, size)}
    summary = {"metric": clf.metric, "before": before}
    write_json(summary_path, summary)
    log(f"before: dev {before['dev_acc']:.4f}  test {before['test_acc']:.4f}")
    grpo, records = trainer(run, method, folder, progress)
    start = time.perf_counter()
    grpo.train()
    wall = time.perf_counter() - start
    shutil.rmtree(folder / "trl", ignore_errors=True)  # TRL's output folder, left empty
    clf.backbone.eval()
    after = {"dev_acc": records.dev if records.dev is not None else clf.score(run.splits.dev,
                                                                              size),
             "test_acc": clf.score(run.splits.test, size), "steps": cfg.steps,
             "queries": cfg.steps, "skipped_steps": 0,
             "generations": cfg.steps * cfg.batch_size * method.generations}
    summary.update(after=after, wall_s=wall, command=["zoptim", *sys.argv[1:]])
    write_json(summary_path, summary)
    log(f"after:  dev {after['dev_acc']:.4f}  test {after['test_acc']:.4f}  ({cfg.steps} steps, "
        f"{after['generations']} generations)")
    return summary
