"""Prompt-based classification, the objective of MeZO-style fine-tuning.

- Decoders score the label words: the logits of each word's first token after the prompt's
  context (``"<text> It was"`` -> ``" great"`` / ``" terrible"``), at the last position.
- A decoder's linear probe (the ``head`` scheme) reads the same position through a head of
  its own: one row per label word, initialized from the output layer's rows for those words,
  so it starts at the zero-shot scores and trains apart from the frozen model.
- Encoders get a task-aligned head: cosine similarity (times a fixed scale) between the
  mean-pooled text embedding and one row per label, each row initialized from the embedding
  of that label's text (``"It was great."``), so zero-shot accuracy is sensible from step 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoptim.engine.evaluators.batched import per_slice, stack
from zoptim.tasks import Example, Prompt


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  slices: int | None) -> torch.Tensor:
    """Mean cross-entropy of a batch; with ``slices`` (the logits of the batch stacked that
    many times), one mean per slice."""
    if slices is None:
        return F.cross_entropy(logits, labels)
    losses = F.cross_entropy(logits, stack(labels, slices), reduction="none")
    return per_slice(losses, slices)


def accuracy(logits_of, examples: list, batch_size: int) -> float:
    """The share of ``examples`` whose label has the highest of the logits ``logits_of(chunk)``
    gives each example of a chunk (``batch_size`` at a time); NaN for none."""
    if not examples:
        return float("nan")
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        pred = logits_of(chunk).argmax(-1).cpu()
        correct += int((pred == torch.tensor([e.label for e in chunk])).sum())
    return correct / len(examples)


def _distinct(words, encodings: list, what: str = "encoding") -> None:
    """Refuse label words the tokenizer makes identical (an uncased model's "Great" and
    "great"): every prediction would fall in one class. Both words are named."""
    seen: dict = {}
    for word, code in zip(words, encodings):
        if code in seen:
            raise ValueError(f"label words {seen[code]!r} and {word!r} have the same {what} "
                             "for this model's tokenizer; choose words it tells apart")
        seen[code] = word


class CosineHead(torch.nn.Module):
    """``scale * cos(x, w_k)`` for each label row ``w_k``: a leaf module, so batched queries
    can run it once per slice with its perturbed rows."""

    def __init__(self, rows: torch.Tensor, scale: float):
        super().__init__()
        self.weight = torch.nn.Parameter(F.normalize(rows, dim=-1).clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T).float()


class PromptClassifier(torch.nn.Module):
    """Classification by label words (decoders) or a cosine head (encoders); ``score`` is
    accuracy."""

    metric = "accuracy"

    def __init__(self, backbone, tokenizer, prompt: Prompt, decoder: bool,
                 max_length: int = 128, scale: float = 20.0):
        super().__init__()
        self.backbone, self.tokenizer, self.prompt = backbone, tokenizer, prompt
        self.decoder, self.max_length = decoder, max_length
        if decoder:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"  # the last position is every row's last token
            ids = [tokenizer(" " + w, add_special_tokens=False).input_ids[0]
                   for w in prompt.label_words]
            _distinct(prompt.label_words, ids, "first token")
            self.register_buffer("label_ids", torch.tensor(ids), persistent=False)
            self.head = None  # a linear probe's head, from ``attach_label_head``
        else:
            texts = [prompt.label_text(i) for i in range(len(prompt.label_words))]
            _distinct(prompt.label_words, [tuple(tokenizer(t).input_ids) for t in texts])
            with torch.no_grad():
                anchors = self._embed(texts)
            self.head = CosineHead(anchors, scale)

    def attach_label_head(self) -> None:
        """Give a decoder a head of its own for the label words (a linear probe): the output
        layer's rows for the words' first tokens, copied, so its logits equal the label words'
        until it is trained (and a tied input embedding stays untouched)."""
        rows = self.backbone.get_output_embeddings().weight[self.label_ids].detach().clone()
        self.head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False,
                                    dtype=rows.dtype, device=rows.device)
        self.head.weight.data.copy_(rows)

    def _encode(self, texts: list[str]):
        device = next(self.backbone.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def _embed(self, texts: list[str], slices: int = 1) -> torch.Tensor:
        batch = self._stacked(self._encode(texts), slices)
        hidden = self.backbone(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    @staticmethod
    def _stacked(batch: dict, slices: int) -> dict:
        return batch if slices == 1 else {k: stack(v, slices) for k, v in batch.items()}

    def forward(self, texts: list[str], slices: int = 1) -> torch.Tensor:
        """Label logits, one row per text; with ``slices``, of the batch stacked that many
        times (batched queries)."""
        if self.decoder:
            batch = self._stacked(self._encode([self.prompt.context(t) for t in texts]), slices)
            if self.head is not None:  # the final hidden state (after the last norm) at the end
                hidden = self.backbone.base_model(**batch).last_hidden_state[:, -1]
                return self.head(hidden).float()
            logits = self.backbone(**batch, logits_to_keep=1).logits[:, -1]
            return logits[:, self.label_ids].float()
        return self.head(self._embed(texts, slices))

    def loss(self, examples: list[Example], slices: int | None = None) -> torch.Tensor:
        """Mean cross-entropy; given ``slices``, one mean per slice of the stacked batch."""
        labels = torch.tensor([e.label for e in examples], device=self._device())
        return cross_entropy(self([e.text for e in examples], slices or 1), labels, slices)

    def _device(self):
        return next(self.parameters()).device

    def logits(self, examples: list[Example]) -> torch.Tensor:
        """``(examples, labels)``: each label's logit for each example."""
        return self([e.text for e in examples])

    @torch.no_grad()
    def score(self, examples: list[Example], batch_size: int = 64) -> float:
        """Accuracy."""
        # Batches of similar length waste little work on padding; the order changes no result.
        examples = sorted(examples, key=lambda e: len(e.text))
        return accuracy(self.logits, examples, batch_size)
