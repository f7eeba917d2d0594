"""What a model predicts, example by example: the lines of ``predictions.jsonl``, which
``zoptim eval`` writes beside its score so that a user can read what the model does (a
generation task's exact match of 0.00 says nothing of the answers it gave).

One line per example, by the task's kind:

- classification (text or images): ``input``, ``gold`` and ``prediction`` (label names),
  ``correct`` and ``scores`` (each label's logit);
- multiple choice: ``input`` (the context), ``options``, ``gold`` and ``prediction`` (option
  indices), ``correct`` and ``scores`` (each option's log-likelihood);
- generation: ``input`` (the prompt, or the chat messages), ``answers``, ``prediction`` (the
  greedy completion), ``ended`` (whether it ended before the token limit) and ``score``
  (the task's metric against the answers);
- rewards: ``input``, ``prediction``, ``ended`` and ``reward``.

The task's score is the mean of the lines' (``correct``, ``score`` or ``reward``), so it is
the one the run reports (``Objective.score``), computed once.
"""

from __future__ import annotations

import torch

from zoptim.tasks.metrics import best_score
from zoptim.tasks.rewards import call


def predictions(objective, examples: list, labels: list[str], batch_size: int) -> list[dict]:
    """One record per example (see the module's docstring), in the examples' order."""
    if not examples:
        return []
    if hasattr(objective, "reward"):
        return _rewarded(objective, examples, batch_size)
    if hasattr(objective, "generate"):
        return _generated(objective, examples, batch_size)
    return _ranked(objective, examples, labels, batch_size)


def mean_score(records: list[dict]) -> float:
    """The task's score from its records: accuracy, the mean metric or the mean reward."""
    if not records:
        return float("nan")
    key = next(k for k in ("correct", "score", "reward") if k in records[0])
    return sum(float(r[key]) for r in records) / len(records)


def _input(example) -> object:
    """What the model was given, as JSON can hold it: text, chat messages or an image's path."""
    for name in ("text", "context", "prompt"):
        value = getattr(example, name, None)
        if value is not None:
            return value if isinstance(value, str) else \
                [{"role": role, "content": content} for role, content in value]
    image = getattr(example, "image", None)
    return image if isinstance(image, str) else f"image of shape {list(image.shape)}"


def _ranked(objective, examples: list, labels: list[str], batch_size: int) -> list[dict]:
    """Classification and multiple choice: the highest logit or log-likelihood wins."""
    # texts in order of length, as the objective's own score batches them (the same batches,
    # so the same logits), then back in the examples' order
    order = sorted(range(len(examples)), key=lambda i: len(getattr(examples[i], "text", "")))
    out: dict[int, dict] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = objective.logits([examples[i] for i in chunk]).float().cpu().tolist()
            for i, row in zip(chunk, rows):
                out[i] = _ranked_record(examples[i], row, labels)
    return [out[i] for i in range(len(examples))]


def _ranked_record(e, row: list[float], labels: list[str]) -> dict:
    options = getattr(e, "options", None)
    if options is not None:  # multiple choice: -inf pads past an example's last option
        scores = row[:len(options)]
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"input": _input(e), "options": list(options), "gold": e.label,
                "prediction": best, "correct": best == e.label, "scores": scores}
    best = max(range(len(row)), key=row.__getitem__)
    return {"input": _input(e), "gold": labels[e.label], "prediction": labels[best],
            "correct": best == e.label, "scores": dict(zip(labels, row))}


def _generated(objective, examples: list, batch_size: int) -> list[dict]:
    return [{"input": _input(e), "answers": list(e.answers), "prediction": text,
             "ended": ended, "score": best_score(objective.metric, text, e.answers)}
            for e, (text, ended) in zip(examples, objective.generate(examples, batch_size))]


def _rewarded(objective, examples: list, batch_size: int) -> list[dict]:
    return [{"input": _input(e), "prediction": text, "ended": ended,
             "reward": call(objective.reward, e, text)}
            for e, (text, ended) in zip(examples, objective.completions(examples, batch_size))]
