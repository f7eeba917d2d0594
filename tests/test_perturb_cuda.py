"""The GPU noise path (Triton, many tensors per launch) against the eager reference.

Skipped without an NVIDIA GPU; run on one with ``python -m pytest tests/test_perturb_cuda.py``."""

import pytest
import torch

import zoptim
from zoptim import noise as perturb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _eager_noise(key, numel, kind):
    perturb.set_backend("eager")
    try:
        return perturb.noise(key, (numel,), kind, torch.float32, "cuda")
    finally:
        perturb.set_backend("auto")


@pytest.mark.parametrize("kind", perturb.NOISE_KINDS)
def test_triton_kernel_matches_eager(kind):
    sizes = [1, 7, 4096, 4097, 100_003]
    xs = [torch.zeros(n, device="cuda") for n in sizes]
    perturb.add_noise_many_(xs, list(range(3, 3 + len(sizes))), seed=123456789, alpha=1.0,
                            kind=kind)
    assert perturb._triton, "the Triton kernel was not used"
    for j, (x, n) in enumerate(zip(xs, sizes)):
        ref = _eager_noise(perturb.mix(123456789, 3 + j), n, kind)
        if kind == "rademacher":
            assert torch.equal(x, ref)
        else:
            torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_many_equals_one_by_one(dtype):
    xs = [torch.randn(n, device="cuda", dtype=dtype) for n in (5000, 3, 70_000)]
    ys = [x.clone() for x in xs]
    perturb.add_noise_many_(xs, [0, 1, 2], seed=2**63 + 5, alpha=-0.25)
    for i, y in enumerate(ys):
        perturb.add_noise_(y, perturb.mix(2**63 + 5, i), -0.25)
    for x, y in zip(xs, ys):
        assert torch.equal(x, y)


def _run_mezo(backend):
    perturb.set_backend(backend)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1)).cuda()
        x = torch.randn(32, 64, device="cuda")
        opt = zoptim.MeZO(model.parameters(), lr=1e-2, eps=1e-3, seed=0, noise="rademacher")
        for _ in range(3):
            opt.step(lambda: model(x).pow(2).mean())
        return [p.detach().clone() for p in model.parameters()]
    finally:
        perturb.set_backend("auto")


def test_mezo_steps_equal_the_eager_path():
    for a, b in zip(_run_mezo("auto"), _run_mezo("eager")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_rows_are_drawn_in_one_kernel_close_to_the_per_tensor_noise(kind):
    keys = [perturb.mix(7, i) for i in range(6)]
    rows = torch.empty(6, 4097, device="cuda")
    perturb.fill_rows_(rows, keys, 1.0, kind)
    for row, key in zip(rows, keys):
        ref = perturb.noise(key, (4097,), kind, torch.float32, "cuda")
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)
