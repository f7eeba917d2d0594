"""Reward tasks: prompts, and a reward of each generated completion (higher is better).

A reward is a function ``reward(prompt, completion, example) -> float``, ``example`` the
prompt's row (a dict). Built in:

- ``countdown``: the ES paper's Countdown reward (``tasks.countdown``) on the row's
  ``numbers`` and ``target``; ``task.name = "countdown"`` generates the puzzles from the task's
  seed;
- ``conciseness``: ``-|len(completion) - len(answer)|`` in characters, the ES paper's
  conciseness reward, against the row's ``answer``;
- the user's own, named ``"module:function"`` (the module importable from the working
  directory or the environment).

A reward that raises or returns anything but a finite number stops the run with an error
that names the prompt: a silent zero would train on a bug.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zoptim.tasks import countdown
from zoptim.tasks.data import DataError

Reward = Callable[[str, str, dict], float]


@dataclass(frozen=True)
class Prompted:
    """A reward task's example: the prompt and its row."""
    prompt: str
    row: dict = field(default_factory=dict, hash=False, compare=False)


class RewardError(ValueError):
    """A reward that cannot be found, or that misbehaved on a completion."""


def countdown_reward(prompt: str, completion: str, example: dict) -> float:
    puzzle = countdown.Puzzle(tuple(example["numbers"]), example["target"],
                              example.get("solution", ""))
    return countdown.reward(completion, puzzle)


def conciseness_reward(prompt: str, completion: str, example: dict) -> float:
    return -abs(len(completion.strip()) - len(str(example["answer"])))


BUILT_IN: dict[str, Reward] = {"countdown": countdown_reward, "conciseness": conciseness_reward}


def _countdown_row(row: dict) -> bool:
    numbers, target = row.get("numbers"), row.get("target")
    return (isinstance(numbers, list) and bool(numbers)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
            and isinstance(target, (int, float)) and not isinstance(target, bool))


# What a built-in reward reads from each row, checked before the model is loaded.
NEEDS = {"countdown": ("'numbers' (a list of integers) and 'target' (a number)", _countdown_row),
         "conciseness": ("an 'answer'", lambda row: "answer" in row)}


def check_rows(name: str, examples: list["Prompted"]) -> None:
    """Refuse the first row a built-in reward cannot score, naming it."""
    if name not in NEEDS:
        return
    what, ok = NEEDS[name]
    for n, e in enumerate(examples, 1):
        if not ok(e.row):
            raise DataError(f"row {n} ({e.prompt[:40]!r}): the {name} reward needs {what}")


def load_reward(name: str) -> Reward:
    """A built-in reward by name, or the user's ``module:function``."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, _, function = name.partition(":")
    if not module_name or not function:
        raise RewardError(f"task.reward={name!r}: name a built-in reward "
                          f"({', '.join(BUILT_IN)}) or a function as 'module:function'")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # the user's module beside their config, last
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: not found, or failing as it loads
        raise RewardError(f"task.reward={name!r}: cannot import {module_name!r} "
                          f"({type(err).__name__}: {err})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise RewardError(f"task.reward={name!r}: {module_name} has no function {function!r}")
    return fn


def call(reward: Reward, example: Prompted, completion: str) -> float:
    """The reward of one completion, checked: a finite number, or a ``RewardError``."""
    try:
        value = reward(example.prompt, completion, example.row)
    except Exception as err:  # the user's code: any failure is reported, with the prompt
        raise RewardError(f"the reward raised {type(err).__name__}: {err} (prompt "
                          f"{example.prompt[:60]!r})") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(f"the reward returned {value!r}, not a finite number (prompt "
                          f"{example.prompt[:60]!r})")
    return float(value)


def countdown_pool(count: int, seed: int) -> list[Prompted]:
    """``count`` Countdown puzzles as reward examples."""
    return [Prompted(p.prompt, {"numbers": list(p.numbers), "target": p.target,
                                "solution": p.solution})
            for p in countdown.generate(count, seed)]


def prompted(where: str, row: object) -> Prompted:
    """A row of a user's prompts file: an object with a string ``prompt``."""
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise DataError(f"{where}: a reward task's row needs a 'prompt' string")
    return Prompted(row["prompt"], row)
