"""Hostile input as a property: whatever file contents, configuration text, output path or
setting a user gives, every command ends with exit 0 or 2 (a clear refusal, never a
traceback), every file that existed before is byte-identical after, and a refused run leaves no
folder. The named cases of ``test_bad_inputs`` are examples of these properties."""

import json
import math
import os

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from zoptim.cli import main

from test_bad_inputs import snapshot, train_args

CASES = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run and a user's own files, which no input may change."""
    root = tmp_path_factory.mktemp("world")
    assert main(train_args(root / "run")) == 0
    (root / "notes.txt").write_text("the user's own file")
    (root / "mine").mkdir()
    (root / "mine" / "report.md").write_text("the user's own report")
    return root


def ends_cleanly(argv: list[str]) -> int:
    """The command's exit status, where a refusal by argparse counts as its exit 2; any other
    exception escapes (a traceback: the property fails)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def unchanged(world, before: dict) -> bool:
    return snapshot(world) == before


contents = st.one_of(st.binary(max_size=400), st.text(max_size=400),
                     st.lists(st.dictionaries(st.sampled_from(["text", "label", "prompt",
                                                               "options", "x"]),
                                              st.one_of(st.text(max_size=20), st.integers(),
                                                        st.none(), st.floats())),
                              max_size=6).map(lambda rows: "\n".join(map(json.dumps, rows))))


@CASES
@given(body=contents, suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".txt", ""]))
def test_any_task_file_is_trained_on_or_refused(world, tmp_path_factory, body, suffix):
    case = tmp_path_factory.mktemp("file")
    data = case / f"data{suffix}"
    (data.write_bytes if isinstance(body, bytes) else data.write_text)(body)
    before = snapshot(world)
    code = ends_cleanly(train_args(case / "out", 'task.name="file"',
                                   f"task.path={json.dumps(str(data))}"))
    assert code in (0, 2)
    assert unchanged(world, before)
    assert code == 0 or not (case / "out").exists()


@CASES
@given(text=st.text(max_size=300), suffix=st.sampled_from([".toml", ".yaml", ".yml", ".json"]),
       command=st.sampled_from(["train", "bench"]))
def test_any_configuration_text_is_read_or_refused(world, tmp_path_factory, text, suffix,
                                                   command):
    case = tmp_path_factory.mktemp("config")
    config = case / f"config{suffix}"
    config.write_text(text)
    before = snapshot(world)
    argv = ([*train_args(case / "out")[:1], "--config", str(config), "--out", str(case / "out"),
             "--steps", "0", "--no-progress"] if command == "train" else
            ["bench", "--config", str(config), "--out", str(case / "out")])
    code = ends_cleanly(argv)
    assert code in (0, 2)
    assert unchanged(world, before)
    assert code == 0 or not (case / "out").exists()


@CASES
@example(parts=["deeper", ".."])  # the world itself, named through a folder that is not there
@given(parts=st.lists(st.sampled_from(["notes.txt", "mine", "run", "..", "new", "deeper", "."]),
                      min_size=1, max_size=4))
def test_any_output_path_is_used_or_refused_and_nothing_else_is_touched(world, parts):
    out = world.joinpath(*parts)
    # paths that climb out of the world are the user's to choose; the property is about it
    assume(os.path.normpath(out).startswith(str(world)))
    before = snapshot(world)
    code = ends_cleanly(train_args(out, "steps=1"))
    assert code in (0, 2)
    if code == 2:
        assert unchanged(world, before)
    else:  # a new run: nothing that existed changed
        after = snapshot(world)
        assert {k: after[k] for k in before} == before


def toml(value) -> str:
    """A value as ``--set`` reads it (TOML): ``nan`` and ``inf`` as TOML writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(value)


values = st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.booleans(),
                   st.lists(st.integers(-2, 5), max_size=3))


@CASES
@given(key=st.sampled_from(["steps", "batch_size", "task.train", "task.dev", "model.scheme",
                            "model.weights", "model.max_length", "method.name",
                            "method.settings.lr", "method.settings.eps", "method.settings.rank",
                            "method.settings.nothing", "task.label_words", "eval_every",
                            "guard.spike", "seed", "task.name", "nonsense"]),
       value=values)
def test_any_setting_is_used_or_refused(world, tmp_path_factory, key, value):
    case = tmp_path_factory.mktemp("setting")
    before = snapshot(world)
    code = ends_cleanly(train_args(case / "out", f"{key}={toml(value)}"))
    assert code in (0, 2)
    assert unchanged(world, before)
    assert code == 0 or not (case / "out").exists()
