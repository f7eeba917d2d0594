"""In-context learning: ``k`` solved training examples, drawn with the run's seed, put before
every prompt (Brown et al., 2020, "Language Models are Few-Shot Learners"; MeZO's ICL
baseline). Each demonstration is rendered as the model should answer it (the text with its
label word, the context with the correct option, the prompt with its completion), joined by
blank lines; a chat prompt gets them as earlier user and assistant turns."""

from __future__ import annotations

import random
from dataclasses import replace

from zoptim.tasks.data import Example, Splits
from zoptim.tasks.kinds import Choice, Completion, option_text
from zoptim.tasks.prompts import Prompt

SEPARATOR = "\n\n"


def _solved(demo, prompt: Prompt | None) -> str:
    """A demonstration as text: the example with its answer."""
    if isinstance(demo, Example):
        return prompt.template.replace("{text}", demo.text).replace(
            "{label}", prompt.label_words[demo.label])
    if isinstance(demo, Choice):
        return "".join(option_text(demo.context, demo.options[demo.label]))
    return _plain(demo.prompt) + demo.completion


def _plain(prompt) -> str:
    """A chat prompt's turns as text (for a plain prompt's demonstrations)."""
    return prompt if isinstance(prompt, str) else "\n".join(c for _, c in prompt)


def _turns(demo: Completion) -> tuple:
    """A demonstration as chat turns: its prompt, then the assistant's completion."""
    user = demo.prompt if demo.chat else (("user", demo.prompt),)
    return (*user, ("assistant", demo.completion.strip()))


def _prepended(example, demos: list, prompt: Prompt | None):
    if isinstance(example, Completion) and example.chat:
        return replace(example, prompt=tuple(t for d in demos for t in _turns(d)) +
                       example.prompt)
    head = SEPARATOR.join(_solved(d, prompt) for d in demos) + SEPARATOR
    if isinstance(example, Example):
        return replace(example, text=head + example.text)
    if isinstance(example, Choice):
        return replace(example, context=head + example.context)
    return replace(example, prompt=head + example.prompt)


def with_demonstrations(splits: Splits, k: int, seed: int, prompt: Prompt | None) -> Splits:
    """``splits`` with ``k`` training examples (drawn with ``seed``) before every prompt of
    every split; the draw is recorded in ``record["demonstrations"]`` (train positions).
    ``prompt`` renders classification demonstrations."""
    if k > len(splits.train):
        raise ValueError(f"{k} demonstrations asked, but the training set has "
                         f"{len(splits.train)} examples")
    picked = random.Random(f"{seed}:demonstrations").sample(range(len(splits.train)), k)
    demos = [splits.train[i] for i in picked]
    parts = [[_prepended(e, demos, prompt) for e in part]
             for part in (splits.train, splits.dev, splits.test)]
    return Splits(splits.labels, *parts, record={**splits.record, "demonstrations": picked})
