"""A benchmark's folder (``zoptim bench --out``), under the rules of a run's folder
(``runs.folder``): checked before anything is written, locked while a process writes, and
nothing written outside it.

A folder holds a benchmark when it has the benchmark's mark (``bench.json``, written when a
benchmark starts there) or cells of one; a folder of other files, or a ``zoptim train`` run,
is refused as it is. Method labels and grid points name folders inside it, so they must be
plain names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from zoptim.runs.folder import FolderError, Lock, absolute, usable

MARK = "bench.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*")


class BenchError(ValueError):
    """A benchmark that cannot run as configured; the message says why."""


def check_name(what: str, name: object) -> None:
    """Refuse a label or grid point that is not a plain name for a folder inside ``--out``."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise BenchError(f"{what} {name!r} names a folder of the benchmark: use letters, "
                         "digits and . _ + = , - only (no separators, no '..')")


def safe_name(text: str) -> str:
    """``text`` as a plain name (``NAME``): each character outside it as ``_``, ``..`` as
    ``_.``, and an ``x`` before a first character that may not start one."""
    name = re.sub(r"[^A-Za-z0-9._+=,-]", "_", text).replace("..", "_.")
    return name if NAME.fullmatch(name) else "x" + name


def holds_benchmark(folder: Path) -> bool:
    """Whether ``folder`` holds a benchmark: its mark, or cells of one."""
    kept = (MARK, "fidelity.json", "calibration.json")  # the kinds' own records
    return any((folder / name).is_file() for name in kept) or \
        any(folder.glob("*/seed-*/config.json")) or any(folder.glob("*/grid/*/config.json"))


def check(folder: Path) -> None:
    """Refuse an ``--out`` that is a file, cannot be made or written, holds a ``zoptim
    train`` run, or holds files that are not a benchmark's. Writes nothing."""
    try:
        if not usable(folder):
            return
    except FolderError as err:
        raise BenchError(str(err)) from None
    if (folder / "config.json").is_file():
        raise BenchError(f"{folder} holds a zoptim train run; choose another --out")
    foreign = sorted(p.name for p in folder.iterdir() if p.name != ".lock")
    if foreign and not holds_benchmark(folder):
        raise BenchError(f"{folder} is not empty and holds no benchmark (it has "
                         f"{', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); "
                         "choose another --out, nothing was changed")


class Claimed:
    """``folder`` checked, locked and marked as a benchmark's for as long as it is written."""

    def __init__(self, folder: Path, config_path: str | Path):
        self.folder, self.config_path = absolute(folder), str(config_path)
        self.lock = Lock(folder)

    def __enter__(self) -> Path:
        check(self.folder)
        try:
            self.lock.acquire()
        except FolderError as err:
            raise BenchError(str(err)) from None
        try:
            check(self.folder)  # another process may have written there since
            mark = self.folder / MARK
            if not mark.exists():
                mark.write_text(json.dumps({"config": self.config_path}, indent=2))
        except BaseException:
            self.lock.release()
            raise
        return self.folder

    def __exit__(self, kind, *exc) -> None:
        if kind is not None and not any(self.folder.glob("**/summary.json")):
            self.lock.discard()  # a benchmark that failed before any cell finished leaves nothing
        self.lock.release()
