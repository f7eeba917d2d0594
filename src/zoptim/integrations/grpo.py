"""The first-order baseline of reward-only fine-tuning: GRPO (Shao et al., 2024, "DeepSeekMath",
arXiv 2402.03300) through TRL's ``GRPOTrainer``, run by ``zoptim train`` with
``method.name = "grpo"`` on a reward task, on the same model, prompts and reward as the
zeroth-order methods, and writing what their runs write (``summary.json``, ``metrics.jsonl``),
so that ``zoptim bench`` puts them side by side.

A step samples ``generations`` completions for each of ``batch_size`` prompts (at
``temperature``), scores them with the task's reward, normalizes the rewards within each
prompt's group and takes one AdamW step on the policy-gradient loss (TRL's defaults
otherwise: its ``loss_type``, no KL term unless ``beta`` is given). Its budget is counted in
generations, ``steps * batch_size * generations``, against a zeroth-order step's
``queries * batch_size``. Before and after, and every ``eval_every`` steps, the dev prompts
are scored greedily, as every reward run is.

An interrupted GRPO run starts again from its first step (TRL's own checkpoints are not
kept); the final weights are not saved.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from zoptim.methods.first_order import GRPO
from zoptim.runs.checkpoints import write_json
from zoptim.runs.run import build


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


def train(cfg, out: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """``zoptim train`` with ``method.name = "grpo"`` (see the module's docstring); a finished
    run is not run again."""
    from trl import GRPOTrainer

    folder = Path(out)
    summary_path = folder / "summary.json"
    if resume and summary_path.exists() and "after" in json.loads(summary_path.read_text()):
        return json.loads(summary_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    run = build(cfg)
    method: GRPO = run.opt
    write_json(folder / "config.json", json.loads(cfg.model_dump_json()))
    write_json(folder / "split.json", run.splits.record)
    (folder / "metrics.jsonl").write_text("")  # an interrupted run starts again
    clf, size = run.clf, cfg.eval_batch_size
    before = {"dev_acc": clf.score(run.splits.dev, size),
              "test_acc": clf.score(run.splits.test, size)}
    summary = {"metric": clf.metric, "before": before}
    write_json(summary_path, summary)
    log(f"before: dev {before['dev_acc']:.4f}  test {before['test_acc']:.4f}")
    clf.tokenizer.padding_side = "left"
    records = _Records(run, method, folder / "metrics.jsonl")
    trainer = GRPOTrainer(model=clf.backbone, reward_funcs=_reward_function(clf, run.splits.train),
                          args=_config(cfg, method, folder, progress),
                          train_dataset=_dataset(run.splits.train),
                          processing_class=clf.tokenizer, callbacks=[records])
    if not progress:  # TRL then prints every step's log: the run's records are the output
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    shutil.rmtree(folder / "trl", ignore_errors=True)  # TRL's output folder, left empty
    clf.backbone.eval()
    after = {"dev_acc": records.dev if records.dev is not None else clf.score(run.splits.dev,
                                                                              size),
             "test_acc": clf.score(run.splits.test, size), "steps": cfg.steps,
             "queries": cfg.steps, "skipped_steps": 0,
             "generations": cfg.steps * cfg.batch_size * method.generations}
    summary.update(after=after, wall_s=wall, command=["zoptim", *sys.argv[1:]])
    write_json(summary_path, summary)
    log(f"after:  dev {after['dev_acc']:.4f}  test {after['test_acc']:.4f}  ({cfg.steps} steps, "
        f"{after['generations']} generations)")
    return summary


def memory_of_step(run, examples: list) -> dict:
    """What a GRPO step holds, measured as ``bench.memory`` measures every row: the
    parameters, AdamW's state and the gradients, and the transient peak of one backward
    through the policy on one micro-batch of the step's ``len(examples) * generations``
    sequences of prompt plus ``max_new_tokens`` completion tokens (sampling, under
    ``no_grad``, holds less). The run's weights change."""
    from zoptim.bench.memory import first_order

    clf, method = run.clf, run.opt
    new = run.cfg.task.max_new_tokens
    prompts = [clf.prompt_ids(e) for e in examples for _ in range(method.generations)]
    prompts = prompts[:method.micro_batch(len(examples))]  # one micro-batch's backward
    width = max(len(p) for p in prompts) + new
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(prompts), width), clf.tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left-padded as TRL pads, a sampled-like completion
        ids[row, width - new - len(p):width - new] = torch.tensor(p)
        ids[row, width - new:] = torch.randint(0, len(clf.tokenizer), (new,), generator=g)
        mask[row, width - new - len(p):] = 1
    model = clf.backbone.train()

    def loss():  # the completion's log-probabilities, as TRL computes them
        logits = model(input_ids=ids, attention_mask=mask,
                       logits_to_keep=new + 1).logits[:, :-1]
        return -logits.log_softmax(-1).gather(-1, ids[:, -new:, None]).mean()

    row = first_order(model, loss, lr=method.lr)
    row["total"] = row["params"] + row["state"] + row["transient"]
    return row
