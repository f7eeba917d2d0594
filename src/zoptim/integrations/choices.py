"""Multiple choice with a decoder, as MeZO scores COPA, ReCoRD and MultiRC: each option is a
continuation of the example's context, scored by its log-likelihood (summed over its tokens,
or their mean with ``length_normalized``); the loss is the cross-entropy of those scores over
the options, the metric accuracy. Examples may have different numbers of options."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoptim.integrations.classifier import accuracy
from zoptim.integrations.sequences import Sequences, split_space
from zoptim.tasks.kinds import Choice


def option_text(context: str, option: str) -> tuple[str, str]:
    """(context, continuation) for one option: a space between them unless one is there."""
    if not (context[-1:].isspace() or option[:1].isspace()):
        option = " " + option
    return split_space(context, option)


class ChoiceObjective(torch.nn.Module):
    metric = "accuracy"
    decoder = True

    def __init__(self, backbone, tokenizer, max_length: int = 128,
                 length_normalized: bool = False):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.sequences = Sequences(tokenizer, max_length)
        self.length_normalized = length_normalized

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def option_scores(self, examples: list[Choice], slices: int = 1) -> torch.Tensor:
        """``(slices, examples, most options)`` log-likelihoods, ``-inf`` past an example's
        last option."""
        pairs, owners = [], []
        for i, e in enumerate(examples):
            for j, option in enumerate(e.options):
                context, continuation = option_text(e.context, option)
                pairs.append((self.sequences.context_ids(context),
                              self.sequences.continuation_ids(continuation)))
                owners.append((i, j))
        rows = self.sequences.rows(pairs, self._device())
        total, count = Sequences.log_likelihoods(self.backbone, rows, slices)
        if self.length_normalized:
            total = total / count.clamp_min(1)
        total = total.reshape(slices, len(pairs))
        width = max(len(e.options) for e in examples)
        scores = total.new_full((slices, len(examples), width), float("-inf"))
        rows_of, cols_of = zip(*owners)
        scores[:, list(rows_of), list(cols_of)] = total
        return scores

    def loss(self, examples: list[Choice], slices: int | None = None) -> torch.Tensor:
        """Mean cross-entropy over the options; given ``slices``, one mean per slice."""
        scores = self.option_scores(examples, slices or 1)
        labels = torch.tensor([e.label for e in examples], device=scores.device)
        losses = torch.stack([F.cross_entropy(s, labels) for s in scores])
        return losses if slices is not None else losses[0]

    @torch.no_grad()
    def score(self, examples: list[Choice], batch_size: int = 64) -> float:
        """Accuracy: the share of examples whose correct option scores highest."""
        return accuracy(lambda chunk: self.option_scores(chunk)[0], examples, batch_size)
