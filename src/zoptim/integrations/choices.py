"""Multiple choice with a decoder, as MeZO scores COPA, ReCoRD and MultiRC: each option is a
continuation of the example's context, scored by its log-likelihood (summed over its tokens,
or their mean with ``length_normalized``); the loss is the cross-entropy of those scores over
the options, the metric accuracy. Examples may have different numbers of options."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoptim.engine.evaluators.batched import each_row
from zoptim.integrations.classifier import accuracy
from zoptim.integrations.sequences import Sequences
from zoptim.tasks.kinds import Choice, option_text


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
        last option. Under per-example points (``engine.evaluators.batched.each_row``) the batch is
        not stacked (the first dimension is 1) and every example takes as many rows as the
        one with most options, its first option repeated as padding, so that its rows are
        one slice."""
        width = max(len(e.options) for e in examples)
        grouped = each_row()
        pairs, owners = [], []
        for i, e in enumerate(examples):
            padding = [e.options[0]] * (width - len(e.options)) if grouped else []
            for j, option in enumerate([*e.options, *padding]):
                context, continuation = option_text(e.context, option)
                pairs.append((self.sequences.context_ids(context),
                              self.sequences.continuation_ids(continuation)))
                owners.append((i, j))
        rows = self.sequences.rows(pairs, self._device())
        total, count = Sequences.log_likelihoods(self.backbone, rows, slices,
                                                 width if grouped else 1)
        if self.length_normalized:
            total = total / count.clamp_min(1)
        total = total.reshape(-1, len(pairs))
        scores = total.new_full((total.shape[0], len(examples), width), float("-inf"))
        real = [k for k, (i, j) in enumerate(owners) if j < len(examples[i].options)]
        rows_of, cols_of = zip(*(owners[k] for k in real))
        scores[:, list(rows_of), list(cols_of)] = total[:, real]
        return scores

    def loss(self, examples: list[Choice], slices: int | None = None) -> torch.Tensor:
        """Mean cross-entropy over the options; given ``slices``, one mean per slice (under
        per-example points, each example's own cross-entropy)."""
        scores = self.option_scores(examples, slices or 1)
        labels = torch.tensor([e.label for e in examples], device=scores.device)
        if each_row():
            return F.cross_entropy(scores[0], labels, reduction="none")
        losses = torch.stack([F.cross_entropy(s, labels) for s in scores])
        return losses if slices is not None else losses[0]

    def logits(self, examples: list[Choice]) -> torch.Tensor:
        """``(examples, most options)``: each option's score, ``-inf`` past an example's last."""
        return self.option_scores(examples)[0]

    @torch.no_grad()
    def score(self, examples: list[Choice], batch_size: int = 64) -> float:
        """Accuracy: the share of examples whose correct option scores highest."""
        return accuracy(self.logits, examples, batch_size)
