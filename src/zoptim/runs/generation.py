"""``zoptim generate RUN --prompt TEXT``: greedy completions from a trained decoder run, at its
latest checkpoint, as its evaluation decodes them.

A run trained on chat examples renders each prompt as a user's message with the tokenizer's
chat template, ready for the assistant's turn; any other run gives the prompt as plain text.
A generation run's completions end where its evaluation cuts them (a plain prompt's answer at
the end of its line); other decoder runs (classification, multiple choice, rewards) decode
up to the token limit or the end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path

from zoptim.integrations.decoding import greedy
from zoptim.runs.run import RunError, open_run
from zoptim.tasks.kinds import Completion


def generate(folder: str | Path, prompts: list[str], max_new_tokens: int | None = None,
             batch_size: int = 8) -> list[tuple[str, bool]]:
    """Each prompt's greedy completion, with whether it ended before ``max_new_tokens``
    (the run's ``task.max_new_tokens`` when ``None``)."""
    _check_request(prompts, max_new_tokens)
    run, _ = open_run(folder)
    clf = run.clf
    if not getattr(clf, "decoder", False):
        raise RunError(f"{folder} trained {run.cfg.model.name!r}, which is not a decoder: "
                       "it has no text to generate")
    limit = max_new_tokens or run.cfg.task.max_new_tokens
    chat = any(getattr(e, "chat", False) for e in run.splits.train)
    if hasattr(clf, "context_ids"):  # a generation run: decoded as its evaluation decodes
        clf.max_new_tokens = limit
        return clf.generate([Completion(((("user", p),) if chat else p), "", ())
                             for p in prompts], batch_size)
    ids = [_chat_ids(clf.tokenizer, p) if chat else clf.tokenizer(p).input_ids
           for p in prompts]
    return [(text.strip(), ended) for text, ended in
            greedy(clf.backbone, clf.tokenizer, ids, limit, batch_size)]


def _check_request(prompts: list[str], max_new_tokens: int | None) -> None:
    if not prompts:
        raise RunError("give at least one prompt")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise RunError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    """A user's message rendered with the chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
