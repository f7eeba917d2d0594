"""Recovery that finishes: a finished run whose newest checkpoint is damaged or missing is
repaired by ``--resume`` from its journal, after which ``verify`` finds it whole and ``eval``
works; a full disk ends in one line that says what the next checkpoint needs."""

import errno
import json
import shutil

import pytest

from zoptim.cli import main

from test_bad_inputs import train_args


def damage(run, how):
    newest = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    if how == "truncated":
        (newest / "trainable.safetensors").write_bytes(b"\0" * 10)
    elif how == "missing":
        shutil.rmtree(newest)
    else:  # latest.json names a checkpoint that is not there
        (run / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-99", "step": 99}))


@pytest.mark.parametrize("how", ["truncated", "missing", "misnamed"])
def test_resume_repairs_a_finished_run_whose_newest_checkpoint_is_gone(tmp_path, capsys, how):
    run = tmp_path / "run"
    assert main(train_args(run, "save_every=1")) == 0
    weights = (run / "checkpoint-2" / "trainable.safetensors").read_bytes()
    damage(run, how)
    assert main(["verify", str(run)]) == 1
    assert "--resume" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 2 or how == "misnamed"
    assert main(train_args(run, "save_every=1", extra=["--resume"])) == 0
    assert "repairing" in capsys.readouterr().out
    # the weights rolled forward from the journal are the run's own, bit for bit
    assert (run / "checkpoint-2" / "trainable.safetensors").read_bytes() == weights
    assert main(["verify", str(run)]) == 0
    assert main(["eval", str(run)]) == 0


def test_a_full_disk_is_one_line_that_says_what_the_checkpoint_needs(tmp_path, capsys,
                                                                       monkeypatch):
    from zoptim.runs import checkpoints

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    assert main(train_args(run, "save_every=1", "steps=1")) == 0
    monkeypatch.setattr(checkpoints, "save_file", full)
    capsys.readouterr()
    assert main(train_args(run, "save_every=1", "steps=2", extra=["--resume"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB" in err[0] and "checkpoint-2" in err[0] and "--resume" in err[0]
    assert not list(run.glob(".checkpoint-*"))  # nothing half-written stays
    assert main(["verify", str(run)]) == 0  # the last whole checkpoint survives
