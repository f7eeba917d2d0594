"""Nothing lost, nothing silent: a locked run folder, absurd settings that cannot destroy the
weights, damaged journals and checkpoints that are found and recovered from, data that must
be the run's own, an interrupt that says where the run stands, and a data fetch that runs
nothing it downloads."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import MR_PATH
from zoptim.cli import main
from zoptim.runs import config
from zoptim.runs.run import build
from zoptim.tasks.data import DataError, MR_FILE, fetch_mr

SETTINGS = ["task.train=16", "task.dev=8", "task.test=8", f"task.path={json.dumps(MR_PATH)}",
            "batch_size=4", "eval_batch_size=8", "model.scheme=\"lora\"", "model.max_length=32",
            "method.name=\"mezo\"", "method.settings={lr = 1e-3, eps = 1e-2}", "eval_every=100"]


def args(out, *sets, extra=()):
    line = ["train", "--out", str(out), "--no-progress", *extra]
    for s in [*SETTINGS, *sets]:
        line += ["--set", s]
    return line


def weights(out, step):
    return load_file(str(out / f"checkpoint-{step}" / "trainable.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run of 6 steps, saved at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(args(out, "steps=6", "save_every=2")) == 0
    return out


def start_weights(*sets):
    run = build(config.load(None, [*SETTINGS, *sets]))
    return {n: p.detach().clone() for n, p in run.params.items()}


@pytest.mark.parametrize("setting", ["method.settings={lr = 1e308, eps = 1e-2}",
                                     "method.settings={lr = 1e-3, eps = 1e30}"])
def test_absurd_settings_leave_the_weights_exactly_as_they_were(tmp_path, capsys, setting):
    """An update that overflows (lr = 1e308) or probes that do (eps = 1e30) skip every step,
    and the weights end bit for bit where they started: nothing non-finite is saved."""
    out = tmp_path / "run"
    assert main(args(out, setting, "steps=2", "save_every=1")) == 0
    assert "skipped" in capsys.readouterr().out
    assert same(weights(out, 2), start_weights(setting))
    assert main(["replay", str(out)]) == 0


def test_two_runs_into_one_folder_at_once_one_refuses(tmp_path):
    out = tmp_path / "run"
    line = [sys.executable, "-m", "zoptim.cli", *args(out, "steps=30")]
    first = subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "journal.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)  # the first run holds the lock and is training
    second = subprocess.run(line, capture_output=True, text=True)
    first.wait()
    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 2
    assert "is being written by process" in second.stderr or "already holds a run" in \
        second.stderr, second.stderr
    steps = [json.loads(x)["step"] for x in (out / "journal.jsonl").read_text().splitlines()]
    assert steps == list(range(30))  # one journal, not two interleaved


def test_the_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    from zoptim.runs.folder import FolderError, Lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from zoptim.runs.folder import Lock; "
        f"Lock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderError, match=f"written by process {holder.pid}"):
        Lock(tmp_path).acquire()
    holder.kill()  # a killed process leaves no stale lock
    holder.wait()
    with Lock(tmp_path):
        pass


def copy_run(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    return out


def test_a_damaged_journal_line_fails_replay_and_resume_keeps_the_intact_lines(whole, tmp_path,
                                                                               capsys):
    out = copy_run(whole, tmp_path)
    lines = (out / "journal.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"queries":', '"queries":1', 1)
    (out / "journal.jsonl").write_text("".join(lines))
    assert main(["replay", str(out)]) == 1
    assert "line 2 damaged" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 1
    said = capsys.readouterr().out
    assert "line 2 damaged" in said and "from checkpoint-6 and the journal, at step 6" in said
    # resuming from checkpoint-6 (past the damage) keeps every line, the damaged one too
    assert main(args(out, "steps=6", "save_every=2", extra=["--resume"])) == 0
    assert (out / "journal.jsonl").read_text() == "".join(lines)
    assert "cannot be replayed from its start" in capsys.readouterr().out


def test_replay_without_a_journal_fails(whole, tmp_path, capsys):
    out = copy_run(whole, tmp_path)
    (out / "journal.jsonl").unlink()
    assert main(["replay", str(out)]) == 1
    said = capsys.readouterr().out
    assert "journal.jsonl is missing" in said and "replayed 0 steps" in said


@pytest.mark.parametrize("damage", ["truncated weights", "missing checkpoint",
                                    "pointer outside the folder"])
def test_resume_survives_a_damaged_latest_checkpoint(whole, tmp_path, capsys, damage):
    """The run stopped at step 4; its latest checkpoint is damaged, or the pointer to it.
    Resume rolls the journal forward from the starting weights (or finds the checkpoint
    itself) and ends where an uninterrupted run does."""
    out = tmp_path / "run"
    assert main(args(out, "steps=4", "save_every=2")) == 0
    before = (out / "config.json").read_bytes()
    if damage == "truncated weights":
        path = out / "checkpoint-4" / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "missing checkpoint":
        shutil.rmtree(out / "checkpoint-4")
    else:
        (out / "latest.json").write_text(json.dumps({"checkpoint": "../../etc", "step": 4}))
    assert main(["verify", str(out)]) == 1
    assert "--resume continues from" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 2
    capsys.readouterr()
    assert main(args(out, "steps=6", "save_every=2", extra=["--resume"])) == 0
    said = capsys.readouterr().out
    # a damaged checkpoint: the starting weights and 4 journalled steps; a bad pointer: the
    # whole checkpoint-4 is found without it
    rolled = "+ 0 journalled steps" if damage == "pointer outside the folder" else \
        "the starting weights + 4 journalled steps"
    assert "warning:" in said and "resumed at step 4" in said and rolled in said
    assert same(weights(out, 6), weights(whole, 6))
    assert json.loads((out / "config.json").read_bytes())["steps"] == 6
    assert json.loads(before)["steps"] == 4
    assert main(["verify", str(out)]) == 0


def test_a_run_whose_data_changed_is_refused(tmp_path, capsys):
    data = tmp_path / "mr.txt"
    shutil.copy(MR_PATH, data)
    out = tmp_path / "run"
    sets = [f"task.path={json.dumps(str(data))}", "steps=2"]
    assert main(args(out, *sets)) == 0
    capsys.readouterr()
    lines = data.read_bytes().splitlines()
    data.write_bytes(b"\n".join(reversed(lines)) + b"\n")  # the same rows, reordered
    before = snapshot(out)
    for command in (["eval", str(out)], ["replay", str(out)],
                    args(out, *sets, "steps=3", extra=["--resume"])):
        code = main(command)
        said = capsys.readouterr()
        assert "differs from the data this run was trained on" in said.err + said.out
        assert code in (1, 2)
    assert snapshot(out) == before


def test_ctrl_c_says_where_the_run_stands_and_resume_finishes_it(tmp_path):
    """A run far longer than the test waits is interrupted after three steps; resumed to two
    steps past where it stood, it ends where an uninterrupted run of as many steps does."""
    out = tmp_path / "run"
    line = [sys.executable, "-m", "zoptim.cli", *args(out, "steps=100000", "save_every=2")]
    # a suite started in the background (`cmd &`) inherits SIGINT ignored; the run must not
    proc = subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    path, deadline = out / "journal.jsonl", time.time() + 240
    while (not path.exists() or path.read_text().count("\n") < 3) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run went on after Ctrl-C") from None
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("zoptim train: interrupted at step") and last.endswith("--resume")
    stood = int(last.split("interrupted at step ")[1].split()[0])
    assert stood >= 3
    # the command printed works as printed: the run reads its own configuration
    printed = last.split("continue with ")[1].split()
    assert printed == ["zoptim", "train", "--out", str(out), "--resume"]
    assert main([*printed[1:], "--steps", str(stood + 2), "--no-progress"]) == 0
    end = f"steps={stood + 2}"
    assert main(args(tmp_path / "whole", end, "save_every=2")) == 0
    assert same(weights(out, stood + 2), weights(tmp_path / "whole", stood + 2))


def sdist(member: bytes) -> bytes:
    """A stand-in for the vaderSentiment source distribution: the data file inside an inner
    archive inside the outer one, as on PyPI."""
    def tar(name, data):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        return buf.getvalue()
    inner = tar(f"hutto_ICWSM_2014/{MR_FILE}", member)
    return tar("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner)


def test_the_mr_fetch_checks_the_pinned_hash_and_builds_nothing(tmp_path):
    archive = sdist(b"1\t2.5\tgood\n")
    source = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    source.write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    got = fetch_mr(tmp_path / "cache", source.as_uri(), digest)
    assert got.read_bytes() == b"1\t2.5\tgood\n"
    with pytest.raises(DataError, match="SHA-256 differs from the pinned one"):
        fetch_mr(tmp_path / "other", source.as_uri(), "0" * 64)
    assert not (tmp_path / "other").exists()
    with pytest.raises(DataError, match="could not download"):
        fetch_mr(tmp_path / "other", (tmp_path / "none.tar.gz").as_uri(), digest)


def test_the_first_step_says_it_compiles(tmp_path, capsys, monkeypatch):
    import zoptim.noise as noise

    monkeypatch.setattr(noise, "_compiled", {})
    monkeypatch.setattr(noise, "_backend", "auto")
    assert main(args(tmp_path / "run", "steps=1")) == 0
    assert capsys.readouterr().out.count("compiles the noise kernel") == 1


def test_nothing_is_left_when_a_new_run_fails_after_taking_the_lock(tmp_path, monkeypatch):
    """An error between the lock and the first record leaves no folder behind."""
    import zoptim.runs.run as run_module

    def broken(self, had_run):
        raise run_module.RunError("broken on purpose")

    monkeypatch.setattr(run_module.Training, "restore", broken)
    assert main(args(tmp_path / "run", "steps=1")) == 2
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path) == []
