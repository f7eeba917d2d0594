"""The Reuters R8 conversion script writes a generation task that zoptim reads."""

import importlib.util
from pathlib import Path

import pytest

from zoptim.tasks.kinds import load_kind_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reuters_topics.py"


def _script():
    spec = importlib.util.spec_from_file_location("reuters_topics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tab(path: Path, rows: list[tuple[str, str]]) -> Path:
    # Orange's layout: names, types, flags, then the rows.
    lines = ["Category\tText", "d\tstring", "class\t"] + [f"{c}\t{t}" for c, t in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_articles_become_prompts_with_their_topic_in_words(tmp_path):
    source = _tab(tmp_path / "r8.tab", [("acq", "big co buys small co for mln dlrs reuter"),
                                        ("money-fx", "the dollar fell against the yen")])
    out = tmp_path / "topics.jsonl"
    _script().main(["--source", str(source), "--out", str(out), "--words", "3"])
    pool, labels = load_kind_file("generation", str(out))
    assert labels == [] and len(pool) == 2
    assert pool[0].prompt.startswith("Article: big co buys\nTopic (earnings, acquisitions,")
    assert pool[0].prompt.endswith("shipping or grain):")
    assert [p.answers for p in pool] == [(" acquisitions",), (" currency",)]


def test_an_unknown_class_is_refused_and_nothing_is_written(tmp_path):
    source = _tab(tmp_path / "r52.tab", [("earn", "profit up"), ("cocoa", "cocoa prices rose")])
    out = tmp_path / "topics.jsonl"
    with pytest.raises(SystemExit, match="unknown class 'cocoa'"):
        _script().main(["--source", str(source), "--out", str(out)])
    assert not out.exists()
