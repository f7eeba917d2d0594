"""First-order baselines: backpropagation with the interface the training loop and the
benchmark use, so a run can set the accuracy ceiling (and the memory cost) that zeroth-order
methods are measured against on the same model, data and batches.

A step computes one gradient by backpropagation and counts it as one query; the benchmark
compares first-order runs by accuracy and memory, not by queries.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from zoptim.parts import settings
from zoptim.engine.optimizer import Counted, skip_non_finite


class FirstOrderAdamW(Counted, torch.optim.AdamW):
    """``torch.optim.AdamW`` (Loshchilov & Hutter, 2019, "Decoupled Weight Decay
    Regularization") behind the zeroth-order interface: ``step(closure)`` takes a closure
    that returns the loss (without calling ``backward()``), computes the gradient itself, and
    keeps ``steps``, ``queries``, ``last_values`` and the guard. A step the guard refuses
    (a non-finite loss, by default) is skipped before its backward pass.

    The update, at step ``t`` with ``g`` the gradient of the closure's loss (as
    ``torch.optim.AdamW``):

        theta <- theta (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g,    v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + adam_eps)

    Args:
        params (iterable): tensors or parameter groups (dicts with per-group settings), as
            for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate. Default: 1e-5.
        betas (tuple[float, float], optional): the moments' decays, each in [0, 1).
            Default: ``(0.9, 0.999)``.
        adam_eps (float, optional): Adam's denominator term (``eps`` in
            ``torch.optim.AdamW``; named apart since ``eps`` is the perturbation scale
            everywhere else here). Default: 1e-8.
        weight_decay (float, optional): decoupled weight decay. Default: 0.0.
        seed (int, optional): recorded with the state (the step itself is deterministic;
            ``None``: 0). Default: None.
    """

    replayable = False  # a step needs its gradient, which the recorded loss cannot give

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, weight_decay: float = 0.0, *, seed: int | None = None):
        settings.checked(dict(lr=lr, betas=betas, adam_eps=adam_eps, weight_decay=weight_decay))
        super().__init__(params, lr=lr, betas=tuple(betas), eps=adam_eps,
                         weight_decay=weight_decay)
        self._start_counting(0 if seed is None else seed)
        self.guard = skip_non_finite

    def step(self, closure=None, *, replay=None, skip=None) -> float:  # type: ignore[override]
        """One step: the closure's loss, its gradient by backpropagation (unless the guard
        skips the step) and AdamW's update; one query.

        Args:
            closure (callable): returns the loss, without calling ``backward()``.
            replay: refused (a first-order step cannot be redone from its loss values).
            skip: unused (the guard decides).

        Returns:
            The closure's loss.
        """
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

    The objective, per prompt, over its ``generations`` sampled completions ``o_i`` whose
    rewards are normalized within the group into advantages ``A_i``, maximized by AdamW at
    ``lr`` with the gradient clipped to ``max_grad_norm``:

        J = mean_i A_i log pi(o_i) - beta KL(pi || pi_ref)

    (TRL's ``GRPOTrainer`` computes it: the normalization, the averaging over tokens and the
    clipping are its own.)

    Args:
        params (iterable, optional): unused (the run trains its model's trainable
            parameters). Default: None.
        lr (float, optional): AdamW's learning rate (TRL's default). Default: 1e-6.
        generations (int, optional): completions sampled per prompt; rewards are normalized
            in each group. Default: 8.
        temperature (float, optional): the sampling temperature of the completions.
            Default: 1.0.
        beta (float, optional): the KL penalty against the starting model (0: none, TRL's
            default). Default: 0.0.
        max_grad_norm (float, optional): the gradient's clipping norm. Default: 1.0.
        micro_batches (int, optional): a step's completions are back-propagated in this many
            parts, their gradients accumulated (one update a step all the same): the
            activation memory. Default: 1.
        seed (int, optional): TRL's seed (prompt order, sampling); the run passes its own.
            Default: None.
    """

    replayable = False

    def __init__(self, params: Iterable | None = None, lr: float = 1e-6, generations: int = 8,
                 temperature: float = 1.0, beta: float = 0.0, max_grad_norm: float = 1.0,
                 micro_batches: int = 1, *, seed: int | None = None):
        settings.checked(dict(lr=lr, generations=generations, temperature=temperature,
                              beta=beta, max_grad_norm=max_grad_norm,
                              micro_batches=micro_batches))
        self.lr, self.generations, self.temperature = lr, generations, temperature
        self.beta, self.max_grad_norm, self.seed = beta, max_grad_norm, seed
        self.micro_batches = micro_batches

    def micro_batch(self, prompts: int) -> int:
        """The completions back-propagated together when a step has ``prompts`` prompts.

        Args:
            prompts (int): the prompts of a step.

        Returns:
            The completions of one micro-batch.

        Raises:
            ValueError: ``micro_batches`` does not divide the step's completions.
        """
        total = prompts * self.generations
        if total % self.micro_batches:
            raise ValueError(f"micro_batches={self.micro_batches} does not divide a step's "
                             f"{total} completions ({prompts} prompts x {self.generations})")
        return total // self.micro_batches


BASELINES = {"adamw": FirstOrderAdamW}
# Baselines trained by their own loop on a reward task (``runs.grpo``).
REWARD_BASELINES = {"grpo": GRPO}
