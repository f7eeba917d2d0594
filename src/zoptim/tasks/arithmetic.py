"""A safe evaluator of the arithmetic a model writes: numbers, ``+ - * /``, parentheses.

A completion's equation is model output, so it is parsed here, by hand, and never given to
``eval`` or to Python's parser: anything outside the grammar (names, calls, attributes,
``**``, underscores in numbers, more than ``MAX_LENGTH`` characters or ``MAX_DEPTH`` nested
parentheses) is refused, and so is a division by zero. Values are exact fractions, so
``(1/3)*3`` is 1 and no float rounding decides a reward.

Grammar::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := ("+" | "-") factor | number | "(" expr ")"
    number := digits ["." digits]
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_LENGTH = 256
MAX_DEPTH = 32

_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?)|(.))")


class NotArithmetic(ValueError):
    """An expression outside the grammar, or one whose value is undefined."""


def tokens(text: str) -> list[str]:
    """The expression's tokens: numbers and single-character operators."""
    if len(text) > MAX_LENGTH:
        raise NotArithmetic(f"longer than {MAX_LENGTH} characters")
    out = []
    for number, symbol in _TOKEN.findall(text.strip()):
        if number:
            out.append(number)
        elif symbol in "+-*/()":
            out.append(symbol)
        elif not symbol.isspace():
            raise NotArithmetic(f"{symbol!r} is not arithmetic")
    return out


class _Parser:
    def __init__(self, items: list[str]):
        self.items, self.at, self.depth = items, 0, 0

    def peek(self) -> str | None:
        return self.items[self.at] if self.at < len(self.items) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise NotArithmetic("the expression ends too early")
        self.at += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value *= self.factor()
            else:
                divisor = self.factor()
                if divisor == 0:
                    raise NotArithmetic("division by zero")
                value /= divisor
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token in ("+", "-"):
            self._nest()
            value = self.factor()
            self.depth -= 1
            return value if token == "+" else -value
        if token == "(":
            self._nest()
            value = self.expr()
            if self.take() != ")":
                raise NotArithmetic("an unclosed parenthesis")
            self.depth -= 1
            return value
        if token[0].isdigit():
            return Fraction(token)
        raise NotArithmetic(f"{token!r} where a number belongs")

    def _nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise NotArithmetic(f"nested deeper than {MAX_DEPTH}")


def evaluate(text: str) -> Fraction:
    """The exact value of an arithmetic expression; ``NotArithmetic`` when it is not one
    (or divides by zero)."""
    items = tokens(text)
    if not items:
        raise NotArithmetic("an empty expression")
    parser = _Parser(items)
    value = parser.expr()
    if parser.peek() is not None:
        raise NotArithmetic(f"{parser.peek()!r} after the end of the expression")
    return value

