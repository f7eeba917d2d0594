"""Task kinds beyond classification, and a user's own data for them, as JSON lines.

- ``multiple_choice``: one ``Choice`` per row, ``{"context": ..., "options": [...],
  "answer": <index or the option's text>}``; a decoder scores each option's continuation by
  its log-likelihood after the context (COPA, WinoGrande, ReCoRD's candidates).
- ``generation``: one ``Completion`` per row, either ``{"prompt": ..., "completion": ...}``
  or chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the
  assistant's answer (rendered with the tokenizer's chat template). The loss is on the
  completion's tokens only (SFT); evaluation decodes greedily and scores exact match or F1
  against ``"answers"`` (a list) or ``"answer"``, by default the completion itself.
- ``reward``: one ``tasks.rewards.Prompted`` per row, ``{"prompt": ..., ...}``, the whole row
  passed to the task's reward with each completion.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoptim.tasks.data import DataError, data_path, read_rows
from zoptim.tasks.rewards import prompted

KINDS = ("classification", "multiple_choice", "generation")
ROLES = ("system", "user", "assistant")

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Choice:
    context: str
    options: tuple[str, ...]
    label: int  # the index of the correct option


@dataclass(frozen=True)
class Completion:
    prompt: str | tuple[Message, ...]  # text, or the chat messages before the answer
    completion: str
    answers: tuple[str, ...]  # references for exact match and F1

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


# How an example's text splits into the context and the part that is scored.
def split_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the white space that ends ``context`` to the start of ``continuation``."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def option_text(context: str, option: str) -> tuple[str, str]:
    """(context, continuation) for one option: a space between them unless one is there."""
    if not (context[-1:].isspace() or option[:1].isspace()):
        option = " " + option
    return split_space(context, option)


def _text(where: str, row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be non-empty text, not {value!r}")
    return value


def _object(where: str, row: object, keys: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object with {keys}, not "
                        f"{type(row).__name__}")
    return row


def _options(where: str, options: object) -> list[str]:
    if not isinstance(options, list) or len(options) < 2 or \
            not all(isinstance(o, str) and o.strip() for o in options):
        raise DataError(f"{where}: 'options' must be a list of at least two non-empty texts, "
                        f"not {options!r}")
    return options


def choice(where: str, row: object) -> Choice:
    """The ``Choice`` of one row, or a ``DataError`` that names the row."""
    row = _object(where, row, "'context', 'options' and 'answer'")
    context, options = _text(where, row, "context"), _options(where, row.get("options"))
    answer = row.get("answer")
    if isinstance(answer, str) and answer in options:
        answer = options.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or \
            not 0 <= answer < len(options):
        raise DataError(f"{where}: 'answer' must be an option's index (0 to "
                        f"{len(options) - 1}) or its text, not {answer!r}")
    return Choice(context, tuple(options), answer)


def _messages(where: str, messages: object) -> tuple[Message, ...]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least two messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {list(ROLES)}, "
                            f"'content': text}}, not {m!r}")
        out.append((m["role"], m["content"]))
    if out[-1][0] != "assistant" or not out[-1][1].strip():
        raise DataError(f"{where}: the last message must be the assistant's answer, non-empty")
    return tuple(out)


def _answers(where: str, row: dict, completion: str) -> tuple[str, ...]:
    if "answers" in row:
        answers = row["answers"]
        if not isinstance(answers, list) or not answers or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: 'answers' must be a list of non-empty texts, "
                            f"not {answers!r}")
        return tuple(answers)
    if "answer" in row:
        return (_text(where, row, "answer"),)
    return (completion,)


def completion(where: str, row: object) -> Completion:
    """The ``Completion`` of one row, or a ``DataError`` that names the row."""
    row = _object(where, row, "'prompt' and 'completion', or 'messages'")
    if "messages" in row:
        messages = _messages(where, row["messages"])
        answer = messages[-1][1]
        return Completion(messages[:-1], answer, _answers(where, row, answer))
    prompt, answer = _text(where, row, "prompt"), _text(where, row, "completion")
    return Completion(prompt, answer, _answers(where, row, answer))


READERS = {"multiple_choice": choice, "generation": completion, "reward": prompted}


def load_kind_file(kind: str, path: str | None) -> tuple[list, list[str]]:
    """The pool of a user's file of ``kind`` (``multiple_choice``, ``generation`` or
    ``reward``), every row checked, and its label names (none: the answers are in the examples)."""
    p = data_path(path)
    read = READERS[kind]
    pool = [read(f"{p}:{n}", row) for n, row in read_rows(p)]
    if not pool:
        raise DataError(f"{p}: no rows")
    return pool, []
