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


def test_a_torn_or_corrupted_tail_is_cut_and_appending_continues(tmp_path):
    path = tmp_path / "journal.jsonl"
    items = entries(6)
    write(path, items)
    lines = path.read_text().splitlines(keepends=True)
    # flip one digit inside the last line's values: its checksum no longer matches
    bad = lines[5].replace("0x1", "0x2", 1)
    assert bad != lines[5]
    path.write_text("".join(lines[:5]) + bad)
    found = journal.scan(path)
    assert found.prefix() == items[:5] and found.torn and found.problem() is None
    kept, size = found.from_step(5)
    assert kept == [] and size == len("".join(lines[:5]).encode())
    journal.cut(path, size)
    assert path.read_text() == "".join(lines[:5])
    # a torn line (a crash mid-write) is cut too, and appending then continues cleanly
    with open(path, "a") as f:
        f.write(lines[5][:17])
    found = journal.scan(path)
    assert found.torn and found.problem() is None
    journal.cut(path, found.from_step(5)[1])
    write(path, items[5:])
    assert journal.read(path)[0] == items


def test_damage_in_the_middle_is_reported_and_later_lines_are_kept(tmp_path):
    path = tmp_path / "journal.jsonl"
    items = entries(6)
    write(path, items)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2].replace("0x1", "0x2", 1) + "".join(lines[3:]))
    found = journal.scan(path)
    assert found.damaged == [3] and found.problem() == "line 3 damaged"
    assert found.prefix() == items[:2]  # replay from the start stops at the damage
    # a checkpoint at step 4: steps 4 and 5 are still there, and so is every line before them
    kept, size = found.from_step(4)
    assert kept == items[4:] and size == path.stat().st_size
    # a checkpoint at step 1: steps from the damaged one on are run again
    kept, size = found.from_step(1)
    assert kept == items[1:2] and size == len("".join(lines[:2]).encode())


def test_cutting_keeps_steps_below_a_checkpoint(tmp_path):
    path = tmp_path / "journal.jsonl"
    write(path, entries(5))
    journal.cut(path, journal.scan(path).end_before(3))
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
