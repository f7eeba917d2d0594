"""Tasks: datasets, splits and prompts for fine-tuning."""

from .data import Example, Splits, load_task
from .prompts import Prompt

__all__ = ["Example", "Splits", "load_task", "Prompt"]
