"""Hugging Face models: loading, prompt-based classification heads, PEFT schemes, Trainer."""
