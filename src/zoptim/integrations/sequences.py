"""Log-likelihoods of continuations after contexts, in one batched decoder pass: the scoring
that multiple choice and teacher-forced generation share.

Each row is a context's tokens followed by a continuation's, tokenized apart so the
continuation's tokens are exactly known (white space that ends a context moves to the start
of its continuation, as lm-evaluation-harness does). Rows are padded on the left, with
position ids counted from each row's first real token, so a padded row scores as it would
alone; only the last positions, those that predict continuation tokens, are turned into
logits. A row longer than ``max_length`` loses the start of its context (said once).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from zoptim.engine.evaluators.batched import stack


@dataclass
class Rows:
    """A left-padded batch: ``ids`` and ``mask`` ``(B, T)``, and ``target`` ``(B, K)``, the
    last ``K`` tokens of each row, with ``scored`` marking which of them are continuation
    tokens (to be predicted from the position before)."""
    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    scored: torch.Tensor


def takes_positions(model) -> bool:
    """Whether ``model`` (or the model a peft wrapper holds) takes ``position_ids``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "position_ids" in inspect.signature(base.forward).parameters


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as ``(ids, attention mask)`` of shape ``(len(rows), longest)``, padded on
    the left, so every row's last token is at the last position."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


class Sequences:
    """Tokenizes (context, continuation) pairs for a decoder and scores them."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._warned = False

    def context_ids(self, context: str) -> list[int]:
        return self.tokenizer(context).input_ids

    def continuation_ids(self, continuation: str) -> list[int]:
        return self.tokenizer(continuation, add_special_tokens=False).input_ids

    def fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """One row of at most ``max_length`` tokens: the context loses its start first, the
        continuation its end only when it alone is too long."""
        continuation = continuation[:self.max_length - 1]
        room = self.max_length - len(continuation)
        if len(context) > room:
            if not self._warned:
                warnings.warn(f"a prompt is longer than model.max_length={self.max_length} "
                              "tokens with its answer; its start is cut (said once)",
                              stacklevel=3)
                self._warned = True
            context = context[len(context) - room:]
        return context + continuation

    def rows(self, pairs: list[tuple[list[int], list[int]]], device: torch.device) -> Rows:
        """The batch of token pairs (context ids, continuation ids), on ``device``."""
        fitted = [self.fit(c, t) for c, t in pairs]
        scored_len = [min(len(t), len(row) - 1) for (_, t), row in zip(pairs, fitted)]
        ids, mask = left_padded(fitted, self.tokenizer.pad_token_id)
        keep = max(scored_len)
        scored = torch.zeros((len(fitted), keep), dtype=torch.bool)
        for i, n in enumerate(scored_len):
            scored[i, keep - n:] = True
        return Rows(ids.to(device), mask.to(device), ids[:, ids.shape[1] - keep:].to(device),
                    scored.to(device))

    @staticmethod
    def log_likelihoods(model, rows: Rows, slices: int = 1,
                        group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row (of the batch stacked ``slices`` times; as it is under per-example
        points, ``group`` consecutive rows an example, see ``engine.evaluators.batched.stack``): the
        summed log-probability ``model`` gives its continuation tokens, and their number."""
        ids, mask = rows.ids, rows.mask
        if slices > 1:
            ids, mask = stack(ids, slices, group), stack(mask, slices, group)
        extra = {}
        if takes_positions(model):
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        keep = rows.target.shape[1]
        # The logits at the keep positions before the last predict the last keep tokens.
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep + 1,
                            **extra).logits[:, :-1].float()
        target, scored = rows.target, rows.scored
        if slices > 1:
            target, scored = stack(target, slices, group), stack(scored, slices, group)
        logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (logp * scored).sum(-1), scored.sum(-1)
