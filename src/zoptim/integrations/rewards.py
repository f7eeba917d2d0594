"""A reward of greedy completions as the objective: reward-only fine-tuning of a decoder.

The loss of a batch of prompts is minus the mean reward of the model's greedy completions
(``tasks.rewards``); any zeroth-order method lowers it, evolution strategies (``ES``) as the
ES paper does. Rollouts are batched with the KV cache (``decoding.greedy``), and under
batched queries the prompts are stacked once per query so a step's population shares each
decoding pass. A completion is decoded up to ``max_new_tokens`` tokens or the end-of-sequence
token; the prompt is tokenized as plain text.
"""

from __future__ import annotations

import torch

from zoptim.integrations.decoding import greedy
from zoptim.tasks.rewards import Prompted, Reward, call


class RewardObjective(torch.nn.Module):
    decoder = True
    metric = "reward"

    def __init__(self, backbone, tokenizer, reward: Reward, max_length: int = 128,
                 max_new_tokens: int = 32):
        super().__init__()
        self.backbone, self.tokenizer, self.reward = backbone, tokenizer, reward
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def prompt_ids(self, e: Prompted) -> list[int]:
        """The prompt's last ``max_length`` tokens."""
        return self.tokenizer(e.prompt).input_ids[-self.max_length:]

    def completions(self, examples: list[Prompted], batch_size: int,
                    slices: int = 1) -> list[tuple[str, bool]]:
        """Every greedy completion, with whether it ended before the limit, slice after
        slice."""
        return list(greedy(self.backbone, self.tokenizer, [self.prompt_ids(e) for e in examples],
                           self.max_new_tokens, batch_size, slices=slices))

    def rewards(self, examples: list[Prompted], batch_size: int,
                slices: int = 1) -> list[float]:
        """Every completion's reward, slice after slice."""
        return [call(self.reward, examples[k % len(examples)], text)
                for k, (text, _) in enumerate(self.completions(examples, batch_size, slices))]

    def loss(self, examples: list[Prompted], slices: int | None = None,
             per_example: bool = False) -> torch.Tensor:
        """Minus the mean reward of the batch's completions; given ``slices``, one per
        slice of the stacked batch; with ``per_example``, minus each completion's reward
        (``(slices, batch)``, or ``(batch,)``), for a per-prompt normalization."""
        values = torch.tensor(self.rewards(examples, len(examples), slices or 1),
                              dtype=torch.float64).reshape(slices or 1, len(examples))
        losses = -values if per_example else -values.mean(1)
        return losses if slices is not None else losses[0]

    @torch.no_grad()
    def score(self, examples: list[Prompted], batch_size: int = 16) -> float:
        """The mean reward of greedy completions."""
        if not examples:
            return float("nan")
        return sum(self.rewards(examples, batch_size)) / len(examples)
