"""Scores of generated answers: exact match and token F1 as the SQuAD evaluation defines them
(Rajpurkar et al., 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text", the
official ``evaluate-v1.1.py``), which MeZO and ZO-Bench also use for SQuAD and DROP.

An answer is normalized before it is compared: lower case, punctuation removed, the articles
"a", "an" and "the" removed, runs of white space made one space. A prediction is scored
against each of its reference answers and keeps the best score. Where a normalized answer is
empty, F1 is 1 when both are empty and 0 otherwise (SQuAD 2.0's rule; 1.1 divides by zero).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """``text`` as SQuAD compares answers: lower case, no punctuation, no articles, single
    spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """The harmonic mean of precision and recall of the normalized answers' words."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "f1": token_f1}


def best_score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """``metric`` of ``prediction`` against the closest of ``answers``."""
    score = METRICS[metric]
    return max(score(prediction, a) for a in answers)
