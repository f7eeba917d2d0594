"""What a run ran on. A run's wall times (``elapsed_s``, time-to-target) compare only between
runs on the same kind of machine, and a benchmark's cells may be run, or resumed, on
different ones: each run's summary keeps the machines it ran on (``summary["machines"]``)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """This machine in one line: architecture, CPU model, its vector instructions as torch
    uses them (AVX2, AVX512, ...), torch's threads, and the GPU if torch sees one, e.g.
    ``x86_64, AMD EPYC (AVX2), 2 threads, GPU none``."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{platform.machine()}, {_cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads, GPU {gpu}")


def note(summary: dict) -> None:
    """Add this machine to ``summary["machines"]`` (once: a run resumed here adds it)."""
    machines, here = summary.setdefault("machines", []), describe()
    if here not in machines:
        machines.append(here)
