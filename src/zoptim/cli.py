"""Command line.

- ``zoptim train``: fine-tune a language or image model on a task from a config (TOML or
  YAML) and ``--set key=value`` overrides; without any, a short ZO-Muon fine-tune of
  all-MiniLM-L6-v2 on the movie-review snippets.
- ``zoptim eval RUN``: evaluate a saved run at its latest checkpoint; each example's
  prediction goes to ``RUN/predictions.jsonl``.
- ``zoptim generate RUN --prompt TEXT``: greedy completions from a trained decoder run.
- ``zoptim replay RUN`` / ``zoptim verify RUN``: redo a run from its journal and compare the
  weights with its checkpoint; verify also checks the data, the journal and every checkpoint
  file, and says what ``--resume`` would recover.
- ``zoptim bench``: a matrix of methods x seeds, queries-to-target against a baseline, a report;
  or (``kind = "fidelity"``) how well each method's step agrees with backpropagation.
- ``zoptim demo``: small networks on scikit-learn's digits, methods side by side.
- ``zoptim rank``: steer a colour by ranking candidates (ZO-RankSGD, a person as the oracle).
"""

from __future__ import annotations

import argparse
import json
import sys

def _overrides(args) -> list[str]:
    sets = list(args.set or [])
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    for flag, key in (("method", "method.name"), ("model", "model.name"), ("task", "task.name"),
                      ("task_path", "task.path"), ("scheme", "model.scheme")):
        value = getattr(args, flag)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    return sets


def train_command(args) -> int:
    from zoptim.runs import config
    from zoptim.runs.run import resumed_config, train

    # a resumed run reads its own configuration: the command it printed works as printed
    cfg = resumed_config(args.out, _overrides(args)) if args.resume and not args.config else None
    train(cfg or config.load(args.config, _overrides(args)), args.out, resume=args.resume,
          progress=not args.no_progress)
    return 0


def eval_command(args) -> int:
    from pathlib import Path

    from zoptim.runs.run import evaluate

    score = evaluate(args.run_dir, args.split, log=lambda line: print(line, file=sys.stderr))
    written = Path(args.run_dir) / "eval.json"
    metric = json.loads(written.read_text())["metric"] if written.exists() else "score"
    print(f"{args.split} {metric}: {score:.4f}  (each example: "
          f"{Path(args.run_dir) / 'predictions.jsonl'})")
    return 0


def generate_command(args) -> int:
    """Print each prompt's greedy completion (with its prompt, when there are several)."""
    from zoptim.runs.generation import generate

    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"{args.prompts}: not UTF-8 text ({err.reason}); save the "
                             "prompts as UTF-8") from None
    done = generate(args.run_dir, prompts, args.max_new_tokens)
    for prompt, (text, ended) in zip(prompts, done):
        if len(prompts) > 1:
            print(f"> {prompt}")
        print(text if ended else f"{text} [token limit]")
    return 0


def replay_command(args) -> int:
    """Exit 0 only when the replayed weights were compared with a checkpoint and are equal,
    and nothing else was found wrong (the data, the journal, the checkpoints)."""
    from zoptim.runs.run import audit

    found = audit(args.run_dir)
    print(f"replayed {found.steps} steps ({found.queries} queries) without running the model")
    if found.compared is None:
        print("no checkpoint at a replayed step to compare with: nothing was verified")
    else:
        print(f"weights at {found.compared} {'equal' if found.equal else 'DIFFER FROM'} the "
              "checkpoint")
    for problem in found.problems:
        print(f"problem: {problem}")
    if args.command == "verify":
        print("verified: data, journal and checkpoints are whole" if found.ok
              else f"recovery: {found.recovery}")
    return 0 if found.ok else 1


def os_error(err: OSError) -> str:
    """An operating-system error as one line that names its path."""
    what = err.strerror or str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {what}" if paths else what


def names(text: str) -> list[str]:
    """A comma-separated list of names (methods, labels), blanks dropped: an argparse type."""
    return [name.strip() for name in text.split(",") if name.strip()]


def bench_command(args) -> int:
    """A matrix of methods x seeds, or, for a configuration of ``kind = "fidelity"``, the
    estimator-fidelity measurement (``bench.fidelity``)."""
    from zoptim.bench.folder import BenchError
    from zoptim.bench.matrix import run
    from zoptim.runs.config import read_file

    kind = read_file(args.config).get("kind", "matrix")
    if kind == "fidelity":
        from zoptim.bench import fidelity

        if args.only:
            raise BenchError("--only selects cells of a matrix; a fidelity configuration "
                             "measures all its methods")
        fidelity.run(args.config, args.out)
        return 0
    if kind != "matrix":
        raise BenchError(f"kind = {kind!r}: a benchmark is a \"matrix\" (the default) or "
                         "\"fidelity\"")
    command = ["zoptim", "bench", "--config", args.config, "--out", str(args.out)]
    if args.only:
        command += ["--only", ",".join(args.only)]
    run(args.config, args.out, command=command, only=args.only)
    return 0


def demo_command(args) -> int:
    from zoptim.bench.demo import DEMO_SETTINGS, run

    unknown = [n for n in args.methods if n not in DEMO_SETTINGS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(DEMO_SETTINGS)}")
    return run(args)


def rank_command(args) -> int:
    from zoptim.runs.rank_session import session

    def ask(prompt: str) -> str:
        try:
            return input(prompt)
        except EOFError:
            raise ValueError("no answer (end of input); the session so far is kept in --state "
                             "when given") from None

    session(ask, print, rounds=args.rounds, candidates=args.candidates, lr=args.lr,
            eps=args.eps, seed=args.seed, state=args.state)
    return 0


def main(argv=None) -> int:
    from zoptim.runs.config import ConfigError
    from zoptim.integrations.models import ModelError
    from zoptim.tasks.data import DataError
    from zoptim.bench.folder import BenchError
    from zoptim.runs.run import Interrupted, RunError

    parser = argparse.ArgumentParser(prog="zoptim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a language or image model on a task")
    p.add_argument("--config", help="TOML or YAML file (defaults: zoptim.runs.config.TrainConfig)")
    p.add_argument("--out", default="runs/default", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. --set method.settings.lr=1e-3 (repeatable)")
    p.add_argument("--steps", type=int)
    p.add_argument("--method")
    p.add_argument("--model")
    p.add_argument("--scheme")
    p.add_argument("--task")
    p.add_argument("--task-path", help="the task's data file or image folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=train_command)

    p = sub.add_parser("eval", help="evaluate a saved run at its latest checkpoint")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--split", choices=["train", "dev", "test"], default="test")
    p.set_defaults(handler=eval_command)

    p = sub.add_parser("generate", help="greedy completions of prompts from a trained decoder run")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file of prompts, one a line")
    p.add_argument("--max-new-tokens", type=int, help="the completion's token limit (default: "
                   "the run's task.max_new_tokens)")
    p.set_defaults(handler=generate_command)

    p = sub.add_parser("replay", help="redo a run from its journal and check the final weights")
    p.add_argument("run_dir", metavar="RUN")
    p.set_defaults(handler=replay_command)

    p = sub.add_parser("verify", help="check a run's data, journal and checkpoints; say what "
                                      "--resume would recover")
    p.add_argument("run_dir", metavar="RUN")
    p.set_defaults(handler=replay_command)

    p = sub.add_parser("bench", help="run a matrix of methods x seeds and write a report")
    p.add_argument("--config", required=True, help="TOML or YAML benchmark configuration")
    p.add_argument("--out", default="runs/bench", help="benchmark folder")
    p.add_argument("--only", type=names, help="comma-separated labels: run and report these methods alone "
                                   "(their cells are the whole matrix's; the baseline among them)")
    p.set_defaults(handler=bench_command)

    p = sub.add_parser("demo", help="train an MLP on digits with ZO methods side by side")
    p.add_argument("--methods", type=names, default="zo-muon,mezo",
                   help="comma-separated method names")
    p.add_argument("--queries", type=int, default=6000, help="objective evaluations per method")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=300, help="steps between progress lines")
    p.set_defaults(handler=demo_command)

    p = sub.add_parser("rank", help="steer a colour by ranking candidates (ZO-RankSGD)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--eps", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", help="JSON file that keeps the session between runs")
    p.set_defaults(handler=rank_command)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except Interrupted as err:
        print(f"zoptim {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"zoptim {args.command}: interrupted", file=sys.stderr)
        return 130
    except (BenchError, ConfigError, DataError, ModelError, RunError, ValueError) as err:
        print(f"zoptim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the outside world: a path, a permission, a full disk
        print(f"zoptim {args.command}: error: {os_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
