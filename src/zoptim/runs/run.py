"""A fine-tuning run: data, model, scheme and method from a config; progress, metrics,
checkpoints, a journal of every step's values, resume, replay and evaluation. Text tasks run
a language model as a prompt classifier (``integrations.classifier``), image tasks a vision
model with a new head (``integrations.vision``); the loop is the same.

A run folder holds:

- ``config.json`` (the validated configuration) and ``split.json`` (how the data was split),
- ``metrics.jsonl`` (one line a step; dev accuracy every ``eval_every`` steps),
- ``journal.jsonl`` (every value each step's objective returned, checksummed: enough to
  replay the run from its starting weights, bit for bit on the CPU; see ``journal``),
- ``checkpoint-<step>/`` (trainable weights and optimizer state as safetensors plus JSON) and
  ``latest`` naming the newest complete one,
- ``summary.json`` (accuracy before and after, queries, wall time).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zoptim.runs import config
from zoptim.runs import journal
from zoptim.runs.config import TrainConfig
from zoptim.engine.optimizer import skip_non_finite
from zoptim.integrations.classifier import PromptClassifier
from zoptim.methods import model_arguments
from zoptim.integrations.models import DTYPES, load_model
from zoptim.integrations.schemes import apply_scheme
from zoptim.tasks import Prompt, Splits, load_task
from zoptim.tasks.images import is_image_task


class RunError(RuntimeError):
    pass


def _parallel(cfg: TrainConfig):
    """The run's ``Parallel`` when started by ``torchrun`` with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    from zoptim.evaluators.distributed import Parallel

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # runs train on the CPU; the reductions are scalars
    try:
        return Parallel(data=cfg.parallel.data)
    except ValueError as err:
        raise RunError(f"parallel.data: {err}") from err


@dataclass
class Run:
    cfg: TrainConfig
    splits: Splits
    clf: torch.nn.Module  # a PromptClassifier or an ImageClassifier: loss(), accuracy()
    params: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer


def _prompt_classifier(cfg: TrainConfig, splits: Splits) -> PromptClassifier:
    t = cfg.task
    if len(splits.labels) != len(t.label_words):
        raise RunError(f"the task has {len(splits.labels)} labels {splits.labels} but "
                       f"{len(t.label_words)} label words are given (task.label_words)")
    model, tokenizer, decoder = load_model(cfg.model.name, cfg.model.dtype)
    prompt = Prompt(t.template, tuple(t.label_words))
    clf = PromptClassifier(model, tokenizer, prompt, decoder, cfg.model.max_length)
    torch.manual_seed(cfg.seed)  # adapters are initialized from the run's seed
    return clf


def _image_classifier(cfg: TrainConfig, splits: Splits):
    from zoptim.integrations.vision import image_classifier

    torch.manual_seed(cfg.seed)  # the new head is initialized from the run's seed
    clf = image_classifier(cfg.model.name, len(splits.labels), weights=cfg.model.weights,
                           image_size=cfg.model.image_size)
    return clf.to(DTYPES[cfg.model.dtype])


def build(cfg: TrainConfig) -> Run:
    """Everything a run needs, at its starting weights (adapters and new heads are initialized
    from ``cfg.seed``)."""
    t = cfg.task
    splits = load_task(t.name, t.path, train=t.train, dev=t.dev, test=t.test, seed=t.seed,
                       shots=t.shots, text_column=t.text_column, label_column=t.label_column,
                       labels=t.labels)
    make = _image_classifier if is_image_task(t.name) else _prompt_classifier
    try:
        clf = make(cfg, splits)
        apply_scheme(clf, cfg.model.scheme, lora_r=cfg.model.lora_r,
                     lora_alpha=cfg.model.lora_alpha, virtual_tokens=cfg.model.virtual_tokens)
    except ValueError as err:  # a model that cannot be loaded, a scheme it does not take
        raise RunError(str(err)) from err
    params = {n: p for n, p in clf.named_parameters() if p.requires_grad}
    rank = cfg.method.settings.get("rank")
    rows = [p.shape[0] for p in params.values() if p.dim() >= 2]
    if rank is not None and rows and rank > max(rows):
        raise RunError(f"method.settings.rank={rank} exceeds every matrix of this model and "
                       f"scheme (the largest has {max(rows)} rows); choose at most {max(rows)}")
    # The method and its settings were checked when the configuration was built.
    cls = config.method_class(cfg.method.name)
    extra = model_arguments(cls, clf)
    opt = cls(list(params.values()), seed=cfg.seed, **cfg.method.settings, **extra)
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: Run, folder: Path, guard: "LossGuard | None" = None) -> Path:
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
    _write_json(staging / "progress.json", {"step": step,
                                            "guard_history": guard.history if guard else []})
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        _fsync_path(staging / name)
    _fsync_path(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    _fsync_path(folder)
    _write_json(folder / "latest.json", {"checkpoint": target.name, "step": step})
    _fsync_path(folder)
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

class Diverged(RunError):
    pass


class LossGuard:
    """Skips a step whose losses are not finite or jump above ``spike`` times the median of
    the last ``window`` accepted losses (``spike = 0``: no jump test). ``decide`` judges a
    step's values before its update; ``observe`` records the outcome."""

    def __init__(self, spike: float, window: int, history: list[float] | None = None):
        self.spike, self.window = spike, window
        self.history = list(history or [])

    def decide(self, values: list[float]) -> str | None:
        if reason := skip_non_finite(values):
            return reason
        if self.spike and len(self.history) >= min(5, self.window):
            typical = statistics.median(self.history)
            if typical > 0 and max(values) > self.spike * typical:
                return f"loss {max(values):.4g} above {self.spike:g} x median {typical:.4g}"
        return None

    def observe(self, values: list[float], skipped: str | None) -> None:
        if skipped is None:
            self.history = (self.history + [statistics.fmean(values)])[-self.window:]


def _truncate_jsonl(path: Path, below_step: int) -> None:
    """Keep the complete lines of steps before ``below_step`` (later ones are redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) < below_step:
                kept.append(line)
        except ValueError:
            break  # a torn line: the crash happened there
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def _roll_forward(run: Run, entries: list[journal.Entry], guard: LossGuard) -> None:
    """Redo journalled steps after the checkpoint from their recorded values (no model run)."""
    for entry in entries:
        if entry.step != run.opt.steps:
            raise RunError(f"journal step {entry.step} does not follow step {run.opt.steps}")
        run.opt.step(replay=entry.values, skip=entry.skipped)
        guard.observe(entry.values, entry.skipped)


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Run (or, with ``resume``, continue) the fine-tune of ``cfg`` in folder ``out``. A resumed
    run loads the latest checkpoint, redoes the journalled steps after it, and continues: its
    final weights equal an uninterrupted run's, bit for bit on the CPU."""
    folder = Path(out)
    par = _parallel(cfg)
    lead = par is None or par.rank == 0  # the one process that writes the run folder
    if not lead:
        log = _quiet
    has_run = (folder / "config.json").exists()
    if par is not None:
        _barrier()  # every rank has looked at the folder before the lead writes to it
    if has_run and not resume:
        raise RunError(f"{folder} already holds a run; pass --resume to continue it or choose "
                       "another --out")
    if resume and has_run:
        saved = config.build(json.loads((folder / "config.json").read_text()))
        if saved.model_dump(exclude={"steps"}) != cfg.model_dump(exclude={"steps"}):
            raise RunError(f"{folder} was started with a different configuration; resume it "
                           "with the same one (only steps may change)")
    run = build(cfg)
    if par is not None:
        par.attach(run.opt)
    if lead:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "config.json", json.loads(cfg.model_dump_json()))
        _write_json(folder / "split.json", run.splits.record)

    summary_path = folder / "summary.json"
    journal_path = folder / "journal.jsonl"
    guard = LossGuard(cfg.guard.spike, cfg.guard.window)
    checkpoint = latest_checkpoint(folder) if resume else None
    if checkpoint is not None:
        load_checkpoint(run, checkpoint)
        progress_state = json.loads((checkpoint / "progress.json").read_text())
        guard.history = progress_state["guard_history"]
    summary = json.loads(summary_path.read_text()) if resume and summary_path.exists() else {}
    if par is None:
        entries = journal.truncate_to_good(journal_path) if resume else []
    else:  # the lead cuts a torn tail, then every rank reads the same entries
        if lead and resume:
            journal.truncate_to_good(journal_path)
        _barrier()
        entries = journal.read(journal_path)[0] if resume else []
    # A first-order step cannot be redone from its losses: its journalled steps after the
    # checkpoint are run again instead (the batches are a function of the step).
    replayable = getattr(run.opt, "replayable", True)
    later = [e for e in entries if e.step >= run.opt.steps] if replayable else []
    if resume and has_run:
        _roll_forward(run, later, guard)
        log(f"resumed at step {run.opt.steps} ({run.opt.queries} queries): "
            f"{checkpoint.name if checkpoint else 'no checkpoint'} + {len(later)} journalled steps")
    if "before" not in summary and lead:
        dev0 = run.clf.accuracy(run.splits.dev, cfg.eval_batch_size)
        test0 = run.clf.accuracy(run.splits.test, cfg.eval_batch_size)
        summary = {"before": {"dev_acc": dev0, "test_acc": test0}}
        _write_json(summary_path, summary)
        log(f"before: dev {dev0:.4f}  test {test0:.4f}  ({len(run.params)} tensors, "
            f"{sum(p.numel() for p in run.params.values()):,} trainable parameters)")
    if lead:
        journal.truncate_to_good(journal_path, keep_below=run.opt.steps)
        _truncate_jsonl(folder / "metrics.jsonl", run.opt.steps)
    run.opt.guard = guard.decide
    # Under torchrun every rank steps; the lead alone evaluates and writes.
    if not lead:
        return _follow(run, cfg, guard, par)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.opt.steps, desc=cfg.method.name, unit="step",
                   dynamic_ncols=True)
    start, start_queries = time.perf_counter(), run.opt.queries
    dev = summary.get("last_dev_acc")
    failures = 0
    with journal.Writer(journal_path, cfg.journal_fsync_every) as writer, \
            open(folder / "metrics.jsonl", "a") as metrics:
        while run.opt.steps < cfg.steps:
            examples = batch(run, run.opt.steps)
            if par is not None:
                examples = par.shard(examples)
            # Batched queries call the closure with the number of slices to stack.
            loss = run.opt.step(lambda slices=None: run.clf.loss(examples, slices))
            step, skipped = run.opt.steps, run.opt.last_skip
            guard.observe(run.opt.last_values, skipped)
            writer.append(journal.Entry(step - 1, run.opt.step_seed(step - 1), run.opt.last_values,
                                        [g["lr"] for g in run.opt.param_groups], run.opt.queries,
                                        skipped))
            elapsed = time.perf_counter() - start
            rate = (run.opt.queries - start_queries) / max(elapsed, 1e-9)
            record = {"step": step - 1, "loss": loss, "queries": run.opt.queries,
                      "elapsed_s": round(elapsed, 3), "queries_per_s": round(rate, 3)}
            failures = failures + 1 if skipped else 0
            if skipped:
                record["skipped"] = skipped
                log(f"step {step - 1} skipped: {skipped} ({failures} in a row)")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                dev = record["dev_acc"] = run.clf.accuracy(run.splits.dev, cfg.eval_batch_size)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", dev="-" if dev is None else f"{dev:.3f}",
                                queries=run.opt.queries, qps=f"{rate:.1f}")
                bar.update(1)
            stop = failures >= cfg.guard.max_consecutive
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                writer.sync()
                save_checkpoint(run, folder, guard)
                summary["last_dev_acc"] = dev
                _write_json(summary_path, summary)
            if stop:
                raise Diverged(f"stopped after {failures} skipped steps in a row (last: "
                               f"{skipped}); the last good weights are saved in "
                               f"{folder / f'checkpoint-{step}'}; lower the learning rate or "
                               "eps and resume")
    if bar is not None:
        bar.close()
    test = run.clf.accuracy(run.splits.test, cfg.eval_batch_size)
    summary["after"] = {"dev_acc": dev, "test_acc": test, "steps": run.opt.steps,
                        "queries": run.opt.queries, "skipped_steps": run.opt.skipped}
    summary["wall_s"] = summary.get("wall_s", 0.0) + time.perf_counter() - start
    summary["command"] = ["zoptim", *sys.argv[1:]]
    _write_json(summary_path, summary)
    before = summary.get("before", {})
    log(f"after:  dev {dev:.4f}  test {test:.4f}  ({run.opt.steps} steps, {run.opt.queries} "
        f"queries; before: dev {before.get('dev_acc', float('nan')):.4f}  "
        f"test {before.get('test_acc', float('nan')):.4f})")
    return summary


def _quiet(*args, **kwargs) -> None:
    pass


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _follow(run: Run, cfg: TrainConfig, guard: LossGuard, par) -> dict:
    """A rank other than the lead: the same steps on its share of the work, nothing written."""
    failures = 0
    while run.opt.steps < cfg.steps:
        examples = par.shard(batch(run, run.opt.steps))
        run.opt.step(lambda slices=None: run.clf.loss(examples, slices))
        guard.observe(run.opt.last_values, run.opt.last_skip)
        # the lead stops on divergence by the same rule, from the same values
        failures = failures + 1 if run.opt.last_skip else 0
        if failures >= cfg.guard.max_consecutive:
            raise Diverged("stopped after skipped steps in a row (see the lead's log)")
    return {"rank": par.rank, "steps": run.opt.steps, "queries": run.opt.queries}


def open_run(folder: str | Path) -> tuple[Run, Path]:
    """The run of a folder at its latest checkpoint."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise RunError(f"{folder} holds no run (no config.json)")
    cfg = config.build(json.loads((folder / "config.json").read_text()))
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
    if not (folder / "config.json").exists():
        raise RunError(f"{folder} holds no run (no config.json)")
    cfg = config.build(json.loads((folder / "config.json").read_text()))
    run = build(cfg)
    if not getattr(run.opt, "replayable", True):
        raise RunError(f"{folder} was trained with the first-order method {cfg.method.name!r}, "
                       "whose steps cannot be redone from their loss values")
    entries, _ = journal.read(folder / "journal.jsonl")
    _roll_forward(run, entries, LossGuard(cfg.guard.spike, cfg.guard.window))
    return run, len(entries)


def verify_replay(folder: str | Path):
    """Replay a run's journal; compare with its latest checkpoint when that checkpoint is at
    the journal's last step. Returns (steps, queries, checkpoint name or None, equal or None)."""
    run, steps = replay(folder)
    checkpoint = latest_checkpoint(Path(folder))
    if checkpoint is None:
        return steps, run.opt.queries, None, None
    at = json.loads((checkpoint / "progress.json").read_text())["step"]
    if at != run.opt.steps:
        return steps, run.opt.queries, None, None
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    same = all(torch.equal(saved[n], p.detach()) for n, p in run.params.items())
    return steps, run.opt.queries, checkpoint.name, same
