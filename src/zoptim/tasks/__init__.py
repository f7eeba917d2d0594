"""Tasks: datasets, splits and prompts for fine-tuning."""

from zoptim.tasks.data import Example, Splits, load_task
from zoptim.tasks.prompts import Prompt

__all__ = ["Example", "Splits", "load_task", "Prompt"]
