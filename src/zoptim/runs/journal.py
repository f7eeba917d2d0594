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


def read(path: str | Path) -> tuple[list[Entry], list[int]]:
    """The good entries of a journal, in order, and the byte offset where each one ends.
    Reading stops at the first line that is torn, corrupted or out of sequence."""
    entries, ends = [], []
    p = Path(path)
    if not p.exists():
        return entries, ends
    with open(p, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                entry = decode(raw.decode("utf-8"))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
                break
            if entries and entry.step != entries[-1].step + 1:
                break
            entries.append(entry)
            ends.append((ends[-1] if ends else 0) + len(raw))
    return entries, ends


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


def truncate_to_good(path: str | Path, keep_below: int | None = None) -> list[Entry]:
    """Cut a journal back to its good prefix (and, with ``keep_below``, to the entries of
    steps before it), durably. Returns the entries kept."""
    p = Path(path)
    entries, ends = read(p)
    if keep_below is not None:
        entries = [e for e in entries if e.step < keep_below]
    good = ends[len(entries) - 1] if entries else 0
    if p.exists() and p.stat().st_size != good:
        with open(p, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return entries
