"""A run's metrics where people watch runs, as Hugging Face's ``Trainer`` sends them: to each
destination ``report_to`` names, TensorBoard (event files in ``RUN/tensorboard``), Weights &
Biases or MLflow (their own runs, named after the folder); a destination whose package is not
installed is refused before the run writes anything. At the end, ``RUN/curves.png``: the
training loss and the dev score against queries and seconds.

Every line of ``metrics.jsonl`` goes to each destination as scalars at its step (``step``
counts from 1 there, as the steps taken); ``metrics.jsonl`` stays the record a run resumes
from.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# destination: (the package it needs, what to install)
DESTINATIONS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                "mlflow": ("mlflow", "mlflow")}


class ReportError(ValueError):
    """A destination that cannot be reported to; the message says what to install."""


def check_names(names: list[str]) -> None:
    """Refuse a destination that is not one of ``DESTINATIONS``."""
    for name in names:
        if name not in DESTINATIONS:
            raise ReportError(f"report_to: {name!r} is not one of {', '.join(DESTINATIONS)}")


def check(names: list[str]) -> None:
    """Refuse a destination that is unknown or whose package is not installed: what a run
    that trains checks before it writes anything (evaluating or verifying it later reports
    nothing, and needs none of them)."""
    check_names(names)
    for name in names:
        package, install = DESTINATIONS[name]
        if importlib.util.find_spec(package) is None:
            raise ReportError(f"report_to {name!r} needs the {package} package: pip install "
                              f"{install}")


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, folder: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, folder: Path, config: dict):
        import wandb

        self.run = wandb.init(name=folder.name, dir=str(folder), config=config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, folder: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=folder.name)
        mlflow.log_params({k: json.dumps(v) for k, v in config.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_MAKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Reporters:
    """The destinations of ``report_to``, each given every metrics line."""

    def __init__(self, names: list[str], folder: Path, config: dict):
        check(names)
        self.open = []
        try:
            for name in names:
                self.open.append(_MAKERS[name](folder, config))
        except BaseException:
            self.close()  # the destinations opened before the one that failed
            raise

    def log(self, record: dict) -> None:
        values = _numbers(record)
        for destination in self.open:
            destination.log(int(record["step"]) + 1, values)

    def close(self) -> None:
        for destination in self.open:
            destination.close()
        self.open = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _curve(ax, lines: list[dict], x: str, key: str) -> None:
    """``key`` against ``x`` over the metrics lines that hold it."""
    rows = [r for r in lines if r.get(key) is not None]
    ax.plot([r[x] for r in rows], [r[key] for r in rows], marker="." if key == "dev_acc" else "")
    ax.set_xlabel("queries" if x == "queries" else "seconds")
    ax.grid(alpha=0.3)


def plot_curves(folder: Path) -> Path | None:
    """``curves.png`` from ``metrics.jsonl``: the loss (or reward) and the dev score against
    queries and seconds; ``None`` without matplotlib or without a step."""
    try:  # a figure of its own, not pyplot's: a notebook's backend and figures stay as they are
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    if not lines:
        return None
    train = "reward" if "reward" in lines[0] else "loss"
    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharey="row")
    for column, x in enumerate(("queries", "elapsed_s")):
        for row, key in enumerate((train, "dev_acc")):
            _curve(axes[row][column], lines, x, key)
            axes[row][column].set_ylabel(train if row == 0 else "dev score")
    fig.suptitle(folder.name)
    fig.tight_layout()
    path = folder / "curves.png"
    fig.savefig(path, dpi=100)
    return path
