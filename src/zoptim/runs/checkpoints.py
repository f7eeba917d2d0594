"""Checkpoints of a run: ``checkpoint-<step>/`` holds the trainable weights and the optimizer
state (safetensors, plus JSON for what is not a tensor); ``latest.json`` names the newest
complete one. Written to a staging folder, fsynced and renamed, so a crash at any moment
leaves the previous checkpoint intact and named. ``progress.json`` keeps the SHA-256 of each
tensor file, so a truncated or altered checkpoint is found before it is loaded."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors")


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON, whole or not at all (a temporary file, fsynced, renamed)."""
    write_text(path, json.dumps(data, indent=2))


def write_text(path: Path, text: str) -> None:
    """Write ``text``, whole or not at all (a temporary file, fsynced, renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_files(opt) -> tuple[dict, dict]:
    """The optimizer state as (tensors, the rest): state tensors are copied, as several
    entries may be views of one stacked tensor, which safetensors refuses."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().clone(
                    memory_format=torch.contiguous_format)
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "zo": sd["zo"], "scalars": scalars}


def save_checkpoint(params: dict, opt, folder: Path, progress: dict) -> Path:
    """Write ``checkpoint-<step>`` completely, then point ``latest`` at it, then drop older
    ones. ``progress`` is saved beside (the step, the guard's history)."""
    step = opt.steps
    target = folder / f"checkpoint-{step}"
    staging = folder / f".checkpoint-{step}.tmp"
    tensors, info = _optimizer_files(opt)
    try:
        _write_staged(staging, params, tensors, info, {"step": step, **progress})
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)  # the last whole checkpoint stays
        if err.errno != errno.ENOSPC:
            raise
        size = sum(t.numel() * t.element_size() for t in [*params.values(), *tensors.values()])
        raise OSError(errno.ENOSPC, f"no space left on the device for the next checkpoint, "
                      f"which needs about {size / 2**30:.2f} GiB; free that much and continue "
                      "with --resume", str(target)) from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    fsync_path(folder)
    write_json(folder / "latest.json", {"checkpoint": target.name, "step": step})
    fsync_path(folder)
    for old in folder.glob("checkpoint-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write_staged(staging: Path, params: dict, tensors: dict, info: dict,
                  progress: dict) -> None:
    """A checkpoint's files written and fsynced in ``staging``, with their SHA-256s."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({n: p.detach().clone(memory_format=torch.contiguous_format)
               for n, p in params.items()},
              str(staging / "trainable.safetensors"))
    save_file(tensors, str(staging / "optimizer.safetensors"))
    write_json(staging / "optimizer.json", info)
    for name in TENSOR_FILES:
        fsync_path(staging / name)
    write_json(staging / "progress.json",
               {**progress, "sha256": {name: sha256(staging / name) for name in TENSOR_FILES}})
    fsync_path(staging)


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or altered; the message names the file."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint(checkpoint: Path) -> dict:
    """The progress record of ``checkpoint`` once every file is found whole: present, and
    (for checkpoints that record them) with the SHA-256 written at save time."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is missing")
    try:
        progress = json.loads((checkpoint / "progress.json").read_text())
        json.loads((checkpoint / "optimizer.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{checkpoint}: progress.json or optimizer.json is missing or "
                              f"damaged ({err})") from err
    for name in TENSOR_FILES:
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint / name} is missing")
        expected = progress.get("sha256", {}).get(name)
        if expected is not None and sha256(checkpoint / name) != expected:
            raise CheckpointError(f"{checkpoint / name} is damaged (its SHA-256 differs from "
                                  "the one recorded when it was saved)")
    return progress


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checked checkpoint's trainable weights."""
    check_checkpoint(checkpoint)
    try:
        return load_file(str(checkpoint / "trainable.safetensors"))
    except Exception as err:  # safetensors' own error type: a file that does not parse
        raise CheckpointError(f"{checkpoint / 'trainable.safetensors'} cannot be read "
                              f"({err})") from err


def load_checkpoint(params: dict, opt, checkpoint: Path) -> dict:
    """Load weights and optimizer state; returns the checkpoint's progress record."""
    weights = load_weights(checkpoint)
    missing = set(params) - set(weights)
    if missing:
        raise CheckpointError(f"{checkpoint}: weights missing for {sorted(missing)[:3]}...; "
                              "the checkpoint belongs to a different model or scheme")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    info = json.loads((checkpoint / "optimizer.json").read_text())
    try:
        tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    except Exception as err:
        raise CheckpointError(f"{checkpoint / 'optimizer.safetensors'} cannot be read "
                              f"({err})") from err
    state: dict = {}
    for key, value in [*tensors.items(), *info["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"], "zo": info["zo"]})
    return json.loads((checkpoint / "progress.json").read_text())
