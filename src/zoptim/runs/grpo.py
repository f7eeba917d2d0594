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
from zoptim.methods.first_order import GRPO
from zoptim.runs.checkpoints import write_json
from zoptim.runs.run import build


def train(cfg, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """``zoptim train`` with ``method.name = "grpo"`` (see the module's docstring); a finished
    run is not run again."""
    folder = Path(out)
    summary_path = folder / "summary.json"
    if resume and summary_path.exists() and "after" in json.loads(summary_path.read_text()):
        return json.loads(summary_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    run = build(cfg)
    method: GRPO = run.opt
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
