"""A griffe extension for the API reference: docstrings that are completed when their module
is imported (the methods' shared ``Args`` entries, put in place of a ``{common}`` line by a
decorator) are read from the imported class instead of the source, where the placeholder
still stands."""

from __future__ import annotations

import inspect
import re

import griffe

PLACEHOLDER = re.compile(r"^\s*\{\w+\}\s*$", re.MULTILINE)


class RuntimeDocstrings(griffe.Extension):
    def on_class_instance(self, *, node, cls, agent, **kwargs) -> None:
        if cls.docstring is None or not PLACEHOLDER.search(cls.docstring.value):
            return
        try:
            obj = griffe.dynamic_import(cls.path)
        except ImportError:
            return
        doc = getattr(obj, "__doc__", None)
        if doc and not PLACEHOLDER.search(doc):
            cls.docstring.value = inspect.cleandoc(doc)
