"""Generation with a decoder: supervised fine-tuning on completions, evaluated by what the
model generates.

The loss is teacher-forced: the negative log-likelihood of the completion's tokens (and the
end-of-sequence token after them) given the prompt, the prompt's own tokens not scored; the
mean over each example's tokens, then over examples, so a long answer counts as much as a
short one. Chat examples are rendered with the tokenizer's chat template. Evaluation decodes
greedily with the KV cache (batches of similar prompt length, padded on the left), stops at
the end-of-sequence token or, for plain prompts, at the end of the line, and scores exact
match or token F1 against the example's answers (``tasks.metrics``).

With ``objective`` a metric (``"f1"`` or ``"exact_match"``, MeZO's ``--non_diff``), the loss is
``1 - metric`` of greedy generations instead: what zeroth-order methods can optimize and
backpropagation cannot. A generation that runs to ``max_new_tokens`` without ending scores 0.
Under batched queries the prompts are stacked once per slice and decoded together, each
slice's rows through its own perturbation, so a step's queries share every decoding pass.
Under per-example points (GRZO) each example's row is a slice of its own: the loss serves
them, greedy decoding does not.
"""

from __future__ import annotations

import torch

from zoptim.engine.evaluators.batched import per_slice
from zoptim.integrations.decoding import greedy
from zoptim.integrations.sequences import Sequences
from zoptim.tasks.kinds import Completion, split_space
from zoptim.tasks.metrics import METRICS, best_score

STOP = "\n"  # where a plain prompt's answer ends, as MeZO cuts SQuAD and DROP answers


class CompletionObjective(torch.nn.Module):
    decoder = True

    def __init__(self, backbone, tokenizer, max_length: int = 128, metric: str = "f1",
                 max_new_tokens: int = 32, objective: str = "loss"):
        super().__init__()
        for name, value, allowed in (("metric", metric, list(METRICS)),
                                     ("objective", objective, ["loss", *METRICS])):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        self.backbone, self.tokenizer, self.metric = backbone, tokenizer, metric
        self.objective = objective
        self.sequences = Sequences(tokenizer, max_length)
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def context_ids(self, e: Completion) -> list[int]:
        """The prompt's tokens (a chat prompt rendered with the template, ready for the
        assistant's turn)."""
        if not e.chat:
            return self.sequences.context_ids(split_space(e.prompt, e.completion)[0])
        messages = [{"role": r, "content": c} for r, c in e.prompt]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def answer_ids(self, e: Completion) -> list[int]:
        """The completion's tokens and the end-of-sequence token."""
        text = e.completion if e.chat else split_space(e.prompt, e.completion)[1]
        return self.sequences.continuation_ids(text) + [self.tokenizer.eos_token_id]

    def loss(self, examples: list[Completion], slices: int | None = None) -> torch.Tensor:
        """Mean per-token negative log-likelihood of the completions; given ``slices``, one
        mean per slice of the stacked batch. With a metric as the objective, ``1 - metric``
        of the greedy generations."""
        if self.objective != "loss":
            scores = self._scores(examples, len(examples), self.objective, unended=0.0,
                                  slices=slices or 1)
            losses = 1.0 - torch.tensor(scores, dtype=torch.float64)
            return losses if slices is not None else losses[0]
        rows = self.sequences.rows([(self.context_ids(e), self.answer_ids(e)) for e in examples],
                                   self._device())
        total, count = Sequences.log_likelihoods(self.backbone, rows, slices or 1)
        losses = per_slice(-total / count.clamp_min(1), slices or 1)
        return losses if slices is not None else losses[0]

    @torch.no_grad()
    def generate(self, examples: list[Completion], batch_size: int = 16, *,
                 use_cache: bool = True, slices: int = 1) -> list[tuple[str, bool]]:
        """Greedy completions of the examples' prompts (``decoding.greedy``), each with
        whether it ended (the end-of-sequence token, or a plain prompt's end of line) before
        the limit; with ``slices``, every slice's completions, slice after slice."""
        prompts = [self.context_ids(e)[-self.max_length:] for e in examples]
        out = []
        for k, (text, ended) in enumerate(greedy(self.backbone, self.tokenizer, prompts,
                                                 self.max_new_tokens, batch_size,
                                                 use_cache=use_cache, slices=slices)):
            if not examples[k % len(examples)].chat:
                ended = ended or STOP in text
                text = text.split(STOP)[0]
            out.append((text.strip(), ended))
        return out

    def _scores(self, examples: list[Completion], batch_size: int, metric: str, *,
                unended: float | None = None, slices: int = 1) -> list[float]:
        """The mean ``metric`` of greedy completions against the answers, one per slice; a
        completion that did not end before the limit scores ``unended`` where it is given."""
        generated = self.generate(examples, batch_size, slices=slices)
        n = len(examples)
        return [sum(unended if unended is not None and not ended
                    else best_score(metric, text, e.answers)
                    for (text, ended), e in zip(generated[s * n:(s + 1) * n], examples)) / n
                for s in range(slices)]

    @torch.no_grad()
    def score(self, examples: list[Completion], batch_size: int = 16) -> float:
        """The mean ``metric`` (exact match or F1) of greedy completions against the answers."""
        if not examples:
            return float("nan")
        return self._scores(examples, batch_size, self.metric)[0]
