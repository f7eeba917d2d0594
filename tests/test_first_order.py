"""The first-order baseline (AdamW by backpropagation) behind the same run interface."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zoptim.runs import config
from zoptim.cli import main
from zoptim.methods.first_order import FirstOrderAdamW
from zoptim.runs.folder import latest_named as latest_checkpoint
from zoptim.runs.run import Interrupted, train

from conftest import MR_PATH, mlp

TINY = {"task": {"train": 32, "dev": 16, "test": 16, "path": MR_PATH},
        "model": {"scheme": "lora", "max_length": 32}, "batch_size": 8, "eval_every": 2,
        "save_every": 2, "eval_batch_size": 32,
        "method": {"name": "adamw", "settings": {"lr": 1e-3}}}


def test_steps_equal_torch_adamw_on_the_same_gradients(digits):
    xtr, ytr, _, _ = digits
    ours, theirs = mlp(), mlp()
    opt = FirstOrderAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        x, y = xtr[step * 32:(step + 1) * 32], ytr[step * 32:(step + 1) * 32]
        value = opt.step(lambda: torch.nn.functional.cross_entropy(ours(x), y))
        ref.zero_grad()
        loss = torch.nn.functional.cross_entropy(theirs(x), y)
        loss.backward()
        ref.step()
        assert value == loss.item()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert (opt.steps, opt.queries) == (5, 5) and all(p.grad is None for p in ours.parameters())


def test_a_non_finite_loss_is_skipped_without_touching_the_weights():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FirstOrderAdamW(model.parameters(), lr=1e-2)
    opt.step(lambda: model(torch.zeros(1, 64)).sum() * float("nan"))
    assert opt.last_skip == "non-finite loss" and opt.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_with_adamw_resumes_exactly_and_refuses_replay(tmp_path, capsys, monkeypatch):
    import zoptim.runs.run as run_module

    cfg = config.build({**TINY, "steps": 4})
    whole = train(cfg, tmp_path / "whole", progress=False, log=lambda *_: None)

    real_batch = run_module.batch

    def crash_at_step_3(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(run, step)

    monkeypatch.setattr(run_module, "batch", crash_at_step_3)
    with pytest.raises(Interrupted, match="interrupted at step 3 of 4"):
        train(cfg, tmp_path / "cut", progress=False, log=lambda *_: None)
    monkeypatch.setattr(run_module, "batch", real_batch)
    # checkpoint at step 2, the journal holds step 2 as well: it is run again, not replayed
    assert json.loads((tmp_path / "cut" / "latest.json").read_text())["step"] == 2
    assert (tmp_path / "cut" / "journal.jsonl").read_text().count("\n") == 3
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False, log=lambda *_: None)
    assert resumed["after"] == whole["after"] and whole["after"]["queries"] == 4
    a = load_file(str(latest_checkpoint(tmp_path / "whole") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "cut") / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["replay", str(tmp_path / "whole")]) == 1
    assert "cannot be replayed from its loss values" in capsys.readouterr().out
