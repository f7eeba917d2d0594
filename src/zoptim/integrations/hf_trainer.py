"""A Hugging Face ``Trainer`` whose steps are zeroth-order, for users who already train with
``Trainer`` (datasets, collators, callbacks, logging, schedulers stay as they are)::

    trainer = ZOTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        zo_method="zo-muon", zo_settings={"lr": 1e-2, "rank": 32})
    trainer.train()

``training_step`` runs one ``opt.step(closure)`` on the batch with the model in eval mode (no
dropout), where the closure is ``Trainer.compute_loss``; no backward pass runs. The optimizer
that ``Trainer`` itself steps is a stand-in sharing the ZO optimizer's parameter groups, so
learning-rate schedulers act on the ZO learning rate.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from zoptim.methods import METHODS, model_arguments


class _SharedGroups(torch.optim.Optimizer):
    """What ``Trainer`` and its scheduler see: the ZO optimizer's groups; stepping is a no-op
    because the ZO step already happened inside ``training_step``."""

    def __init__(self, zo: torch.optim.Optimizer):
        self.zo = zo
        self.defaults = zo.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    # Properties, not copies: loading a state replaces the ZO optimizer's group list.
    @property
    def param_groups(self):
        return self.zo.param_groups

    @property
    def state(self):
        return self.zo.state

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None

    def state_dict(self):
        return self.zo.state_dict()

    def load_state_dict(self, state_dict):
        self.zo.load_state_dict(state_dict)


class ZOTrainer(Trainer):
    def __init__(self, *args, zo_method: str = "mezo", zo_settings: dict | None = None,
                 zo_seed: int | None = None, **kwargs):
        if zo_method not in METHODS:
            raise ValueError(f"unknown method {zo_method!r}; choose one of {', '.join(METHODS)}")
        if METHODS[zo_method].per_example_directions:
            raise ValueError(f"{zo_method} perturbs each example through activations (batched "
                             "queries), and Trainer.compute_loss evaluates a batch as one loss: "
                             "train it with zoptim train or a closure of its own")
        self.zo_method, self.zo_settings, self.zo_seed = zo_method, dict(zo_settings or {}), zo_seed
        self.zo_optimizer = None
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            target = model if model is not None else self.model
            params = [p for p in target.parameters() if p.requires_grad]
            # Trainer.compute_loss evaluates one batch: no stacked closure, no batched queries
            extra = model_arguments(METHODS[self.zo_method], target, stacked_closure=False)
            settings = {"lr": self.args.learning_rate, **self.zo_settings}
            seed = self.args.seed if self.zo_seed is None else self.zo_seed
            self.zo_optimizer = METHODS[self.zo_method](params, seed=seed, **settings, **extra)
            self.optimizer = _SharedGroups(self.zo_optimizer)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.eval()
        inputs = self._prepare_inputs(inputs)
        loss = self.zo_optimizer.step(lambda: self.compute_loss(model, inputs))
        return torch.tensor(loss, device=self.args.device)
