"""GRPO (Shao et al., 2024, "DeepSeekMath", arXiv 2402.03300) through TRL's ``GRPOTrainer``:
the adapter that hands TRL the task's prompts and reward and writes each step's record as a
zoptim run writes it. ``runs.grpo`` runs it as the first-order baseline of reward tasks.

A step samples ``generations`` completions for each of ``batch_size`` prompts (at
``temperature``), scores them with the task's reward, normalizes the rewards within each
prompt's group and takes one AdamW step on the policy-gradient loss (TRL's defaults
otherwise: its ``loss_type``, no KL term unless ``beta`` is given).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from zoptim.methods.first_order import GRPO


def _dataset(prompts: list):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [e.prompt for e in prompts],
                              "index": list(range(len(prompts)))})


def _reward_function(clf, prompts: list):
    """The task's reward as TRL calls it: each completion with its prompt's row."""
    from zoptim.tasks.rewards import call

    def task_reward(completions, index, **_):  # TRL passes everything by name
        return [call(clf.reward, prompts[i], text) for i, text in zip(index, completions)]

    return task_reward


def _config(cfg, method: GRPO, folder: Path, progress: bool):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(folder / "trl"),
        per_device_train_batch_size=method.micro_batch(cfg.batch_size),
        gradient_accumulation_steps=method.micro_batches, num_generations=method.generations,
        max_completion_length=cfg.task.max_new_tokens, learning_rate=method.lr,
        temperature=method.temperature, beta=method.beta, max_grad_norm=method.max_grad_norm,
        max_steps=cfg.steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=cfg.seed if method.seed is None else
        method.seed, disable_tqdm=not progress, dataloader_num_workers=0)


class _Records(TrainerCallback):
    """Each step's line of ``metrics.jsonl`` as a zoptim run writes it (``reward``,
    ``reward_spread``, generations, seconds), with the greedy dev reward every
    ``eval_every`` steps. ``reward`` is the mean over the step's sampled completions (a
    zeroth-order run's is over its members' greedy ones); the dev reward is greedy for
    both."""

    def __init__(self, run, method: GRPO, metrics: Path):
        self.run, self.method, self.metrics = run, method, metrics
        self.start = time.perf_counter()
        self.dev: float | None = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        cfg, step = self.run.cfg, state.global_step
        elapsed = time.perf_counter() - self.start
        generations = step * cfg.batch_size * self.method.generations
        record = {"step": step - 1, "loss": logs.get("loss"), "queries": step,
                  "generations": generations, "elapsed_s": round(elapsed, 3),
                  "reward": logs["reward"], "reward_spread": logs.get("reward_std", 0.0),
                  "generations_per_s": round(generations / max(elapsed, 1e-9), 3)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                self.dev = record["dev_acc"] = self.run.clf.score(self.run.splits.dev,
                                                                  cfg.eval_batch_size)
            model.train(was_training)
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")


def trainer(run, method: GRPO, folder: Path, progress: bool):
    """TRL's ``GRPOTrainer`` on ``run``'s model, training prompts and reward, and the callback
    that writes ``folder / "metrics.jsonl"`` (its ``dev`` holds the last dev reward)."""
    from trl import GRPOTrainer

    clf = run.clf
    clf.tokenizer.padding_side = "left"
    records = _Records(run, method, folder / "metrics.jsonl")
    grpo = GRPOTrainer(model=clf.backbone, reward_funcs=_reward_function(clf, run.splits.train),
                       args=_config(run.cfg, method, folder, progress),
                       train_dataset=_dataset(run.splits.train),
                       processing_class=clf.tokenizer, callbacks=[records])
    if not progress:  # TRL then prints every step's log: the run's records are the output
        from transformers import PrinterCallback

        grpo.remove_callback(PrinterCallback)
    return grpo, records
