"""A fine-tuning run: data, model, scheme and method from a config; progress, metrics,
checkpoints, a journal of every step's values, resume, replay and evaluation. Text tasks run
a language model as a prompt classifier (``integrations.classifier``), image tasks a vision
model with a new head (``integrations.vision``); the loop is the same.

A run folder holds:

- ``config.json`` (the validated configuration) and ``split.json`` (how the data was split),
- ``metrics.jsonl`` (one line a step; dev accuracy every ``eval_every`` steps),
- ``journal.jsonl`` (every value each step's objective returned, checksummed: enough to
  replay the run from its starting weights, bit for bit on the CPU; see ``journal``),
- ``checkpoint-<step>/`` (trainable weights and optimizer state, see ``checkpoints``) and
  ``latest.json`` naming the newest complete one,
- ``summary.json`` (accuracy before and after, queries, wall time).

``train`` is a ``Training``: its phases (open the folder, build, restore, evaluate before,
the loop, finish) are methods, and every process of a distributed run goes through the same
loop; the lead process alone evaluates and writes.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from zoptim.integrations.classifier import PromptClassifier
from zoptim.integrations.models import DTYPES, load_model
from zoptim.integrations.schemes import apply_scheme
from zoptim.methods import model_arguments
from zoptim.runs import config, journal
from zoptim.runs.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, write_json
from zoptim.runs.config import TrainConfig
from zoptim.runs.guard import LossGuard
from zoptim.tasks import Prompt, Splits, load_task
from zoptim.tasks.images import is_image_task


class RunError(RuntimeError):
    pass


class Diverged(RunError):
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


def _check_rank(cfg: TrainConfig, params: dict) -> None:
    rank = cfg.method.settings.get("rank")
    rows = [p.shape[0] for p in params.values() if p.dim() >= 2]
    if rank is not None and rows and rank > max(rows):
        raise RunError(f"method.settings.rank={rank} exceeds every matrix of this model and "
                       f"scheme (the largest has {max(rows)} rows); choose at most {max(rows)}")


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
    _check_rank(cfg, params)
    # The method and its settings were checked when the configuration was built.
    cls = config.method_class(cfg.method.name)
    opt = cls(list(params.values()), seed=cfg.seed, **cfg.method.settings,
              **model_arguments(cls, clf))
    return Run(cfg, splits, clf, params, opt)


def batch(run: Run, step: int) -> list:
    """The training batch of ``step``: a function of the seed and the step alone, so a resumed
    run sees the same batches."""
    rng = random.Random(f"{run.cfg.seed}:{step}")
    return rng.sample(run.splits.train, min(run.cfg.batch_size, len(run.splits.train)))


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


def roll_forward(run: Run, entries: list[journal.Entry], guard: LossGuard) -> None:
    """Redo journalled steps from their recorded values and decisions (no model run)."""
    for entry in entries:
        if entry.step != run.opt.steps:
            raise RunError(f"journal step {entry.step} does not follow step {run.opt.steps}")
        run.opt.step(replay=entry.values, skip=entry.skipped)
        guard.observe(entry.values, entry.skipped)


def _quiet(*args, **kwargs) -> None:
    pass


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class _Outputs:
    """What the loop writes: the journal and the metrics on the lead process, nothing on the
    others (every method is then a no-op)."""

    def __init__(self, folder: Path | None, fsync_every: int, stack: ExitStack):
        self.journal = self.metrics = None
        if folder is not None:
            self.journal = stack.enter_context(journal.Writer(folder / "journal.jsonl",
                                                              fsync_every))
            self.metrics = stack.enter_context(open(folder / "metrics.jsonl", "a"))

    def step(self, entry: journal.Entry, record: dict) -> None:
        if self.journal is not None:
            self.journal.append(entry)
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def sync(self) -> None:
        if self.journal is not None:
            self.journal.sync()


class Training:
    """``zoptim train``, phase by phase; ``run()`` goes through them."""

    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False,
                 progress: bool = True, log=print):
        self.cfg, self.folder, self.resume, self.progress = cfg, Path(out), resume, progress
        self.par = _parallel(cfg)
        self.lead = self.par is None or self.par.rank == 0  # the one process that writes
        self.log = log if self.lead else _quiet
        self.guard = LossGuard(cfg.guard.spike, cfg.guard.window)
        self.summary: dict = {}
        self.run_: Run | None = None
        self.dev: float | None = None

    def run(self) -> dict:
        had_run = self.open_folder()
        self.build()
        self.restore(had_run)
        self.evaluate_before()
        self.loop()
        return self.finish()

    # -- phases -------------------------------------------------------------------------------
    def open_folder(self) -> bool:
        """Refuse a folder that holds another run (or this one, without ``resume``)."""
        had_run = (self.folder / "config.json").exists()
        if self.par is not None:
            _barrier()  # every rank has looked at the folder before the lead writes to it
        if had_run and not self.resume:
            raise RunError(f"{self.folder} already holds a run; pass --resume to continue it or "
                           "choose another --out")
        if self.resume and had_run:
            saved = config.build(json.loads((self.folder / "config.json").read_text()))
            if saved.model_dump(exclude={"steps"}) != self.cfg.model_dump(exclude={"steps"}):
                raise RunError(f"{self.folder} was started with a different configuration; "
                               "resume it with the same one (only steps may change)")
        return had_run

    def build(self) -> None:
        self.run_ = build(self.cfg)
        if self.par is not None:
            self.par.attach(self.run_.opt)
        if self.lead:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / "config.json", json.loads(self.cfg.model_dump_json()))
            write_json(self.folder / "split.json", self.run_.splits.record)

    def restore(self, had_run: bool) -> None:
        """Load the latest checkpoint and redo the journalled steps after it."""
        run = self.run_
        checkpoint = latest_checkpoint(self.folder) if self.resume else None
        if checkpoint is not None:
            saved = _load(run, checkpoint)
            self.guard.history = saved["guard_history"]
            self.guard.first = saved.get("guard_first")
        summary_path = self.folder / "summary.json"
        if self.resume and summary_path.exists():
            self.summary = json.loads(summary_path.read_text())
        self.dev = self.summary.get("last_dev_acc")
        later = [e for e in self._journalled() if e.step >= run.opt.steps]
        if self.resume and had_run:
            roll_forward(run, later, self.guard)
            self.log(f"resumed at step {run.opt.steps} ({run.opt.queries} queries): "
                     f"{checkpoint.name if checkpoint else 'no checkpoint'} + {len(later)} "
                     "journalled steps")
        run.opt.guard = self.guard.decide

    def _journalled(self) -> list[journal.Entry]:
        """The journal's good entries (a first-order run's are run again, not replayed: a
        step cannot be redone from its losses)."""
        if not self.resume or not getattr(self.run_.opt, "replayable", True):
            return []
        path = self.folder / "journal.jsonl"
        if self.par is None:
            return journal.truncate_to_good(path)
        if self.lead:  # the lead cuts a torn tail, then every rank reads the same entries
            journal.truncate_to_good(path)
        _barrier()
        return journal.read(path)[0]

    def evaluate_before(self) -> None:
        run = self.run_
        if self.lead and "before" not in self.summary:
            dev0 = run.clf.accuracy(run.splits.dev, self.cfg.eval_batch_size)
            test0 = run.clf.accuracy(run.splits.test, self.cfg.eval_batch_size)
            self.summary = {"before": {"dev_acc": dev0, "test_acc": test0}}
            write_json(self.folder / "summary.json", self.summary)
            self.log(f"before: dev {dev0:.4f}  test {test0:.4f}  ({len(run.params)} tensors, "
                     f"{sum(p.numel() for p in run.params.values()):,} trainable parameters)")
        if self.lead:  # steps after the checkpoint and the journal are redone
            journal.truncate_to_good(self.folder / "journal.jsonl", keep_below=run.opt.steps)
            _truncate_jsonl(self.folder / "metrics.jsonl", run.opt.steps)

    def loop(self) -> None:
        cfg, opt = self.cfg, self.run_.opt
        self.start, self.start_queries, self.failures = time.perf_counter(), opt.queries, 0
        with ExitStack() as stack:
            out = _Outputs(self.folder if self.lead else None, cfg.journal_fsync_every, stack)
            bar = stack.enter_context(self._bar())
            while opt.steps < cfg.steps:
                self.step(out, bar)

    def _bar(self):
        if not (self.progress and self.lead):
            return nullcontext()
        from tqdm import tqdm

        return tqdm(total=self.cfg.steps, initial=self.run_.opt.steps, desc=self.cfg.method.name,
                    unit="step", dynamic_ncols=True)

    def step(self, out: _Outputs, bar) -> None:
        """One training step, its records, evaluation, checkpoint and divergence check."""
        run, cfg, opt = self.run_, self.cfg, self.run_.opt
        examples = batch(run, opt.steps)
        if self.par is not None:
            examples = self.par.shard(examples)
        # Batched queries call the closure with the number of slices to stack.
        loss = opt.step(lambda slices=None: run.clf.loss(examples, slices))
        step, skipped = opt.steps, opt.last_skip
        self.guard.observe(opt.last_values, skipped)
        self.failures = self.failures + 1 if skipped else 0
        record = self._record(step - 1, loss, skipped)
        out.step(journal.Entry(step - 1, opt.step_seed(step - 1), opt.last_values,
                               [g["lr"] for g in opt.param_groups], opt.queries, skipped), record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", dev="-" if self.dev is None else f"{self.dev:.3f}",
                            queries=opt.queries, qps=f"{record['queries_per_s']:.1f}")
            bar.update(1)
        stop = self.failures >= cfg.guard.max_consecutive
        if step % cfg.save_every == 0 or step == cfg.steps or stop:
            out.sync()
            self.checkpoint()
        if stop:
            raise Diverged(f"stopped after {self.failures} skipped steps in a row (last: "
                           f"{skipped}); the last good weights are saved in "
                           f"{self.folder / f'checkpoint-{step}'}; lower the learning rate or "
                           "eps and resume")

    def _record(self, step: int, loss: float, skipped: str | None) -> dict:
        """The step's metrics line (the lead evaluates dev accuracy on schedule)."""
        opt, cfg = self.run_.opt, self.cfg
        elapsed = time.perf_counter() - self.start
        rate = (opt.queries - self.start_queries) / max(elapsed, 1e-9)
        record = {"step": step, "loss": loss, "queries": opt.queries,
                  "elapsed_s": round(elapsed, 3), "queries_per_s": round(rate, 3)}
        if skipped:
            record["skipped"] = skipped
            self.log(f"step {step} skipped: {skipped} ({self.failures} in a row)")
        done = step + 1
        if self.lead and (done % cfg.eval_every == 0 or done == cfg.steps):
            self.dev = record["dev_acc"] = self.run_.clf.accuracy(self.run_.splits.dev,
                                                                  cfg.eval_batch_size)
        return record

    def checkpoint(self) -> None:
        if not self.lead:
            return
        save_checkpoint(self.run_.params, self.run_.opt, self.folder, self.guard.record())
        self.summary["last_dev_acc"] = self.dev
        write_json(self.folder / "summary.json", self.summary)

    def finish(self) -> dict:
        run, opt = self.run_, self.run_.opt
        if not self.lead:
            return {"rank": self.par.rank, "steps": opt.steps, "queries": opt.queries}
        test = run.clf.accuracy(run.splits.test, self.cfg.eval_batch_size)
        self.summary["after"] = {"dev_acc": self.dev, "test_acc": test, "steps": opt.steps,
                                 "queries": opt.queries, "skipped_steps": opt.skipped}
        self.summary["wall_s"] = self.summary.get("wall_s", 0.0) + time.perf_counter() - self.start
        self.summary["command"] = ["zoptim", *sys.argv[1:]]
        write_json(self.folder / "summary.json", self.summary)
        before = self.summary.get("before", {})
        self.log(f"after:  dev {self.dev:.4f}  test {test:.4f}  ({opt.steps} steps, "
                 f"{opt.queries} queries; before: dev {before.get('dev_acc', float('nan')):.4f}"
                 f"  test {before.get('test_acc', float('nan')):.4f})")
        return self.summary


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Run (or, with ``resume``, continue) the fine-tune of ``cfg`` in folder ``out``. A resumed
    run loads the latest checkpoint, redoes the journalled steps after it, and continues: its
    final weights equal an uninterrupted run's, bit for bit on the CPU."""
    return Training(cfg, out, resume=resume, progress=progress, log=log).run()


def _load(run: Run, checkpoint: Path) -> dict:
    try:
        return load_checkpoint(run.params, run.opt, checkpoint)
    except ValueError as err:
        raise RunError(str(err)) from err


def _saved_config(folder: Path) -> TrainConfig:
    if not (folder / "config.json").exists():
        raise RunError(f"{folder} holds no run (no config.json)")
    return config.build(json.loads((folder / "config.json").read_text()))


def open_run(folder: str | Path) -> tuple[Run, Path]:
    """The run of a folder at its latest checkpoint."""
    folder = Path(folder)
    run = build(_saved_config(folder))
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise RunError(f"{folder} has no checkpoint yet")
    _load(run, checkpoint)
    return run, checkpoint


def evaluate(folder: str | Path, split: str = "test") -> float:
    run, _ = open_run(folder)
    return run.clf.accuracy(getattr(run.splits, split), run.cfg.eval_batch_size)


def replay(folder: str | Path) -> tuple[Run, int]:
    """Rebuild a run from its starting weights and redo every journalled step without running
    the model. Returns the run and the number of steps replayed."""
    folder = Path(folder)
    cfg = _saved_config(folder)
    run = build(cfg)
    if not getattr(run.opt, "replayable", True):
        raise RunError(f"{folder} was trained with the first-order method {cfg.method.name!r}, "
                       "whose steps cannot be redone from their loss values")
    entries, _ = journal.read(folder / "journal.jsonl")
    roll_forward(run, entries, LossGuard(cfg.guard.spike, cfg.guard.window))
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
