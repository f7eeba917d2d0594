"""First-order baselines: backpropagation with the interface the training loop and the
benchmark use, so a run can set the accuracy ceiling (and the memory cost) that zeroth-order
methods are measured against on the same model, data and batches.

A step computes one gradient by backpropagation and counts it as one query; the benchmark
compares first-order runs by accuracy and memory, not by queries.
"""

from __future__ import annotations

import torch

from zoptim.parts import settings
from zoptim.engine.optimizer import Counted, skip_non_finite


class FirstOrderAdamW(Counted, torch.optim.AdamW):
    """``torch.optim.AdamW`` behind the zeroth-order interface: ``step(closure)`` takes a
    closure that returns the loss (without calling ``backward()``), computes the gradient
    itself, and keeps ``steps``, ``queries``, ``last_values`` and the guard.

    Args:
        params: tensors or parameter groups.
        lr: learning rate.
        betas: the moments' decays.
        adam_eps: Adam's denominator term (``eps`` in ``torch.optim.AdamW``; named apart
            since ``eps`` is the perturbation scale everywhere else here).
        weight_decay: decoupled weight decay.
        seed: recorded with the state (the step itself is deterministic).
    """

    replayable = False  # a step needs its gradient, which the recorded loss cannot give

    def __init__(self, params, lr: float = 1e-5, betas=(0.9, 0.999), adam_eps: float = 1e-8,
                 weight_decay: float = 0.0, *, seed: int | None = None):
        settings.checked(dict(lr=lr, betas=betas, adam_eps=adam_eps, weight_decay=weight_decay))
        super().__init__(params, lr=lr, betas=tuple(betas), eps=adam_eps,
                         weight_decay=weight_decay)
        self._start_counting(0 if seed is None else seed)
        self.guard = skip_non_finite

    def step(self, closure=None, *, replay=None, skip=None) -> float:  # type: ignore[override]
        if replay is not None:
            raise ValueError("a first-order step cannot be redone from its loss values")
        if closure is None:
            raise ValueError("FirstOrderAdamW needs a closure that returns the loss")
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            value = float(loss.detach())
            reason = self.guard([value]) if self.guard is not None else None
            if reason is None:
                loss.backward()
                super().step()
            else:
                self.skipped += 1
        self.zero_grad(set_to_none=True)  # gradients are not kept between steps
        self.steps += 1
        self.queries += 1
        self.last_values, self.last_skip = [value], reason
        return value


class GRPO:
    """GRPO's settings (Shao et al., 2024, "DeepSeekMath", arXiv 2402.03300), the first-order
    baseline of reward tasks: checked where every method's are, trained by TRL's
    ``GRPOTrainer`` (``runs.grpo``), not stepped by the training loop.

    Args:
        params: unused (the run trains its model's trainable parameters).
        lr: AdamW's learning rate (TRL's default).
        generations: completions sampled per prompt; rewards are normalized in each group.
        temperature: the sampling temperature of the completions.
        beta: the KL penalty against the starting model (0: none, TRL's default).
        max_grad_norm: the gradient's clipping norm.
        micro_batches: a step's completions are back-propagated in this many parts, their
            gradients accumulated (one update a step all the same): the activation memory.
        seed: TRL's seed (prompt order, sampling); the run passes its own.
    """

    replayable = False

    def __init__(self, params=None, lr: float = 1e-6, generations: int = 8,
                 temperature: float = 1.0, beta: float = 0.0, max_grad_norm: float = 1.0,
                 micro_batches: int = 1, *, seed: int | None = None):
        settings.checked(dict(lr=lr, generations=generations, temperature=temperature,
                              beta=beta, max_grad_norm=max_grad_norm,
                              micro_batches=micro_batches))
        self.lr, self.generations, self.temperature = lr, generations, temperature
        self.beta, self.max_grad_norm, self.seed = beta, max_grad_norm, seed
        self.micro_batches = micro_batches

    def micro_batch(self, prompts: int) -> int:
        """The completions back-propagated together when a step has ``prompts`` prompts."""
        total = prompts * self.generations
        if total % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} does not divide a step's "
                             f"{total} completions ({prompts} prompts x {self.generations})")
        return total // self.micro_batches


BASELINES = {"adamw": FirstOrderAdamW}
# Baselines trained by their own loop on a reward task (``runs.grpo``).
REWARD_BASELINES = {"grpo": GRPO}
