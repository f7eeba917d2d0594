import math

from hypothesis import given, settings
from hypothesis import strategies as st

from zoptim.runs import journal
from zoptim.runs.journal import Entry

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def entries(n, start=0):
    return [Entry(start + i, 2**63 + i, [0.5 + i, -1e-300, math.pi * i], [1e-3, 1e-7], 5 * (i + 1),
                  "non-finite loss" if i == 2 else None) for i in range(n)]


def write(path, items):
    with journal.Writer(path, fsync_every=2) as w:
        for e in items:
            w.append(e)


def test_round_trip_is_exact_including_non_finite_values(tmp_path):
    e = Entry(0, 12345, [float("nan"), float("inf"), -0.0, 1 / 3], [0.1], 7)
    (back,) = [journal.decode(journal.encode(e))]
    assert back.values[1:] == e.values[1:] and math.isnan(back.values[0])
    assert math.copysign(1, back.values[2]) == -1  # -0.0 kept bit for bit


def test_corrupted_and_torn_tails_are_detected_and_cut(tmp_path):
    path = tmp_path / "journal.jsonl"
    items = entries(6)
    write(path, items)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    # flip one digit inside the fifth line's values: its checksum no longer matches
    bad = lines[4].replace("0x1", "0x2", 1)
    assert bad != lines[4]
    path.write_text("".join(lines[:4]) + bad + lines[5])
    got, _ = journal.read(path)
    assert got == items[:4]
    assert journal.truncate_to_good(path) == items[:4]
    assert path.read_text() == "".join(lines[:4])
    # a torn line (a crash mid-write) is cut too, and appending then continues cleanly
    with open(path, "a") as f:
        f.write(lines[4][:17])
    assert journal.truncate_to_good(path) == items[:4]
    write(path, items[4:])
    assert journal.read(path)[0] == items


def test_truncation_keeps_steps_below_a_checkpoint(tmp_path):
    path = tmp_path / "journal.jsonl"
    write(path, entries(5))
    assert [e.step for e in journal.truncate_to_good(path, keep_below=3)] == [0, 1, 2]
    assert [e.step for e in journal.read(path)[0]] == [0, 1, 2]


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.lists(floats, min_size=1, max_size=5), min_size=1, max_size=6),
       cut=st.integers(min_value=0, max_value=10_000), junk=st.binary(max_size=40))
def test_reader_returns_a_prefix_whatever_the_damage(tmp_path_factory, values, cut, junk):
    path = tmp_path_factory.mktemp("j") / "journal.jsonl"
    items = [Entry(i, i * 7919, v, [0.01], i + 1) for i, v in enumerate(values)]
    write(path, items)
    data = path.read_bytes()
    cut = cut % (len(data) + 1)
    path.write_bytes(data[:cut] + junk)
    got, ends = journal.read(path)
    assert len(got) <= len(items) and len(ends) == len(got)
    for a, b in zip(got, items):
        assert a.step == b.step and len(a.values) == len(b.values)
        assert all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(a.values, b.values))
