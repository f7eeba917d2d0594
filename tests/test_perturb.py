import pytest
import torch

from zoptim import noise as perturb
from zoptim.noise import add_noise_, mix, noise


@pytest.fixture
def eager():
    old = perturb.get_backend()
    perturb.set_backend("eager")
    yield
    perturb.set_backend(old)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_noise_is_regenerable_and_standard(kind):
    a = noise(mix(1, 2), (400, 250), kind)
    assert torch.equal(a, noise(mix(1, 2), (400, 250), kind))
    assert abs(float(a.mean())) < 0.01  # 1e5 samples: standard error 0.003
    assert abs(float(a.var()) - 1.0) < 0.02
    b = noise(mix(1, 3), (400, 250), kind)
    assert abs(float((a * b).mean())) < 0.015  # independent keys are uncorrelated
    if kind == "rademacher":
        assert set(a.unique().tolist()) == {-1.0, 1.0}
    else:
        kurtosis = float((a**4).mean())
        assert abs(kurtosis - 3.0) < 0.1


def test_gaussian_tails_are_gaussian():
    z = noise(7, (1 << 20,))
    frac = float((z.abs() > 3).float().mean())
    assert abs(frac - 0.0027) < 0.0006


def test_eager_path_matches_fused_kernel(eager):
    key = mix(5, 6)
    eager_g, eager_r = noise(key, (3, 70001)), noise(key, (3, 70001), "rademacher")
    perturb.set_backend("compiled")
    fused_g, fused_r = noise(key, (3, 70001)), noise(key, (3, 70001), "rademacher")
    assert torch.equal(eager_r, fused_r)
    torch.testing.assert_close(eager_g, fused_g, rtol=1e-5, atol=1e-5)


def test_eager_chunks_do_not_change_values(eager, monkeypatch):
    full = noise(11, (5000,))
    monkeypatch.setattr(perturb, "EAGER_CHUNK", 777)
    assert torch.equal(full, noise(11, (5000,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_noise_adds_scaled_noise(dtype):
    x = torch.linspace(-1, 1, 1000, dtype=dtype)
    y = add_noise_(x.clone(), 3, 0.5)
    expected = x.float() + 0.5 * noise(3, (1000,))
    torch.testing.assert_close(y.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="noise kind"):
        noise(1, (3,), "uniform")
    with pytest.raises(ValueError, match="contiguous"):
        add_noise_(torch.zeros(4, 4).T, 1, 1.0)
    with pytest.raises(ValueError, match="backend"):
        perturb.set_backend("gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_noise_stacks_equal_the_noise_of_each_key(kind, dtype):
    from zoptim.noise import mix, noise, noise_stacks

    # tensors of one size are drawn together (the first and the last here)
    keys = [[mix(3, i, j) for j in range(n)] for i, n in enumerate([2, 1, 3, 2])]
    shapes = [(4, 5), (7,), (1,), (20,)]
    stacks = noise_stacks(keys, shapes, kind, dtype)
    for ks, shape, stack in zip(keys, shapes, stacks):
        assert stack.shape == (len(ks), *shape) and stack.dtype == dtype
        for k, z in zip(ks, stack):
            alone = noise(k, shape, kind, dtype)
            # a single element takes the eager path alone, a few float32 ulps away for Gaussians
            torch.testing.assert_close(z, alone, rtol=1e-6 if dtype == torch.float32 else 1e-2,
                                       atol=1e-6)
            assert torch.equal(z, alone) or (kind, shape) == ("gaussian", (1,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_add_noise_many_equals_add_noise_tensor_by_tensor(kind, dtype, monkeypatch):
    # small tensors are drawn together through buffers (here of at most 600 elements), large
    # ones one by one: either way the bits of add_noise_
    monkeypatch.setattr(perturb, "SMALL_NUMEL", 600)
    g = torch.Generator().manual_seed(0)
    sizes = [3, 384, 100, 1000, 1, 100, 250, 7, 3, 100]
    together = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    alone = [t.clone() for t in together]
    perturb.add_noise_many_(together, list(range(len(sizes))), 11, -0.3, kind)
    for i, t in enumerate(alone):
        add_noise_(t, mix(11, i), -0.3, kind)
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def test_a_kernel_that_fails_to_compile_sends_its_variant_alone_to_the_eager_path(monkeypatch):
    """One dtype whose kernel cannot compile (a recompile limit reached late in a process)
    takes the eager path; the variants compiled before keep their kernel."""
    fused = perturb._fused

    def failing(kind):
        kernel = fused(kind)

        def run(flat, *args):
            if flat.dtype == torch.float64:
                raise RuntimeError("recompile limit")
            return kernel(flat, *args)
        return run

    monkeypatch.setattr(perturb, "_fused", failing)
    monkeypatch.setattr(perturb, "_eager_variants", set())
    x32, x64 = torch.zeros(1000), torch.zeros(1000, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        add_noise_(x64, 3, 1.0)
    add_noise_(x32, 3, 1.0)
    assert perturb._eager_variants == {("gaussian", torch.float64, "cpu")}
    assert perturb.get_backend() == "auto"  # float32 still runs the fused kernel
    torch.testing.assert_close(x64.float(), x32, rtol=1e-5, atol=1e-5)
