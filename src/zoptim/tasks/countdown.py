"""Countdown: reach a target from a few numbers, each used once, with ``+ - * /``.

The verifiable-reward task of TinyZero and of "Evolution Strategies at Scale" (Qiu et al.,
2025, arXiv 2509.24372). The prompt asks for reasoning in ``<think>`` tags and the equation in
``<answer>`` tags, and ends with the opening ``<think>`` so the model continues inside it. The
reward is theirs: ``0.1 * format + answer``, at most 1.1, where

- ``format`` is 1 when the completion is exactly ``... </think>\\n<answer> ... </answer>``
  (read after the prompt's ``<think>``), else 0.1 for a closed ``<think>`` block plus 0.5 for
  an ``<answer>`` block;
- ``answer`` is 1 when the last ``<answer>`` holds only digits, ``+ - * / ( )`` and spaces,
  uses exactly the puzzle's numbers (each once, all of them), and equals the target within
  1e-5, else 0.

The equation is evaluated by ``tasks.arithmetic`` (a hand-written parser, never ``eval``); a
division by zero or anything outside the grammar scores 0. Only the completion is scored,
never the prompt's own example tags.

Puzzles come from a seeded generator: 3 or 4 numbers from 1 to 99 and a target built from
all of them by a random equation with positive integer steps (the solution is kept), at most
1000, as the public Countdown sets are.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from zoptim.tasks.arithmetic import NotArithmetic, evaluate

PROMPT = ("Using the numbers {numbers}, write an equation that equals {target}. Use + - * / and "
          "parentheses, and each number exactly once. Think it through in <think> </think> "
          "tags, then give the equation alone in <answer> </answer> tags, for example "
          "<answer> (1 + 2) / 3 </answer>.\n<think>")

_FULL = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ALLOWED = re.compile(r"^[0-9+\-*/() ]+$")


@dataclass(frozen=True)
class Puzzle:
    numbers: tuple[int, ...]
    target: int
    solution: str  # one equation that reaches the target

    @property
    def prompt(self) -> str:
        return PROMPT.format(numbers=list(self.numbers), target=self.target)


def _combine(rng: random.Random, numbers: list[int]) -> tuple[int, str] | None:
    """A random equation over all ``numbers`` in a random order, every intermediate value a
    positive integer: ``(value, text)``, or ``None`` when a drawn step fails that."""
    order = rng.sample(numbers, len(numbers))
    value, text = order[0], str(order[0])
    for n in order[1:]:
        op = rng.choice("+-*/")
        if op == "+":
            value += n
        elif op == "-" and value > n:
            value -= n
        elif op == "*":
            value *= n
        elif op == "/" and value % n == 0:
            value //= n
        else:
            return None
        text = f"({text} {op} {n})"
    return value, text[1:-1] if text.startswith("(") else text


def generate(count: int, seed: int, sizes: tuple[int, ...] = (3, 4), largest: int = 99,
             max_target: int = 1000) -> list[Puzzle]:
    """``count`` puzzles; puzzle ``i`` depends on ``(seed, i)`` alone, so a longer list
    starts with a shorter one."""
    puzzles = []
    for i in range(count):
        rng = random.Random(f"countdown:{seed}:{i}")
        while True:
            numbers = [rng.randint(1, largest) for _ in range(rng.choice(sizes))]
            found = _combine(rng, numbers)
            if found is not None and 1 <= found[0] <= max_target:
                puzzles.append(Puzzle(tuple(numbers), found[0], found[1]))
                break
    return puzzles


def format_score(completion: str) -> float:
    """1 for the exact layout, else 0.1 for a closed think block plus 0.5 for an answer."""
    text = "<think>" + completion  # the prompt ends with the opening tag
    if _FULL.match(text):
        return 1.0
    return 0.1 * bool(_THINK.search(text)) + 0.5 * bool(_ANSWER.search(text))


def solves(equation: str, puzzle: Puzzle) -> bool:
    """Whether ``equation`` uses exactly the puzzle's numbers and reaches its target."""
    equation = equation.strip()
    if not equation or not _ALLOWED.match(equation):
        return False
    if sorted(int(n) for n in re.findall(r"\d+", equation)) != sorted(puzzle.numbers):
        return False
    try:
        return abs(float(evaluate(equation)) - puzzle.target) < 1e-5
    except NotArithmetic:
        return False


def reward(completion: str, puzzle: Puzzle) -> float:
    """``0.1 * format + answer`` of a completion of the puzzle's prompt (at most 1.1)."""
    answers = _ANSWER.findall("<think>" + completion)
    answer = 1.0 if answers and solves(answers[-1], puzzle) else 0.0
    return 0.1 * format_score(completion) + answer
