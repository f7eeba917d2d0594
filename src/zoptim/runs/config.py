"""Run configuration: TOML or YAML files, overridden by ``key=value`` flags, validated before
any work starts."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError,
                      model_validator)

from zoptim.parts.settings import is_rate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str | None = None  # default: minilm-l6 for text tasks, efficientnet-lite0 for images
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    scheme: Literal["full", "head", "lora", "prefix", "prompt"] = "full"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    virtual_tokens: int = Field(10, ge=1)
    max_length: int = Field(128, ge=8)
    image_size: int | None = Field(None, ge=8)  # image models; default: the model's own
    weights: str | None = None  # image models: a local checkpoint (state dict) to start from


class TaskConfig(_Strict):
    name: str = "mr"
    path: str | None = None
    # What the model learns (``tasks.kinds``): label words or a head (classification), an
    # option's log-likelihood (multiple_choice), completions (generation: SFT, scored by
    # ``metric`` on greedy decodings of at most ``max_new_tokens`` tokens).
    # reward: prompts and a reward of greedy completions (``tasks.rewards``), maximized.
    kind: Literal["classification", "multiple_choice", "generation", "reward"] = \
        "classification"
    metric: Literal["f1", "exact_match"] = "f1"
    # generation: what the steps lower: the completions' loss, or 1 - metric of greedy
    # generations (a metric as the objective, MeZO's non-differentiable objectives)
    objective: Literal["loss", "f1", "exact_match"] = "loss"
    # reward tasks: a built-in reward ("countdown", "conciseness") or "module:function"
    reward: str | None = None
    demonstrations: int = Field(0, ge=0)  # in-context examples before every prompt (decoders)
    max_new_tokens: int = Field(32, ge=1)
    length_normalized: bool = False  # multiple choice: the mean log-likelihood of a token
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None
    template: str = "{text} It was {label}."
    label_words: list[str] = ["terrible", "great"]
    train: int = Field(1000, ge=1)
    dev: int = Field(500, ge=1)
    test: int = Field(1000, ge=1)
    shots: int | None = Field(None, ge=1)  # k-shot: this many training examples per label
    seed: int = 42


class MethodConfig(_Strict):
    """The method and its settings: the parameters of its class's constructor, by name (the
    class's defaults for the rest). Each key must be one of them and each value of its
    annotated type, except the ones a run passes itself (``params``, ``seed``, and ``model``
    and ``examples`` where the method takes them). A zeroth-order method trained on a loss
    calibrates its learning rate before the first step (``lr = "auto"``,
    ``runs.calibration``) unless one is given."""

    name: str = "zo-muon"
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _settings_fit_the_signature(self):
        check_settings(self.name, self.settings)
        return self


class GuardConfig(_Strict):
    """Divergence guards (``runs.guard.LossGuard``): a step whose losses are not finite is
    skipped, and so, once ``min(5, window)`` steps have been accepted, is a step whose level
    (the median of its losses) exceeds ``spike`` times the highest level among the run's
    first accepted step and the last ``window`` accepted ones (while that level is above 0).
    After ``max_consecutive`` failed steps in a row (skipped, or leaving a weight
    non-finite) the run stops with its last good state saved."""

    spike: float = Field(10.0, ge=0)  # 0 disables the spike test (the default for rewards)
    window: int = Field(20, ge=1)
    max_consecutive: int = Field(5, ge=1)


class ParallelConfig(_Strict):
    """Under ``torchrun``: ``data`` ranks split each batch, the others (``world / data``)
    split each step's evaluations (``zoptim.engine.evaluators.distributed``). Ignored in a single process."""

    data: int = Field(1, ge=1)


class TrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    method: MethodConfig = Field(default_factory=MethodConfig)
    steps: int = Field(150, ge=0)  # 0: evaluate the starting model (zero-shot, ICL)
    batch_size: int = Field(16, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    save_every: int = Field(50, ge=1)
    journal_fsync_every: int = Field(1, ge=0)  # steps between fsyncs of the journal (0: at saves)
    guard: GuardConfig = GuardConfig()
    parallel: ParallelConfig = ParallelConfig()
    seed: int = 0
    # where the metrics go besides metrics.jsonl: "tensorboard", "wandb", "mlflow"
    # (runs.reporting), as Hugging Face's Trainer's report_to
    report_to: list[str] = []

    @model_validator(mode="after")
    def _model_fits_task(self):
        from zoptim.tasks.images import is_image_task

        images = is_image_task(self.task.name)
        _suite_defaults(self.task)
        _reward_defaults(self.task)
        if self.model.name is None:
            self.model.name = "efficientnet-lite0" if images else \
                "minilm-l6" if self.task.kind == "classification" else "smollm2-135m"
        _check_model_kind(self.task.name, self.model.name, images)
        _check_applies(self, images)
        _check_kind(self.task)
        _check_gradient_free(self)
        _check_per_example(self)
        _default_rate(self)
        if not images:
            _check_label_words(self.task)
        return self


def _check_gradient_free(cfg: "TrainConfig") -> None:
    """A reward or a metric of generations has no gradient: refuse the methods that need one,
    and leave the loss guard's jump test off for rewards (whose levels may be any sign), unless
    it is asked for."""
    from zoptim.methods.first_order import BASELINES

    _check_reward_only(cfg)
    if cfg.task.kind != "reward" and cfg.task.objective == "loss":
        return
    if cfg.method.name in BASELINES or cfg.method.name == "forward-gradient":
        raise ValueError(f"method {cfg.method.name!r} follows a gradient, and a reward or a "
                         "metric of greedy generations has none: choose a zeroth-order method "
                         "(es, zo-muon, mezo, ...)")
    if cfg.task.kind == "reward" and "spike" not in cfg.guard.model_fields_set:
        cfg.guard = cfg.guard.model_copy(update={"spike": 0.0})


def _default_rate(cfg: "TrainConfig") -> None:
    """A zeroth-order method trained on a loss calibrates its rates unless one is given
    (``lr = "auto"``, ``runs.calibration``); anything else needs rates of its own, or takes
    its class's defaults."""
    from zoptim.methods import METHODS

    settings, name = cfg.method.settings, cfg.method.name
    cls = METHODS.get(name)
    lossy = cfg.task.kind != "reward" and cfg.task.objective == "loss"
    # a method that evaluates again after its step chooses among steps of its own rate
    calibrates = cls is not None and not cls.evaluates_after_update
    if "lr" not in settings and calibrates and lossy:
        settings["lr"] = "auto"
    if not auto_rate(settings):
        return
    if not calibrates:
        raise ValueError(f"method {name!r} takes a learning rate: \"auto\" calibrates the "
                         "zeroth-order methods that step once a step")
    if not lossy:
        raise ValueError("a rate of \"auto\" is scaled to the task's loss; a reward or a metric "
                         "of generations has none: give a learning rate")


def auto_rate(settings: dict) -> bool:
    """Whether a method's settings ask for calibrated rates (``lr`` or another rate
    ``"auto"``)."""
    return any(v == "auto" for k, v in settings.items() if is_rate(k))


def _check_per_example(cfg: "TrainConfig") -> None:
    """Refuse per-example directions (GRZO) where an example's loss is not a forward pass of
    its own rows, a batch too small for a group, or a batch split across processes."""
    from zoptim.methods import METHODS

    name = cfg.method.name
    if not getattr(METHODS.get(name), "per_example_directions", False):
        return
    scored = cfg.task.kind in ("classification", "multiple_choice") or (
        cfg.task.kind == "generation" and cfg.task.objective == "loss")
    if not scored:
        raise ValueError(f"method {name!r} evaluates each example of the batch at its own "
                         "perturbation in one forward pass: it serves classification, multiple "
                         "choice and generation trained on its loss (SFT), not a metric of "
                         "greedy generations nor a reward (decoding goes token by token)")
    if min(cfg.batch_size, cfg.task.train) < 2:
        raise ValueError(f"method {name!r} normalizes within the batch: batch_size and "
                         "task.train must be at least 2")
    if cfg.parallel.data > 1:
        raise ValueError(f"method {name!r} draws one direction per example of the whole "
                         "batch: it cannot split the batch across processes (parallel.data)")


def _check_reward_only(cfg: "TrainConfig") -> None:
    """Refuse what only a reward task can take (GRPO, per-prompt normalization), and a GRPO
    step whose completions its micro-batches do not divide."""
    from zoptim.methods.first_order import REWARD_BASELINES

    name, reward = cfg.method.name, cfg.task.kind == "reward"
    if name in REWARD_BASELINES:
        if not reward:
            raise ValueError(f"method {name!r} trains on a reward: it needs a reward task "
                             "(task.kind = \"reward\")")
        REWARD_BASELINES[name](**cfg.method.settings).micro_batch(cfg.batch_size)
    if cfg.method.settings.get("per_prompt") and not reward:
        raise ValueError("method.settings.per_prompt normalizes each prompt's rewards across "
                         "the members: it needs a reward task (task.kind = \"reward\")")


def _check_model_kind(task_name: str, model_name: str, images: bool) -> None:
    """Fail unless the model is an image model exactly when the task is an image task."""
    from zoptim.integrations.vision import VISION_MODELS, is_vision_model

    if images and not is_vision_model(model_name):
        raise ValueError(f"task {task_name!r} is an image task; model.name must be an "
                         f"image model ({', '.join(VISION_MODELS)}), not {model_name!r}")
    if not images and is_vision_model(model_name):
        raise ValueError(f"model {model_name!r} is an image model; task.name must be "
                         f"an image task, not {task_name!r}")


def _suite_defaults(task: TaskConfig) -> None:
    """A suite task (``tasks.suite``) sets its kind, and a classification task its label words
    and a template that leaves its prompt as it is, unless they are given."""
    from zoptim.tasks.suite import SUITE

    suite = SUITE.get(task.name)
    if suite is None:
        return
    given = task.model_fields_set
    if "kind" in given and task.kind != suite.kind:
        raise ValueError(f"task {task.name!r} is a {suite.kind} task; task.kind={task.kind!r} "
                         "does not apply to it")
    task.kind = suite.kind
    if suite.label_words and "label_words" not in given:
        task.label_words = list(suite.label_words)
    if suite.label_words and "template" not in given:
        task.template = suite.template


def _reward_defaults(task: TaskConfig) -> None:
    """``task.name = "countdown"`` is a reward task with the Countdown reward unless another
    reward is given."""
    if task.name != "countdown":
        return
    if "kind" in task.model_fields_set and task.kind != "reward":
        raise ValueError(f"task 'countdown' is a reward task; task.kind={task.kind!r} does not "
                         "apply to it")
    task.kind = "reward"
    task.reward = task.reward or "countdown"


def _check_reward(task: TaskConfig) -> None:
    if task.kind != "reward":
        if task.reward is not None:
            raise ValueError(f"task.reward scores the completions of a reward task; this is a "
                             f"{task.kind} task (set task.kind = \"reward\")")
        return
    if task.name not in ("file", "countdown"):
        raise ValueError(f"a reward task reads prompts from task.name = 'file' (with "
                         f"task.path) or generates them (countdown), not {task.name!r}")
    if task.reward is None:
        raise ValueError("a reward task needs task.reward: 'countdown', 'conciseness' or "
                         "the user's 'module:function'")
    if task.demonstrations:
        raise ValueError("task.demonstrations puts solved examples before a prompt; a reward "
                         "task has no solutions to show")


def _check_kind(task: TaskConfig) -> None:
    """Fail unless a task of another kind than classification is a suite task of that kind
    or a user's file, without label-based settings."""
    from zoptim.tasks.suite import SUITE

    if task.objective != "loss" and task.kind != "generation":
        raise ValueError(f"task.objective={task.objective!r} is a metric of generations; a "
                         f"{task.kind} task trains on its loss")
    _check_reward(task)
    if task.kind == "classification":
        return
    if task.name not in ("file", "countdown") and task.name not in SUITE:
        raise ValueError(f"task.kind={task.kind!r} reads a user's file: task.name must be "
                         f"'file' (with task.path) or a task of that kind, not {task.name!r}")
    if task.shots is not None:
        raise ValueError(f"task.shots draws examples per label; a {task.kind} task has no "
                         "labels: give task.train instead")


def _check_label_words(task: TaskConfig) -> None:
    """Fail if a text task's ``labels`` and ``label_words`` differ in length."""
    if task.labels is not None and len(task.labels) != len(task.label_words):
        raise ValueError("task.labels and task.label_words must have the same length")


class ConfigError(ValueError):
    pass


def _parse_value(text: str) -> Any:
    """A flag's value: a TOML literal where it parses as one (numbers, booleans, lists,
    quoted strings), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as err:
        raise ConfigError(f"{p}: cannot parse ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table of settings")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys: ``["task.train=200", "method.settings.lr=1e-3"]``."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a table")
        node[parts[-1]] = _parse_value(value)
    return data


# Settings that only some runs read: (section, key, whether it applies to a config, where).
_APPLIES = [
    ("model", "weights", lambda c, images: images, "image models"),
    ("model", "image_size", lambda c, images: images, "image models"),
    ("model", "lora_r", lambda c, images: c.model.scheme == "lora", "scheme = \"lora\""),
    ("model", "lora_alpha", lambda c, images: c.model.scheme == "lora", "scheme = \"lora\""),
    ("model", "virtual_tokens", lambda c, images: c.model.scheme in ("prefix", "prompt"),
     "scheme = \"prefix\" or \"prompt\""),
    ("task", "template", lambda c, images: not images and c.task.kind == "classification",
     "text classification"),
    ("task", "label_words", lambda c, images: not images and c.task.kind == "classification",
     "text classification"),
]


def _check_applies(cfg: "TrainConfig", images: bool) -> None:
    """Refuse, by name, a setting given another value than its default where the run would
    not read it (``model.weights`` on a text model): it would be ignored in silence."""
    from zoptim.runs.reporting import check_names

    check_names(cfg.report_to)
    for section, key, applies, where in _APPLIES:
        part = getattr(cfg, section)
        if getattr(part, key) != type(part).model_fields[key].get_default(call_default_factory=True) \
                and not applies(cfg, images):
            raise ValueError(f"{section}.{key} is read only for {where}; this run would ignore "
                             "it: leave it out")


def method_class(name: str):
    """The optimizer class of a run's ``method.name``: a zeroth-order method, or a first-order
    baseline that sets the ceiling (``adamw``; ``grpo`` on a reward task)."""
    from zoptim.methods import METHODS
    from zoptim.methods.first_order import BASELINES, REWARD_BASELINES

    methods = {**METHODS, **BASELINES, **REWARD_BASELINES}
    if name not in methods:
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of "
                          f"{', '.join(methods)}")
    return methods[name]


# What a run passes to a method itself (``runs.run.new_optimizer``), and where it comes from.
_FROM_THE_RUN = {"params": "the model's trainable parameters", "seed": "the config's seed",
                 "model": "the model", "examples": "batch_size"}


def _run_supplied(cls) -> dict[str, str]:
    """The constructor parameters of ``cls`` that a run sets: the parameters, the seed, and
    the model and the batch's size where the method takes them."""
    from zoptim.methods import batch_arguments, model_arguments

    passed = {"params", "seed", *model_arguments(cls, None), *batch_arguments(cls, 2)}
    return {key: _FROM_THE_RUN[key] for key in passed}


@functools.cache
def method_settings(cls) -> dict[str, tuple[Any, TypeAdapter]]:
    """The settings a method class takes: each parameter of its constructor that a run does
    not set, with its annotation and a strict validator of it."""
    hints = typing.get_type_hints(cls.__init__)
    run = _run_supplied(cls)
    return {name: (hints.get(name, Any), TypeAdapter(hints.get(name, Any),
                                                     config=ConfigDict(strict=True)))
            for name in inspect.signature(cls).parameters if name not in run}


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _as_read(hint, value):
    """``value`` as the parameter takes it: a file has lists, no tuples."""
    return tuple(value) if typing.get_origin(hint) is tuple and isinstance(value, list) \
        else value


def check_settings(name: str, settings: dict) -> None:
    """Refuse a setting the method ``name`` does not take, one the run sets itself, and a
    value not of the parameter's annotated type (a rate may also be ``"auto"``), naming the
    key; impossible values of the right type are left to the method's own checks
    (``_check_method``)."""
    cls = method_class(name)
    accepted, run = method_settings(cls), _run_supplied(cls)
    for key, value in settings.items():
        if key in run:
            raise ConfigError(f"method.settings: {key} is set by the run (from {run[key]}), "
                              "not in the settings")
        if key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"method.settings.{key}: method {name!r} takes no setting "
                              f"{key!r}{hint}; its settings are {', '.join(accepted)}")
        if isinstance(value, str) and value == "auto":
            if is_rate(key):
                continue
            raise ConfigError(f"method.settings.{key} = \"auto\": only rates (lr, vector_lr, "
                              "...) are calibrated; give a value")
        hint, adapter = accepted[key]
        try:
            adapter.validate_python(_as_read(hint, value))
        except ValidationError:
            rate = " or \"auto\"" if is_rate(key) else ""
            raise ConfigError(f"method.settings.{key}: expected {_type_name(hint)}{rate}, got "
                              f"{value!r}") from None


def _check_method(method: MethodConfig) -> None:
    """Build the method once on a dummy parameter: impossible values (a negative rate, a
    rank of 0) are reported by the optimizer's own checks, before any model is loaded. The
    keys and types of the settings were checked against its signature (``check_settings``)."""
    import torch

    from zoptim.methods import batch_arguments, model_arguments

    cls = method_class(method.name)
    dummy = torch.nn.Linear(2, 2)
    extra = {**model_arguments(cls, dummy), **batch_arguments(cls, 2)}
    # a rate to be calibrated stands in as 1
    given = {k: 1.0 if v == "auto" else v for k, v in method.settings.items()}
    try:
        cls(dummy.parameters(), **given, **extra)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method.settings: {err}") from err


def _check_task(task: TaskConfig) -> None:
    from zoptim.tasks import Prompt

    try:
        Prompt(task.template, tuple(task.label_words))
    except ValueError as err:
        raise ConfigError(f"task.template / task.label_words: {err}") from err
    downloads = ("cifar10", "cifar100")  # their path is a download folder
    if task.path and task.name not in downloads and not Path(task.path).exists():
        raise ConfigError(f"task.path: {task.path} does not exist")


def build(data: dict) -> TrainConfig:
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):  # already one line that names its key
            raise ConfigError(str(cause)) from err
        where = ".".join(str(x) for x in first["loc"]) or "config"
        raise ConfigError(f"{where}: {first['msg']} (got {first.get('input')!r})") from err
    _check_method(cfg.method)
    _check_task(cfg.task)
    return cfg


def load(path: str | None, overrides: list[str]) -> TrainConfig:
    return build(apply_overrides(read_file(path) if path else {}, overrides))
