"""A fine-tuning run: data, model, scheme and method from a config; progress, metrics,
checkpoints, a journal of every step's values, resume, replay and evaluation.

A run folder holds:

- ``config.json`` (the validated configuration) and ``split.json`` (how the data was split),
- ``metrics.jsonl`` (one line a step; dev accuracy every ``eval_every`` steps),
- ``journal.jsonl`` (every value each step's objective returned: enough to replay the run
  from its starting weights, bit for bit on the CPU),
- ``checkpoint-<step>/`` (trainable weights and optimizer state as safetensors plus JSON) and
  ``latest`` naming the newest complete one,
- ``summary.json`` (accuracy before and after, queries, wall time).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import METHODS
from .config import TrainConfig
from .integrations.classifier import PromptClassifier
from .integrations.models import load_model
from .integrations.schemes import apply_scheme
from .tasks import Prompt, Splits, load_task


class RunError(RuntimeError):
    pass


@dataclass
class Run:
    cfg: TrainConfig
    splits: Splits
    clf: PromptClassifier
    params: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer


def build(cfg: TrainConfig) -> Run:
    """Everything a run needs, at its starting weights (adapters are initialized from
    ``cfg.seed``)."""
    t = cfg.task
    splits = load_task(t.name, t.path, train=t.train, dev=t.dev, test=t.test, seed=t.seed,
                       text_column=t.text_column, label_column=t.label_column, labels=t.labels)
    if len(splits.labels) != len(t.label_words):
        raise RunError(f"the task has {len(splits.labels)} labels {splits.labels} but "
                       f"{len(t.label_words)} label words are given (task.label_words)")
    model, tokenizer, decoder = load_model(cfg.model.name, cfg.model.dtype)
    prompt = Prompt(t.template, tuple(t.label_words))
    clf = PromptClassifier(model, tokenizer, prompt, decoder, cfg.model.max_length)
    torch.manual_seed(cfg.seed)
    apply_scheme(clf, cfg.model.scheme, lora_r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                 virtual_tokens=cfg.model.virtual_tokens)
    params = {n: p for n, p in clf.named_parameters() if p.requires_grad}
    if cfg.method.name not in METHODS:
        raise RunError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[cfg.method.name]
    extra = {"model": clf} if cfg.method.name == "forward-gradient" else {}
    try:
        opt = cls(list(params.values()), seed=cfg.seed, **cfg.method.settings, **extra)
    except TypeError as err:
        raise RunError(f"method.settings: {err}") from err
    return Run(cfg, splits, clf, params, opt)


def batch(run: Run, step: int) -> list:
    """The training batch of ``step``: a function of the seed and the step alone, so a resumed
    run sees the same batches."""
    rng = random.Random(f"{run.cfg.seed}:{step}")
    return rng.sample(run.splits.train, min(run.cfg.batch_size, len(run.splits.train)))


# -- checkpoints ------------------------------------------------------------------------------

def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run: Run, folder: Path) -> Path:
    """Write ``checkpoint-<step>`` completely, then point ``latest`` at it, then drop older
    ones: a crash at any moment leaves the previous checkpoint intact and named."""
    step = run.opt.steps
    target = folder / f"checkpoint-{step}"
    staging = folder / f".checkpoint-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in run.params.items()},
              str(staging / "trainable.safetensors"))
    sd = run.opt.state_dict()
    tensors, meta = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                meta[f"{idx}.{key}"] = value
    save_file(tensors, str(staging / "optimizer.safetensors"))
    _write_json(staging / "optimizer.json", {"param_groups": sd["param_groups"], "zo": sd["zo"],
                                             "scalars": meta})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    _write_json(folder / "latest.json", {"checkpoint": target.name, "step": step})
    for old in folder.glob("checkpoint-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(run: Run, checkpoint: Path) -> None:
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    missing = set(run.params) - set(weights)
    if missing:
        raise RunError(f"{checkpoint}: weights missing for {sorted(missing)[:3]}...; the "
                       "checkpoint belongs to a different model or scheme")
    with torch.no_grad():
        for name, p in run.params.items():
            p.copy_(weights[name])
    info = json.loads((checkpoint / "optimizer.json").read_text())
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    state: dict = {}
    for key, value in [*tensors.items(), *info["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    run.opt.load_state_dict({"state": state, "param_groups": info["param_groups"],
                             "zo": info["zo"]})


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest.json"
    if not pointer.exists():
        return None
    return folder / json.loads(pointer.read_text())["checkpoint"]


# -- the run ------------------------------------------------------------------------------------

def _truncate_jsonl(path: Path, below_step: int) -> None:
    """Keep the lines of steps before ``below_step`` (after a resume, later ones are redone)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) < below_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    folder = Path(out)
    has_run = (folder / "config.json").exists()
    if has_run and not resume:
        raise RunError(f"{folder} already holds a run; pass --resume to continue it or choose "
                       "another --out")
    if resume and has_run:
        saved = TrainConfig.model_validate_json((folder / "config.json").read_text())
        if saved.model_dump(exclude={"steps"}) != cfg.model_dump(exclude={"steps"}):
            raise RunError(f"{folder} was started with a different configuration; resume it "
                           "with the same one (only steps may change)")
    run = build(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", json.loads(cfg.model_dump_json()))
    _write_json(folder / "split.json", run.splits.record)

    summary_path = folder / "summary.json"
    checkpoint = latest_checkpoint(folder) if resume else None
    if checkpoint is not None:
        load_checkpoint(run, checkpoint)
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        log(f"resumed from {checkpoint.name} (step {run.opt.steps}, {run.opt.queries} queries)")
    else:
        dev0 = run.clf.accuracy(run.splits.dev, cfg.eval_batch_size)
        test0 = run.clf.accuracy(run.splits.test, cfg.eval_batch_size)
        summary = {"before": {"dev_acc": dev0, "test_acc": test0}}
        _write_json(summary_path, summary)
        log(f"before: dev {dev0:.4f}  test {test0:.4f}  ({len(run.params)} tensors, "
            f"{sum(p.numel() for p in run.params.values()):,} trainable parameters)")
    for name in ("journal.jsonl", "metrics.jsonl"):
        _truncate_jsonl(folder / name, run.opt.steps)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.opt.steps, desc=cfg.method.name, unit="step",
                   dynamic_ncols=True)
    start, start_queries = time.perf_counter(), run.opt.queries
    dev = summary.get("last_dev_acc")
    with open(folder / "journal.jsonl", "a") as journal, open(folder / "metrics.jsonl", "a") as metrics:
        while run.opt.steps < cfg.steps:
            examples = batch(run, run.opt.steps)
            loss = run.opt.step(lambda: run.clf.loss(examples))
            step = run.opt.steps
            journal.write(json.dumps({"step": step - 1, "values": run.opt.last_values}) + "\n")
            journal.flush()
            elapsed = time.perf_counter() - start
            rate = (run.opt.queries - start_queries) / max(elapsed, 1e-9)
            record = {"step": step - 1, "loss": loss, "queries": run.opt.queries,
                      "elapsed_s": round(elapsed, 3), "queries_per_s": round(rate, 3)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                dev = record["dev_acc"] = run.clf.accuracy(run.splits.dev, cfg.eval_batch_size)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", dev="-" if dev is None else f"{dev:.3f}",
                                queries=run.opt.queries, qps=f"{rate:.1f}")
                bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(run, folder)
                summary["last_dev_acc"] = dev
                _write_json(summary_path, summary)
    if bar is not None:
        bar.close()
    test = run.clf.accuracy(run.splits.test, cfg.eval_batch_size)
    summary["after"] = {"dev_acc": dev, "test_acc": test, "steps": run.opt.steps,
                        "queries": run.opt.queries}
    summary["wall_s"] = summary.get("wall_s", 0.0) + time.perf_counter() - start
    summary["command"] = ["zoptim", *sys.argv[1:]]
    _write_json(summary_path, summary)
    before = summary.get("before", {})
    log(f"after:  dev {dev:.4f}  test {test:.4f}  ({run.opt.steps} steps, {run.opt.queries} "
        f"queries; before: dev {before.get('dev_acc', float('nan')):.4f}  "
        f"test {before.get('test_acc', float('nan')):.4f})")
    return summary


def open_run(folder: str | Path) -> tuple[Run, Path]:
    """The run of a folder at its latest checkpoint."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise RunError(f"{folder} holds no run (no config.json)")
    cfg = TrainConfig.model_validate_json((folder / "config.json").read_text())
    run = build(cfg)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise RunError(f"{folder} has no checkpoint yet")
    load_checkpoint(run, checkpoint)
    return run, checkpoint


def evaluate(folder: str | Path, split: str = "test") -> float:
    run, _ = open_run(folder)
    return run.clf.accuracy(getattr(run.splits, split), run.cfg.eval_batch_size)


def replay(folder: str | Path) -> tuple[Run, int]:
    """Rebuild a run from its starting weights and redo every journalled step without running
    the model. Returns the run and the number of steps replayed."""
    folder = Path(folder)
    cfg = TrainConfig.model_validate_json((folder / "config.json").read_text())
    run = build(cfg)
    steps = 0
    with open(folder / "journal.jsonl") as journal:
        for line in journal:
            if line.strip():
                run.opt.step(replay=json.loads(line)["values"])
                steps += 1
    return run, steps
