"""Countdown's reward on worked examples, its seeded puzzles, and the arithmetic evaluator
that never runs what a model writes."""

from fractions import Fraction

import pytest

from zoptim.tasks.arithmetic import MAX_DEPTH, NotArithmetic, evaluate
from zoptim.tasks.countdown import Puzzle, format_score, generate, reward, solves

P = Puzzle((44, 19, 35), 98, "44 + 19 + 35")


def answered(equation: str) -> str:
    return f"I add them all.</think>\n<answer> {equation} </answer>"


@pytest.mark.parametrize("completion, expected", [
    (answered("44 + 19 + 35"), 1.1),                      # correct, exact layout
    (answered("(35 + 19) + 44"), 1.1),                    # any order, parentheses
    (answered("44 + 19 - 35"), 0.1),                      # wrong value: format alone
    (answered("(44 + 19 + 35"), 0.1),                     # malformed: unclosed
    (answered("44 + 44 + 10"), 0.1),                      # 44 twice, 19 and 35 unused
    (answered("44 + 19 + 35.0"), 0.1),                    # a decimal point is refused
    ("<answer>44 + 19 + 35</answer>", 0.05 + 1.0),        # right, no think block
    ("thinking... </think> no tags", 0.01),               # think block alone
    ("nothing at all", 0.0),
    (answered("1 + 1") + "\n<answer> 44 + 19 + 35 </answer>", 1.1),  # the last one counts
    ("</think>\n<answer> 44 + 19 + 35 </answer>\n<answer> 1 + 1 </answer>", 0.1),
])
def test_the_countdown_reward_on_worked_examples(completion, expected):
    assert reward(completion, P) == pytest.approx(expected)


def test_division_by_zero_and_hostile_completions_score_zero_and_run_nothing():
    assert not solves("2 / (4 - 4)", Puzzle((2, 4, 4), 1, ""))
    assert not solves("__import__('os').system('echo x')", P)
    # the numbers check passes, Python's eval would hang on 9 ** (9 ** 9): refused unparsed
    assert not solves("9**9**9", Puzzle((9, 9, 9), 1, ""))
    assert reward(answered("9**9**9"), Puzzle((9, 9, 9), 1, "")) == pytest.approx(0.1)


def test_format_scores():
    assert format_score("a</think>\n<answer>x</answer>") == 1.0
    assert format_score("a</think> <answer>x</answer>") == pytest.approx(0.6)
    assert format_score("a</think>\n<answer>x</answer> and more") == pytest.approx(0.6)


def test_puzzles_are_seeded_solvable_and_in_range():
    puzzles = generate(200, seed=3)
    assert generate(200, seed=3) == puzzles and generate(50, seed=3) == puzzles[:50]
    assert generate(50, seed=4) != puzzles[:50]
    assert {len(p.numbers) for p in puzzles} == {3, 4}
    for p in puzzles:
        assert all(1 <= n <= 99 for n in p.numbers) and 1 <= p.target <= 1000
        assert solves(p.solution, p), p
        assert str(p.numbers[0]) in p.prompt and p.prompt.endswith("<think>")


@pytest.mark.parametrize("text, value", [("(1/3)*3", 1), ("2 + 3 * 4", 14), ("-(2 - 5)", 3),
                                         ("7 / 2", Fraction(7, 2)), ("3.5 * 2", 7)])
def test_arithmetic_is_exact(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize("text, message", [
    ("1 / (2 - 2)", "division by zero"), ("2 ** 3", "where a number belongs"),
    ("x + 1", "not arithmetic"), ("1_000", "not arithmetic"), ("\u0661 + 1", "not arithmetic"), ("1 2", "after the end"),
    ("1 +", "ends too early"), ("", "empty"), ("9" * 300, "longer than"),
    ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nested deeper"),
    ("-" * (MAX_DEPTH + 1) + "1", "nested deeper")])
def test_arithmetic_refuses_what_is_not_arithmetic(text, message):
    with pytest.raises(NotArithmetic, match=message):
        evaluate(text)
