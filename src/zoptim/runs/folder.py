"""A run folder, checked before anything is written to it and locked while a process writes.

``check`` is the one test a run's folder passes before anything is written: it refuses a
path that is a file, a folder of someone else's files (a run would overwrite its
``journal.jsonl`` or delete its ``checkpoint-*`` folders) and a run without ``--resume``.
``Lock`` refuses a folder another process is writing. The lock is the operating system's (``flock``): a process that crashes or is killed
releases it, so a stale lock never needs cleaning up.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class FolderError(ValueError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


def absolute(path: str | Path) -> Path:
    """``path`` absolute, with ``..`` taken as written (``out/new/..`` is ``out``, whether or
    not ``new`` exists): the folder every check, the lock and a clean-up act on is the one the
    user named."""
    return Path(os.path.abspath(path))


def check(folder: Path, resume: bool) -> bool:
    """Whether ``folder`` holds a run, once it is checked that a run may be written there:
    a new run needs a missing or empty folder; ``resume`` continues a run (or starts one in
    a missing or empty folder)."""
    folder = absolute(folder)
    if not usable(folder):
        return False
    has_run = (folder / "config.json").is_file()
    if not has_run:
        # A run writes config.json first: without it, anything but the lock is not a run's.
        foreign = sorted(p.name for p in folder.iterdir() if p.name != ".lock")
        if foreign:
            raise FolderError(f"{folder} is not empty and holds no zoptim run (it has "
                              f"{', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); "
                              "choose another --out, nothing was changed")
    elif not resume:
        raise FolderError(f"{folder} already holds a run; pass --resume to continue it or "
                          "choose another --out")
    return has_run


def usable(folder: Path) -> bool:
    """Whether ``folder`` exists, once it is checked that a process may write there: an
    existing folder must be writable, a missing one must be possible to make."""
    folder = absolute(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{folder} is a file, not a run folder; choose another --out")
    if not folder.exists():
        creatable(folder)
        return False
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FolderError(f"{folder} is not writable; choose another --out")
    return True


def creatable(folder: Path) -> None:
    """Refuse a missing folder that cannot be made: one below a file, or inside a folder
    this process may not write."""
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FolderError(f"{folder} cannot be made: {parent} is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FolderError(f"{folder} cannot be made: {parent} is not writable; choose another "
                          "--out")


class Lock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock`` for as long as a run writes."""

    def __init__(self, folder: Path):
        self.folder = absolute(folder)
        self._fd: int | None = None
        # the folders made for the lock, deepest first: gone again if nothing came
        self._made: list[Path] = []

    def acquire(self) -> None:
        missing = self.folder
        while not missing.exists():
            self._made.append(missing)
            missing = missing.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderError(f"{self.folder} is being written by process {holder}; wait for it "
                              "to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def discard(self) -> None:
        """Remove what was written into a folder this lock made (a run that failed before its
        first step leaves nothing); a folder that existed before is left alone."""
        if self._fd is None or not self._made:
            return
        for path in self.folder.iterdir():
            if path.name == ".lock":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def release(self) -> None:
        if self._fd is None:
            return
        if self._made and [p.name for p in self.folder.iterdir()] == [".lock"]:
            try:  # a run that wrote nothing leaves nothing, the folders made for it included
                (self.folder / ".lock").unlink()
                for made in self._made:
                    made.rmdir()
            except OSError:
                pass  # another process put something there meanwhile: it stays
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def checkpoint_named(folder: Path, name: object) -> Path:
    """The checkpoint folder ``name`` (as ``latest.json`` gives it), refused unless it is a
    ``checkpoint-<step>`` folder directly inside ``folder``."""
    if not isinstance(name, str) or not CHECKPOINT.fullmatch(name):
        raise FolderError(f"{folder / 'latest.json'} names {name!r}, not a checkpoint of "
                          "this folder")
    return folder / name


def latest_named(folder: Path) -> Path | None:
    """The checkpoint ``latest.json`` names (checked to be this folder's), or None."""
    pointer = folder / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text()).get("checkpoint")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise FolderError(f"{pointer} is damaged ({err})") from err
    return checkpoint_named(folder, name)


def checkpoints(folder: Path) -> list[Path]:
    """The folder's checkpoint folders, newest step first."""
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and (m := CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]
