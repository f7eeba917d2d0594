"""The named methods: each an estimator, a space per parameter group and a chain of transforms."""

from zoptim.methods.named import *  # noqa: F401,F403
