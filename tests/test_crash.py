"""A run killed with SIGKILL at arbitrary moments resumes from its last checkpoint plus its
journal and ends with the same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import MR_PATH

SETTINGS = ["task.train=32", "task.dev=8", "task.test=8", f"task.path={json.dumps(MR_PATH)}",
            "batch_size=4", "eval_every=100", "save_every=4", "eval_batch_size=8",
            "model.scheme=\"lora\"", "model.max_length=32", "method.name=\"mezo\"",
            "method.settings={lr = 1e-3, eps = 1e-2, noise = \"rademacher\"}", "steps=12"]


def command(out, resume=False):
    args = [sys.executable, "-m", "zoptim.cli", "train", "--out", str(out), "--no-progress"]
    for s in SETTINGS:
        args += ["--set", s]
    return args + (["--resume"] if resume else [])


def journal_lines(out):
    path = out / "journal.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def final_weights(out):
    return load_file(str(out / "checkpoint-12" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(command(out), check=True, capture_output=True)
    return final_weights(out)


@pytest.mark.parametrize("kill_after", [1, 5, 10])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, kill_after):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while journal_lines(out) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal_lines(out) < 12, "the run finished before it could be killed"
    done = subprocess.run(command(out, resume=True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed at step" in done.stdout
    resumed = final_weights(out)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
