"""A fine-tuning run: data, model, scheme and method from a config; progress, metrics,
checkpoints, a journal of every step's values, resume, replay and evaluation. Text tasks run
a language model as a prompt classifier (``integrations.classifier``), image tasks a vision
model with a new head (``integrations.vision``); the loop is the same.

A run folder holds:

- ``config.json`` (the validated configuration) and ``split.json`` (how the data was split,
  with the SHA-256 of the pool and of each split: a run whose data changed is refused),
- ``metrics.jsonl`` (one line a step; the dev score every ``eval_every`` steps),
- ``journal.jsonl`` (every value each step's objective returned, checksummed: enough to
  replay the run from its starting weights, bit for bit on the CPU; see ``journal``),
- ``checkpoint-<step>/`` (trainable weights and optimizer state, see ``checkpoints``;
  ``checkpoint-0`` holds the starting weights until the first save) and ``latest.json``
  naming the newest complete one,
- ``calibration.json`` where the method's ``lr`` is ``"auto"``: what the calibration measured
  and the rates it chose (``runs.calibration``); its queries count in the run's,
- ``summary.json`` (the score before and after, queries, wall time). Scores are the task's
  ``metric`` (accuracy; exact match or F1 for generation), kept as ``dev_acc`` and
  ``test_acc`` whatever the metric, and named in ``summary.json``,
- ``curves.png`` (the loss and the dev score against queries and seconds) at the end, and
  ``tensorboard/`` where ``report_to`` names it (``runs.reporting``),
- ``predictions.jsonl`` and ``eval.json`` once ``zoptim eval`` has run
  (``runs.predictions``),
- ``.lock``, held (``flock``) by the process writing the run.

``train`` is a ``Training``: its phases (open the folder, build, restore, write the start,
evaluate before, the loop, finish) are methods, and every process of a distributed run goes
through the same loop; the lead process alone evaluates and writes. Nothing is written
before the configuration, the model, the data and the folder's own files are checked.

A step the guard skips, or whose update made a weight non-finite, leaves the weights exactly
as they were: where probing walked the weights (in-place evaluation), the run rewinds to its
latest checkpoint and redoes the journal after it, the skipped step writing nothing.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zoptim.integrations.classifier import PromptClassifier
from zoptim.integrations.models import DTYPES, is_decoder, load_model
from zoptim.integrations.schemes import apply_scheme
from zoptim.methods import batch_arguments, model_arguments
from zoptim.noise import compiles as noise_compiles
from zoptim.runs import config, folder as run_folder, journal, machine
from zoptim.runs.calibration import Calibration, check as calibration_check
from zoptim.runs.checkpoints import (CheckpointError, check_checkpoint, load_checkpoint,
                                     load_weights, save_checkpoint, write_json, write_text)
from zoptim.runs.config import TrainConfig
from zoptim.runs.folder import FolderError, Lock, checkpoints, latest_named
from zoptim.runs.guard import LossGuard
from zoptim.runs.predictions import mean_score, predictions
from zoptim.runs import reporting
from zoptim.tasks import Prompt, Splits, load_task
from zoptim.tasks.data import SPLITS
from zoptim.tasks.demonstrations import with_demonstrations
from zoptim.tasks.images import is_image_task


class RunError(RuntimeError):
    pass


class Diverged(RunError):
    pass


class Interrupted(RunError):
    """The run was interrupted (Ctrl-C); the message says where it stands."""


NON_FINITE = "the update made weights non-finite"
CALIBRATION = "calibration.json"  # lr = "auto": what the calibration measured and chose


def _parallel(cfg: TrainConfig):
    """The run's ``Parallel`` when started by ``torchrun`` with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    from zoptim.engine.evaluators.distributed import Parallel

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
    clf: torch.nn.Module  # the objective: loss(examples, slices), score(examples), metric
    params: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    # lr = "auto": the calibration the optimizer's rates come from, or ``None`` while it is
    # still to be done (the optimizer then holds the method's default rates)
    calibration: Calibration | None = None

    @property
    def uncalibrated(self) -> bool:
        return config.auto_rate(self.cfg.method.settings) and self.calibration is None

    def optimizer(self, settings: dict, seed: int, name: str | None = None):
        """A new optimizer over the run's parameters, built as the run builds its own: of the
        run's method (or ``name``) with ``settings`` and ``seed``."""
        return new_optimizer(name or self.cfg.method.name, self.clf, self.params,
                             batch_size(self.cfg, self.splits), settings, seed)


def _language_model(cfg: TrainConfig):
    """``(model, tokenizer, is_decoder)``, checked to take ``model.max_length`` tokens."""
    model, tokenizer, decoder = load_model(cfg.model.name, cfg.model.dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.model.max_length > limit:
        raise RunError(f"model.max_length={cfg.model.max_length} exceeds what {cfg.model.name} "
                       f"takes ({limit} positions); choose at most {limit}")
    return model, tokenizer, decoder


def _decoder_objective(cfg: TrainConfig, splits: Splits):
    """The objective of a multiple-choice, generation or reward task, on a decoder."""
    from zoptim.integrations.choices import ChoiceObjective
    from zoptim.integrations.completions import CompletionObjective

    t = cfg.task
    reward = _reward(t.reward, splits) if t.kind == "reward" else None
    model, tokenizer, decoder = _language_model(cfg)
    if not decoder:
        raise RunError(f"task.kind={t.kind!r} needs a decoder (a causal language model); "
                       f"{cfg.model.name} is an encoder")
    torch.manual_seed(cfg.seed)  # adapters are initialized from the run's seed
    if t.kind == "multiple_choice":
        return ChoiceObjective(model, tokenizer, cfg.model.max_length, t.length_normalized)
    if reward is not None:
        from zoptim.integrations.rewards import RewardObjective

        return RewardObjective(model, tokenizer, reward, cfg.model.max_length, t.max_new_tokens)
    return CompletionObjective(model, tokenizer, cfg.model.max_length, t.metric,
                               t.max_new_tokens, t.objective)


def _reward(name: str, splits: Splits):
    """The reward task's reward function, found and its rows checked before the model loads:
    a missing module or a row a built-in reward cannot score fails in a second."""
    from zoptim.tasks.rewards import RewardError, check_rows, load_reward

    check_rows(name, [*splits.train, *splits.dev, *splits.test])
    try:
        return load_reward(name)
    except RewardError as err:
        raise RunError(str(err)) from None


def _prompt_classifier(cfg: TrainConfig, splits: Splits) -> PromptClassifier:
    t = cfg.task
    if len(splits.labels) != len(t.label_words):
        raise RunError(f"the task has {len(splits.labels)} labels {splits.labels} but "
                       f"{len(t.label_words)} label words are given (task.label_words)")
    model, tokenizer, decoder = _language_model(cfg)
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


def _demonstrations(cfg: TrainConfig, splits: Splits, images: bool) -> Splits:
    """``splits`` with the task's in-context demonstrations before every prompt."""
    t = cfg.task
    if images or (t.kind == "classification" and not is_decoder(cfg.model.name)):
        raise RunError(f"task.demonstrations puts examples before a decoder's prompt; "
                       f"{cfg.model.name} is not a decoder")
    prompt = Prompt(t.template, tuple(t.label_words)) if t.kind == "classification" else None
    try:
        return with_demonstrations(splits, t.demonstrations, t.seed, prompt)
    except ValueError as err:
        raise RunError(f"task.demonstrations: {err}") from None


def build(cfg: TrainConfig, calibration: Calibration | None = None) -> Run:
    """Everything a run needs, at its starting weights (adapters and new heads are initialized
    from ``cfg.seed``). A method whose ``lr`` is ``"auto"`` takes its rates and its spent
    queries from ``calibration`` (``runs.calibration``), or its default rates until it is
    calibrated (``calibrate``)."""
    t = cfg.task
    splits = load_task(t.name, t.path, train=t.train, dev=t.dev, test=t.test, seed=t.seed,
                       shots=t.shots, text_column=t.text_column, label_column=t.label_column,
                       labels=t.labels, kind=t.kind)
    images = is_image_task(t.name)
    make = _image_classifier if images else \
        _prompt_classifier if t.kind == "classification" else _decoder_objective
    if t.demonstrations:
        splits = _demonstrations(cfg, splits, images)
    try:
        clf = make(cfg, splits)
        apply_scheme(clf, cfg.model.scheme, lora_r=cfg.model.lora_r,
                     lora_alpha=cfg.model.lora_alpha, virtual_tokens=cfg.model.virtual_tokens)
    except ValueError as err:  # a model that cannot be loaded, a scheme it does not take
        raise RunError(str(err)) from err
    params = {n: p for n, p in clf.named_parameters() if p.requires_grad}
    _check_rank(cfg, params)
    opt = new_optimizer(cfg.method.name, clf, params, batch_size(cfg, splits),
                        _settings(cfg, calibration), cfg.seed)
    if calibration is not None:
        opt.queries = calibration.queries
    return Run(cfg, splits, clf, params, opt, calibration)


def _settings(cfg: TrainConfig, calibration: Calibration | None) -> dict:
    """The method's settings as the optimizer takes them: ``lr = "auto"`` replaced by the
    calibrated rates, or left to the method's default until they are known."""
    settings = {k: v for k, v in cfg.method.settings.items() if v != "auto"}
    return settings if calibration is None else {**settings, **calibration.settings}


def new_optimizer(name: str, clf, params: dict, examples: int, settings: dict, seed: int):
    """An optimizer of method ``name`` with ``settings`` over ``params``, given the model
    (``clf``) or the batch's size (``examples``) where the method takes them."""
    cls = config.method_class(name)
    return cls(list(params.values()), seed=seed, **settings, **model_arguments(cls, clf),
               **batch_arguments(cls, examples))


def calibrate(run: Run, log=print) -> Calibration:
    """Choose the rates of a run whose ``lr`` is ``"auto"`` (``runs.calibration``): the run's
    optimizer is built again with them, the calibration's queries counted, as ``build`` does
    from a recorded calibration. The weights are left as they were."""
    from zoptim.runs import calibration as cal

    settings = _settings(run.cfg, None)
    try:
        found = cal.calibrate(
            lambda seed, rates: run.optimizer({**settings, **rates}, seed),
            lambda ex: step_loss(run, ex),
            lambda ex: float(run.clf.loss(ex)), list(run.params.values()), run.splits.train,
            steps=run.cfg.steps, batch_size=batch_size(run.cfg, run.splits), seed=run.cfg.seed,
            keys=cal.calibrated_keys(run.cfg.method.settings, run.opt.defaults))
    except cal.CalibrationError as err:
        raise RunError(str(err)) from None
    run.opt = run.optimizer(_settings(run.cfg, found), run.cfg.seed)
    run.opt.queries = found.queries
    run.calibration = found
    log(found.line())
    return found


def batch_size(cfg: TrainConfig, splits: Splits) -> int:
    """The examples of a training batch: ``batch_size``, or every training example if fewer."""
    return min(cfg.batch_size, len(splits.train))


def batch(run: Run, step: int) -> list:
    """The training batch of ``step``: a function of the seed and the step alone, so a resumed
    run sees the same batches."""
    rng = random.Random(f"{run.cfg.seed}:{step}")
    return rng.sample(run.splits.train, batch_size(run.cfg, run.splits))


def step_loss(run: Run, examples: list):
    """The optimizer's closure for a step on ``examples``: the run's loss on them. Batched
    queries call it with the number of slices to stack (and the method's own keywords)."""
    return lambda slices=None, **how: run.clf.loss(examples, slices, **how)


def _last_elapsed(path: Path) -> float:
    """The training time (``elapsed_s``) of the last step kept in ``metrics.jsonl``: where a
    resumed run's clock starts (0 for a new run)."""
    if not path.exists():
        return 0.0
    lines = path.read_text(errors="replace").splitlines()
    return float(json.loads(lines[-1])["elapsed_s"]) if lines else 0.0


def _truncate_jsonl(path: Path, below_step: int) -> None:
    """Keep the complete lines of steps before ``below_step`` (later ones are redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) < below_step:
                kept.append(line)
        except (ValueError, AttributeError):
            break  # a torn line: the crash happened there
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def check_data(folder: Path, splits: Splits) -> None:
    """Refuse a run whose data reads back differently from what ``split.json`` recorded (a
    reordered or edited file would give another test set, overlapping the training set)."""
    path = folder / "split.json"
    if not path.exists():
        raise RunError(f"{path} is missing: the run's data cannot be checked")
    try:
        recorded = json.loads(path.read_text()).get("sha256")
    except (ValueError, AttributeError) as err:
        raise RunError(f"{path} is damaged ({err})") from err
    if recorded is None:
        return  # written before data was fingerprinted
    now = splits.record["sha256"]
    changed = [k for k in ("pool", "labels", *SPLITS) if recorded.get(k) != now[k]]
    if changed:
        raise RunError(f"the task's data differs from the data this run was trained on "
                       f"({', '.join(changed)} changed: SHA-256 {now[changed[0]][:12]} against "
                       f"{recorded.get(changed[0], '?')[:12]} recorded in {path}); restore the "
                       "original data (task.path) or start a new run")


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

    def __init__(self, folder: Path | None, cfg: TrainConfig, stack: ExitStack):
        self.journal = self.metrics = self.reporters = None
        if folder is not None:
            self.journal = stack.enter_context(journal.Writer(folder / "journal.jsonl",
                                                              cfg.journal_fsync_every))
            self.metrics = stack.enter_context(open(folder / "metrics.jsonl", "a"))
            self.reporters = stack.enter_context(
                reporting.Reporters(cfg.report_to, folder, json.loads(cfg.model_dump_json())))

    def step(self, entry: journal.Entry, record: dict) -> None:
        if self.journal is not None:
            self.journal.append(entry)
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            self.reporters.log(record)

    def sync(self) -> None:
        if self.journal is not None:
            self.journal.sync()


def finite(params: dict[str, torch.Tensor]) -> bool:
    """Whether every weight is finite (one reduction per tensor, one sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all())


class Training:
    """``zoptim train``, phase by phase; ``run()`` goes through them."""

    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False,
                 progress: bool = True, log=print):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.folder = run_folder.absolute(out)  # the folder named, `..` as written
        self.par = _parallel(cfg)
        self.lead = self.par is None or self.par.rank == 0  # the one process that writes
        self.log = log if self.lead else _quiet
        self.guard = LossGuard(cfg.guard.spike, cfg.guard.window)
        self.summary: dict = {}
        self.run_: Run | None = None
        self.dev: float | None = None
        self.keep_journal = 0  # bytes of the journal that stay (the rest is redone)

    def run(self) -> dict:
        try:
            had_run = self.open_folder()
            self.build(had_run)
            with self._lock(had_run):
                self.restore(had_run)
                self.write_start(had_run)
                self.evaluate_before()
                self.loop()
                return self.finish()
        except KeyboardInterrupt:
            raise Interrupted(self._where()) from None

    def _where(self) -> str:
        if self.run_ is None or not (self.folder / "config.json").exists():
            return "interrupted before training started; nothing was written"
        return (f"interrupted at step {self.run_.opt.steps} of {self.cfg.steps}; every finished "
                f"step is in {self.folder / 'journal.jsonl'}: continue with "
                f"zoptim train --out {self.folder} --resume")

    # -- phases -------------------------------------------------------------------------------
    def open_folder(self) -> bool:
        """Refuse a folder that holds another run, someone else's files, or this run without
        ``resume``; check a resumed run's configuration and that its ``report_to``
        destinations are installed. Writes nothing."""
        try:
            reporting.check(self.cfg.report_to)
            had_run = run_folder.check(self.folder, self.resume)
        except FolderError as err:
            raise RunError(str(err)) from None
        if self.par is not None:
            _barrier()  # every rank has looked at the folder before the lead writes to it
        if had_run:
            saved = _saved_config(self.folder)
            if saved.model_dump(exclude={"steps"}) != self.cfg.model_dump(exclude={"steps"}):
                raise RunError(f"{self.folder} was started with a different configuration; "
                               "resume it with the same one (only steps may change)")
        return had_run

    def build(self, had_run: bool) -> None:
        """The run, its rates calibrated (``lr = "auto"``): a run already started takes the
        calibration it recorded (``restore`` calibrates one that recorded none at step 0), a
        new one calibrates now (every process alike: the calibration is a function of the
        seed and the data)."""
        self.run_ = build(self.cfg, read_calibration(self.folder) if had_run else None)
        if not had_run and self.run_.uncalibrated and self.cfg.steps > 0:
            calibrate(self.run_, self.log)  # a run of no steps needs no rate
        if self.par is not None:
            self.par.attach(self.run_.opt)

    @contextmanager
    def _lock(self, had_run: bool):
        """Hold the folder's lock (the lead), then look again: another process may have
        started a run there since ``open_folder`` looked. A new run that fails or is
        interrupted before its first step removes what it wrote (its calibration included)."""
        if not self.lead:
            yield
            return
        lock = Lock(self.folder)
        try:
            lock.acquire()
        except FolderError as err:
            raise RunError(str(err)) from None
        try:
            if run_folder.check(self.folder, self.resume) != had_run:
                raise RunError(f"another process started a run in {self.folder} meanwhile; "
                               "choose another --out")
            yield
        except BaseException:
            if not had_run and self.run_.opt.steps == 0:
                lock.discard()  # a new run that failed before its first step leaves nothing
            raise
        finally:
            lock.release()

    def restore(self, had_run: bool) -> None:
        """Resume: check the data, load the latest good checkpoint (or an earlier one, or the
        starting weights) and redo the journalled steps after it. Writes nothing."""
        self.run_.opt.guard = self.guard.decide
        if not (self.resume and had_run):
            return
        check_data(self.folder, self.run_.splits)
        start = self._load_latest_good()
        run = self.run_  # rebuilt where a damaged checkpoint was half loaded
        found = journal.scan(self.folder / "journal.jsonl")
        replayable = getattr(run.opt, "replayable", True)
        later, self.keep_journal = found.from_step(run.opt.steps) if replayable else \
            ([], found.end_before(run.opt.steps))
        roll_forward(run, later, self.guard)
        self._calibrate_resumed()
        run = self.run_
        if run.opt.steps > self.cfg.steps:
            raise RunError(f"the run is at step {run.opt.steps}; steps={self.cfg.steps} would go "
                           f"back: give --steps {run.opt.steps} or more")
        if (problem := found.problem()) is not None:
            self.log(f"warning: {self.folder / 'journal.jsonl'}: {problem}; the run goes on from "
                     f"step {run.opt.steps}, but cannot be replayed from its start any more "
                     f"(zoptim verify {self.folder} says what remains)")
        summary_path = self.folder / "summary.json"
        if summary_path.exists():
            self.summary = json.loads(summary_path.read_text())
        self.dev = self.summary.get("last_dev_acc")
        self.log(f"resumed at step {run.opt.steps} ({run.opt.queries} queries): {start} + "
                 f"{len(later)} journalled steps")

    def _calibrate_resumed(self) -> None:
        """A resumed run of ``lr = "auto"`` with no recorded calibration: one that took no
        step (it ran with ``steps = 0``) calibrates now, at its starting weights; one that
        did lost the record of its rates, and is refused."""
        run = self.run_
        if not run.uncalibrated or self.cfg.steps == 0:
            return
        if run.opt.steps > 0:
            raise RunError(f"{self.folder / CALIBRATION} is missing: the calibrated rates of "
                           f"the run's {run.opt.steps} steps are not known, and a calibration "
                           "now would not find them again; start the run in another folder")
        calibrate(run, self.log)
        run.opt.guard = self.guard.decide
        if self.par is not None:
            self.par.attach(run.opt)

    def _load_latest_good(self) -> str:
        """Load the newest checkpoint that is whole (``latest.json``'s first); where none is,
        keep the starting weights. Returns what was loaded."""
        try:
            named = latest_named(self.folder)
        except FolderError as err:
            self.log(f"warning: {err}")
            named = None
        candidates = ([named] if named else []) + [c for c in checkpoints(self.folder)
                                                   if c != named]
        for candidate in candidates:
            try:
                saved = load_checkpoint(self.run_.params, self.run_.opt, candidate)
            except CheckpointError as err:
                self.log(f"warning: {err}; trying an earlier checkpoint")
                # a half-loaded checkpoint leaves nothing behind
                self.run_ = build(self.cfg, self.run_.calibration)
                if self.par is not None:
                    self.par.attach(self.run_.opt)
                self.run_.opt.guard = self.guard.decide
                continue
            self.guard.history = saved["guard_history"]
            self.guard.first = saved.get("guard_first")
            return candidate.name
        return "the starting weights"

    def write_start(self, had_run: bool) -> None:
        """The lead writes the run's record: the configuration (a resumed run's only when its
        steps grow), the split, the starting checkpoint; the journal and the metrics are cut
        back to the steps kept."""
        if self.par is not None:
            _barrier()  # every rank has read the journal before the lead cuts it
        if not self.lead:
            return
        # before config.json names a run (a run resumed from step 0 has just calibrated)
        if self.run_.calibration is not None and not (self.folder / CALIBRATION).exists():
            write_json(self.folder / CALIBRATION, self.run_.calibration.record())
        if not had_run or _saved_config(self.folder).steps != self.cfg.steps:
            write_json(self.folder / "config.json", json.loads(self.cfg.model_dump_json()))
        if not had_run:
            write_json(self.folder / "split.json", self.run_.splits.record)
            save_checkpoint(self.run_.params, self.run_.opt, self.folder, self.guard.record())
        journal.cut(self.folder / "journal.jsonl", self.keep_journal)
        _truncate_jsonl(self.folder / "metrics.jsonl", self.run_.opt.steps)

    def evaluate_before(self) -> None:
        run = self.run_
        if self.lead and "before" not in self.summary:
            dev0 = run.clf.score(run.splits.dev, self.cfg.eval_batch_size)
            test0 = run.clf.score(run.splits.test, self.cfg.eval_batch_size)
            self.summary = {"metric": run.clf.metric, "before": {"dev_acc": dev0,
                                                                 "test_acc": test0}}
            if run.calibration is not None:
                c = run.calibration
                self.summary["calibration"] = {"settings": c.settings, "queries": c.queries,
                                               "share": c.share, "draws": c.draws}
            write_json(self.folder / "summary.json", self.summary)
            self.log(f"before: dev {dev0:.4f}  test {test0:.4f}  ({len(run.params)} tensors, "
                     f"{sum(p.numel() for p in run.params.values()):,} trainable parameters)")

    def loop(self) -> None:
        cfg, opt = self.cfg, self.run_.opt
        self.start, self.start_queries, self.failures = time.perf_counter(), opt.queries, 0
        self.elapsed_before = 0.0
        if self.lead:
            # a resumed run's clock goes on from the time its kept steps took, and the wall
            # times that follow are this machine's
            self.elapsed_before = _last_elapsed(self.folder / "metrics.jsonl")
            machine.note(self.summary)
        with ExitStack() as stack:
            out = _Outputs(self.folder if self.lead else None, cfg, stack)
            bar = stack.enter_context(self._bar())
            if opt.steps < cfg.steps and noise_compiles():
                self.log("the first step compiles the noise kernel (up to a minute on a fresh "
                         "machine; cached afterwards)")
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
        cfg, opt = self.cfg, self.run_.opt
        examples = batch(self.run_, opt.steps)
        if self.par is not None:
            examples = self.par.shard(examples)
        loss = opt.step(step_loss(self.run_, examples))
        entry = self._settle()
        step, skipped = entry.step + 1, entry.skipped
        record = self._record(step - 1, loss, skipped)
        out.step(entry, record)
        if bar is not None:
            shown = {"reward": f"{record['reward']:.3f}",
                     "spread": f"{record['reward_spread']:.3f}",
                     "gen/s": f"{record['generations_per_s']:.1f}"} if "reward" in record else \
                {"loss": f"{loss:.4f}", "qps": f"{record['queries_per_s']:.1f}"}
            bar.set_postfix(**shown, dev="-" if self.dev is None else f"{self.dev:.3f}",
                            queries=opt.queries)
            bar.update(1)
        stop = self.failures >= cfg.guard.max_consecutive
        if step % cfg.save_every == 0 or step == cfg.steps or stop:
            out.sync()
            self.checkpoint()
        if stop:
            raise Diverged(f"stopped after {self.failures} skipped steps in a row (last: "
                           f"{skipped}); the last good weights are saved in "
                           f"{self.folder / f'checkpoint-{step}'}; lower the learning rate or "
                           "eps and start again")

    def _settle(self) -> journal.Entry:
        """The journal entry of the step just taken. A step the guard skipped, or whose
        update made a weight non-finite, is made to leave the weights exactly as they were."""
        opt = self.run_.opt
        step, skipped = opt.steps - 1, opt.last_skip
        broken = not finite(self.run_.params)
        if broken and skipped is None:
            skipped = NON_FINITE
        self.failures = self.failures + 1 if skipped else 0
        entry = journal.Entry(step, opt.step_seed(step), opt.last_values,
                              [g["lr"] for g in opt.param_groups], opt.queries, skipped)
        if skipped is not None and (broken or getattr(opt.evaluator, "walks", False)):
            self.rewind(entry)
        else:
            self.guard.observe(opt.last_values, skipped)
        return entry

    def rewind(self, entry: journal.Entry) -> None:
        """Put weights and state exactly where the journal says a skipped step leaves them:
        the latest checkpoint, then the journalled steps after it and ``entry`` (the skipped
        step, writing nothing). Needs the journal, which only a single process keeps whole."""
        run = self.run_
        if self.par is not None or not getattr(run.opt, "replayable", True):
            if entry.skipped == NON_FINITE:
                raise RunError(f"step {entry.step}: {NON_FINITE} (lower the learning rate or "
                               "eps); nothing of it was saved")
            return
        saved = _load(run, latest_named(self.folder))
        self.guard.history = saved["guard_history"]
        self.guard.first = saved.get("guard_first")
        later, _ = journal.scan(self.folder / "journal.jsonl").from_step(run.opt.steps)
        if run.opt.steps + len(later) != entry.step:
            raise RunError(f"cannot rewind step {entry.step}: the journal does not reach it")
        roll_forward(run, [*later, entry], self.guard)

    def _record(self, step: int, loss: float, skipped: str | None) -> dict:
        """The step's metrics line (the lead evaluates dev accuracy on schedule)."""
        opt, cfg = self.run_.opt, self.cfg
        session = time.perf_counter() - self.start
        rate = (opt.queries - self.start_queries) / max(session, 1e-9)  # this process's speed
        record = {"step": step, "loss": loss, "queries": opt.queries,
                  "elapsed_s": round(self.elapsed_before + session, 3),
                  "queries_per_s": round(rate, 3)}
        if cfg.task.kind == "reward":  # what reward-only training is judged by
            rewards = [-v for v in opt.last_values]
            record.update(reward=-loss, reward_spread=statistics.pstdev(rewards),
                          generations=opt.queries * cfg.batch_size,
                          generations_per_s=round(rate * cfg.batch_size, 3))
        if skipped:
            record["skipped"] = skipped
            self.log(f"step {step} skipped: {skipped} ({self.failures} in a row)")
        done = step + 1
        if self.lead and (done % cfg.eval_every == 0 or done == cfg.steps):
            self.dev = record["dev_acc"] = self.run_.clf.score(self.run_.splits.dev,
                                                                  cfg.eval_batch_size)
        return record

    def checkpoint(self) -> None:
        if not self.lead:
            return
        save_checkpoint(self.run_.params, self.run_.opt, self.folder, self.guard.record())
        self.summary["last_dev_acc"] = self.dev
        write_json(self.folder / "summary.json", self.summary)

    def _newest_is_whole(self) -> bool:
        """Whether ``latest.json`` names a whole checkpoint of the run's current step."""
        try:
            named = latest_named(self.folder)
            return named is not None and named.name == f"checkpoint-{self.run_.opt.steps}" \
                and check_checkpoint(named) is not None
        except (FolderError, CheckpointError):
            return False

    def finish(self) -> dict:
        run, opt = self.run_, self.run_.opt
        if not self.lead:
            return {"rank": self.par.rank, "steps": opt.steps, "queries": opt.queries}
        if self.resume and not self._newest_is_whole():
            # a resumed finished run whose newest checkpoint was damaged or missing: its
            # weights were rolled forward from the journal, and are saved again
            self.log(f"repairing: the weights at step {opt.steps} are saved again")
            self.checkpoint()
        if opt.steps == 0:  # no update: the starting model's scores
            self.dev = self.summary["before"]["dev_acc"]
        test = run.clf.score(run.splits.test, self.cfg.eval_batch_size) if opt.steps else \
            self.summary["before"]["test_acc"]
        self.summary["after"] = {"dev_acc": self.dev, "test_acc": test, "steps": opt.steps,
                                 "queries": opt.queries, "skipped_steps": opt.skipped}
        self.summary["wall_s"] = self.summary.get("wall_s", 0.0) + time.perf_counter() - self.start
        self.summary["command"] = ["zoptim", *sys.argv[1:]]
        write_json(self.folder / "summary.json", self.summary)
        if opt.steps:
            try:
                reporting.plot_curves(self.folder)
            except Exception as err:  # a plot is a convenience: a finished run stays finished
                self.log(f"warning: curves.png was not drawn ({type(err).__name__}: {err})")
        before = self.summary.get("before", {})
        self.log(f"after:  dev {self.dev:.4f}  test {test:.4f}  ({opt.steps} steps, "
                 f"{opt.queries} queries; before: dev {before.get('dev_acc', float('nan')):.4f}"
                 f"  test {before.get('test_acc', float('nan')):.4f})")
        return self.summary


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Run (or, with ``resume``, continue) the fine-tune of ``cfg`` in folder ``out``. A resumed
    run loads the latest checkpoint, redoes the journalled steps after it, and continues: its
    final weights equal an uninterrupted run's, bit for bit on the CPU. GRPO, the reward
    tasks' first-order baseline, is trained by TRL instead (``runs.grpo``)."""
    if cfg.method.name == "grpo":
        from zoptim.runs import grpo

        return grpo.train(cfg, out, resume=resume, progress=progress, log=log)
    return Training(cfg, out, resume=resume, progress=progress, log=log).run()


def _load(run: Run, checkpoint: Path | None) -> dict:
    if checkpoint is None:
        raise RunError("the run has no checkpoint")
    try:
        return load_checkpoint(run.params, run.opt, checkpoint)
    except CheckpointError as err:
        raise RunError(f"{err}; zoptim train --resume rolls the run forward from an earlier "
                       "checkpoint or its starting weights") from err


def read_calibration(folder: Path) -> Calibration | None:
    """The calibration a run recorded (``lr = "auto"``), or ``None`` where it has none."""
    path = folder / CALIBRATION
    if not path.exists():
        return None
    try:
        return Calibration.from_record(json.loads(path.read_text()))
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is damaged ({err}); the run's rates cannot be known") from err


def _saved_config(folder: Path, overrides: list[str] = ()) -> TrainConfig:
    """The configuration a run folder was started with, ``overrides`` set over it."""
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder} holds no run (no config.json)")
    try:
        data = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RunError(f"{folder / 'config.json'} is damaged ({err})") from err
    return config.build(config.apply_overrides(data, list(overrides)))


def resumed_config(folder: str | Path, overrides: list[str]) -> TrainConfig | None:
    """What ``zoptim train --out FOLDER --resume`` trains without ``--config``: the run's
    own configuration with ``overrides`` (``--steps``, ``--set``) over it; ``None`` where
    the folder holds no run yet."""
    folder = Path(folder)
    return _saved_config(folder, overrides) if (folder / "config.json").is_file() else None


def _latest(folder: Path) -> Path | None:
    try:
        return latest_named(folder)
    except FolderError as err:
        raise RunError(str(err)) from None


def open_run(folder: str | Path) -> tuple[Run, Path]:
    """The run of a folder at its latest checkpoint, its data checked to be the run's."""
    folder = Path(folder)
    run = build(_saved_config(folder), read_calibration(folder))
    check_data(folder, run.splits)
    checkpoint = _latest(folder)
    if checkpoint is None:
        raise RunError(f"{folder} has no checkpoint yet")
    _load(run, checkpoint)
    return run, checkpoint


def evaluate(folder: str | Path, split: str = "test", log=print) -> float:
    """The run's score on ``split`` at its latest checkpoint. Writes, each whole or not at
    all, ``predictions.jsonl`` (a line an example: ``runs.predictions``) and ``eval.json``
    (the split, the metric, the score and the checkpoint) into the run's folder; where the
    folder cannot be written, says so and returns the score all the same."""
    run, checkpoint = open_run(folder)
    records = predictions(run.clf, getattr(run.splits, split), run.splits.labels,
                          run.cfg.eval_batch_size)
    score = mean_score(records)
    folder = Path(folder)
    try:
        write_text(folder / "predictions.jsonl",
                   "".join(json.dumps({"split": split, **r}) + "\n" for r in records))
        write_json(folder / "eval.json", {"split": split, "metric": run.clf.metric,
                                          "score": score, "examples": len(records),
                                          "checkpoint": checkpoint.name})
    except OSError as err:
        log(f"warning: the predictions were not written ({err})")
    return score


@dataclass
class Audit:
    """What ``audit`` found: the steps replayed from the journal, the checkpoint the replay
    was compared with (and whether the weights were equal), problems, and how ``--resume``
    would recover."""
    steps: int = 0
    queries: int = 0
    compared: str | None = None
    equal: bool | None = None
    problems: list[str] = field(default_factory=list)
    recovery: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and self.equal is True


def _good_checkpoints(folder: Path, audit: Audit) -> dict[int, Path]:
    """The folder's whole checkpoints by step; the damaged ones go into ``audit``."""
    good = {}
    try:
        named = latest_named(folder)
        if named is not None and not named.is_dir():
            audit.problems.append(f"latest.json names {named.name}, which is missing")
    except FolderError as err:
        audit.problems.append(str(err))
    for checkpoint in checkpoints(folder):
        try:
            good[int(check_checkpoint(checkpoint)["step"])] = checkpoint
        except CheckpointError as err:
            audit.problems.append(str(err))
    return good


def _replay_and_compare(run: Run, entries: list[journal.Entry], good: dict[int, Path],
                        result: Audit) -> None:
    """Replay ``entries`` from the starting weights, comparing the weights with the newest
    whole checkpoint the journal reaches, bit for bit."""
    target = max((s for s in good if s <= len(entries)), default=None)
    guard = LossGuard(run.cfg.guard.spike, run.cfg.guard.window)
    roll_forward(run, entries[:target or 0], guard)
    if target is not None:
        saved = load_weights(good[target])
        result.compared = good[target].name
        result.equal = all(torch.equal(saved[n], p.detach()) for n, p in run.params.items())
        if not result.equal:
            result.problems.append(f"the journal replayed to step {target} does not give the "
                                   f"weights of {good[target].name}")
    roll_forward(run, entries[target or 0:], guard)
    result.steps, result.queries = len(entries), run.opt.queries


def _calibration_problems(recorded: Calibration | None, cfg: TrainConfig) -> list[str]:
    """What is wrong with a run's recorded calibration: a choice that does not follow from
    its values, or a calibrated run past step 0 that lost it."""
    if recorded is not None:
        problem = calibration_check(recorded)
        return [] if problem is None else [f"{CALIBRATION}: {problem}"]
    if config.auto_rate(cfg.method.settings) and cfg.steps > 0:
        return [f"{CALIBRATION} is missing: the run's rates are not known (--resume "
                "calibrates again only a run that took no step)"]
    return []


def audit(folder: str | Path) -> Audit:
    """Check a run folder: its data against ``split.json``, its journal line by line, its
    checkpoints file by file, and the journal replayed from the starting weights (the model
    not run) against the newest whole checkpoint it reaches, bit for bit."""
    folder = Path(folder)
    cfg = _saved_config(folder)
    result = Audit()
    recorded = read_calibration(folder)
    result.problems += _calibration_problems(recorded, cfg)
    run = build(cfg, recorded)
    try:
        check_data(folder, run.splits)
    except RunError as err:
        result.problems.append(str(err))
    found = journal.scan(folder / "journal.jsonl")
    if not (folder / "journal.jsonl").exists():
        result.problems.append("journal.jsonl is missing")
    elif (problem := found.problem()) is not None:
        result.problems.append(f"journal.jsonl: {problem}")
    good = _good_checkpoints(folder, result)
    if not getattr(run.opt, "replayable", True):
        result.problems.append(f"the first-order method {cfg.method.name!r} cannot be replayed "
                               "from its loss values")
        return result
    entries = found.prefix()
    _replay_and_compare(run, entries, good, result)
    start = f"{good[max(good)].name}" if good else "the starting weights"
    resumed_at = max(max(good, default=0), len(entries))
    result.recovery = (f"--resume continues from {start} and the journal, at step {resumed_at}"
                       f"{' (all the configured steps)' if resumed_at >= cfg.steps else ''}")
    return result

