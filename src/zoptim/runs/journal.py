"""The step journal: one line a step, append-only, each line checksummed.

A line holds the step and its seed, every value the step's objective returned (as exact
hexadecimal floats), the learning rate of each parameter group, the query count and whether a guard
skipped the update, plus a CRC-32 of the rest. With the run's configuration (whose seed fixes every direction) that is enough to redo
the run from its starting weights bit for bit. Lines are flushed at once and fsynced every
``fsync_every`` steps; a torn or corrupted tail (a crash mid-write, a damaged disk) is found
by its checksum, and reading stops at the last good line.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    step: int
    seed: int  # the step's seed: every direction of the step derives from it
    values: list[float]
    lrs: list[float]
    queries: int
    skipped: str | None = None  # why a guard skipped the step's update, if it did


def _body(entry: Entry) -> str:
    return json.dumps({"step": entry.step, "seed": entry.seed, "values": [v.hex() for v in map(float, entry.values)],
                       "lrs": [float(x).hex() for x in entry.lrs], "queries": entry.queries,
                       "skipped": entry.skipped}, separators=(",", ":"), sort_keys=True)


def encode(entry: Entry) -> str:
    body = _body(entry)
    return f'{body[:-1]},"crc":{zlib.crc32(body.encode())}}}\n'


def decode(line: str) -> Entry:
    """One journal line; ``ValueError`` if it is torn, corrupted or malformed."""
    data = json.loads(line)
    crc = data.pop("crc")
    entry = Entry(int(data["step"]), int(data["seed"]), [float.fromhex(v) for v in data["values"]],
                  [float.fromhex(x) for x in data["lrs"]], int(data["queries"]), data["skipped"])
    if zlib.crc32(_body(entry).encode()) != crc:
        raise ValueError("checksum mismatch")
    return entry


@dataclass
class Scan:
    """Every line of a journal judged: the good ones (entry, byte offset where the line ends)
    and the numbers (from 1) of the lines that are not, the torn last line of a crash
    included."""
    good: list[tuple[Entry, int]]
    damaged: list[int]
    torn: bool  # the last line is incomplete: a crash while it was written

    def prefix(self) -> list[Entry]:
        """The entries of steps 0, 1, ... up to the first gap: what replays from the start."""
        out = []
        for entry, _ in self.good:
            if entry.step != len(out):
                break
            out.append(entry)
        return out

    def from_step(self, step: int) -> tuple[list[Entry], int]:
        """The entries of steps ``step``, ``step + 1``, ... up to the first gap, and the byte
        offset to cut the file at to keep them and every line before them (damaged ones
        included: they are evidence, and cutting them would not restore their steps)."""
        start = next((i for i, (e, _) in enumerate(self.good) if e.step >= step), len(self.good))
        keep = self.end_before(step)
        run = []
        for entry, end in self.good[start:]:
            if entry.step != step + len(run):
                break
            run.append(entry)
            keep = end
        return run, keep

    def end_before(self, step: int) -> int:
        """The byte offset where the last good line of a step before ``step`` ends."""
        ends = [end for e, end in self.good if e.step < step]
        return ends[-1] if ends else 0

    def problem(self) -> str | None:
        """What is wrong with the journal short of a torn last line, or None."""
        if self.damaged:
            lines = ", ".join(map(str, self.damaged[:5]))
            return f"line{'s' if len(self.damaged) > 1 else ''} {lines} damaged"
        steps = [e.step for e, _ in self.good]
        if steps != list(range(len(steps))):
            return "steps out of sequence"
        return None


def scan(path: str | Path) -> Scan:
    """Judge every line of the journal at ``path`` (a missing file has none)."""
    good, damaged, torn, offset = [], [], False, 0
    p = Path(path)
    if not p.exists():
        return Scan(good, damaged, torn)
    with open(p, "rb") as f:
        raws = f.readlines()
    for number, raw in enumerate(raws, 1):
        offset += len(raw)
        if not raw.endswith(b"\n"):
            torn = True  # only the last line can lack its newline
            break
        try:
            good.append((decode(raw.decode("utf-8")), offset))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
            damaged.append(number)
    if damaged and damaged[-1] == len(raws) and not torn:
        torn = True  # a bad last line with nothing after it: the tail of a crash
        damaged.pop()
    return Scan(good, damaged, torn)


def cut(path: str | Path, size: int) -> None:
    """Cut the journal at ``size`` bytes, durably (nothing happens if it is that long)."""
    p = Path(path)
    if p.exists() and p.stat().st_size != size:
        with open(p, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


class Writer:
    """Appends entries; ``fsync_every`` steps between fsyncs (0: only on close)."""

    def __init__(self, path: str | Path, fsync_every: int = 1):
        self.path = Path(path)
        self.fsync_every = fsync_every
        self._file = open(self.path, "a", encoding="utf-8")
        self._unsynced = 0

    def append(self, entry: Entry) -> None:
        self._file.write(encode(entry))
        self._file.flush()
        self._unsynced += 1
        if self.fsync_every and self._unsynced >= self.fsync_every:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(path: str | Path) -> tuple[list[Entry], list[int]]:
    """The entries that replay from the start (steps 0, 1, ... up to the first damaged,
    torn or missing one) and the byte offset where each one ends."""
    found = scan(path)
    entries = found.prefix()
    return entries, [end for _, end in found.good[:len(entries)]]
