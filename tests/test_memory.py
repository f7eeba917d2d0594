"""A MeZO step needs no parameter-sized buffer: its peak extra memory is a fixed-size chunk,
measured from the allocator's events (torch.profiler) against the closure's own peak."""

import pytest
import torch

import zoptim
from zoptim import noise as perturb
from zoptim.bench.memory import transient_peak as peak_bytes

SIDE = 2048  # each parameter: 2048 x 2048 float32 = 16 MiB


@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_mezo_step_peak_memory_is_a_chunk_not_a_parameter(backend, monkeypatch):
    monkeypatch.setattr(perturb, "_backend", backend)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(SIDE, SIDE, generator=g)) for _ in range(3)]
    targets = [torch.randn(SIDE * SIDE, generator=g) for _ in params]

    def closure():  # allocation-free apart from scalars, so the step's own buffers show
        return sum(torch.dot(p.view(-1), t) for p, t in zip(params, targets))

    opt = zoptim.MeZO(params, lr=1e-6)
    opt.step(closure)  # warm up (compiles the fused kernel)
    base = peak_bytes(closure)
    extra = peak_bytes(lambda: opt.step(closure)) - base
    param_bytes = SIDE * SIDE * 4
    chunk_bytes = perturb.EAGER_CHUNK * 4
    assert extra <= 8 * chunk_bytes < param_bytes, (extra, param_bytes)
    if backend == "compiled":
        assert extra < 4096  # fused: noise lives in registers
