"""Prompts for classification as MeZO does it: a template that puts the text before a label
word, e.g. ``"{text} It was {label}."`` with label words ``["terrible", "great"]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    template: str
    label_words: tuple[str, ...]

    def __post_init__(self):
        if self.template.count("{text}") != 1 or self.template.count("{label}") != 1:
            raise ValueError(f"template {self.template!r} must contain {{text}} and {{label}} "
                             "once each")
        if self.template.index("{text}") > self.template.index("{label}"):
            raise ValueError("the template must put {text} before {label}")
        if len(set(self.label_words)) != len(self.label_words) or len(self.label_words) < 2:
            raise ValueError(f"label words {list(self.label_words)} must be at least two, "
                             "all different")

    def context(self, text: str) -> str:
        """What a decoder reads before it scores the label words."""
        return self.template.split("{label}")[0].replace("{text}", text).rstrip()

    def label_text(self, i: int) -> str:
        """The template with an empty text and label word ``i``: an encoder's label anchor."""
        return self.template.replace("{text}", "").replace("{label}", self.label_words[i]).strip()
