"""The command line of a benchmark module run as ``python -m zoptim.bench.<name> --config F
--out D``: one parser and one error boundary for all of them."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def main(name: str, doc: str, run: Callable, argv=None) -> int:
    """Parse ``--config`` and ``--out``, call ``run(config, out)``; a bad input is one line on
    stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog=f"python -m zoptim.bench.{name}",
                                     description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML or YAML configuration")
    parser.add_argument("--out", required=True, help="the folder its results are written to")
    args = parser.parse_args(argv)
    try:
        run(args.config, args.out)
    except (ValueError, OSError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 0
