"""Perturbation, data and 2D parallelism on gloo: the same parameters as one process, replicas
identical, and a per-step communication that does not grow with the model."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import zoptim
from zoptim.engine.evaluators.batched import per_slice, stack
from zoptim.engine.evaluators.distributed import Parallel

STEPS = 3


def make_model(width: int, init_seed: int):
    torch.manual_seed(init_seed)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 3))


def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def loss_on(model, x, y):
    return F.cross_entropy(model(x), y)


def make_opt(method: str, model):
    if method == "mezo":
        return zoptim.MeZO(model.parameters(), lr=1e-2, eps=1e-3, directions=2, seed=3)
    return zoptim.ZOMuon(model.parameters(), lr=1e-2, rank=2, directions=3, seed=3, model=model)


def batched_closure(model, x, y):
    def closure(slices=None):
        if slices is None:
            return loss_on(model, x, y)
        losses = F.cross_entropy(model(stack(x, slices)), stack(y, slices), reduction="none")
        return per_slice(losses, slices)
    return closure


def run_single(method: str, data_parallel: int, width: int = 16):
    """The one-process reference: a data-parallel step's loss is the mean over the shards."""
    model = make_model(width, 0)
    opt = make_opt(method, model)
    x, y = data()
    for _ in range(STEPS):
        if data_parallel == 1:
            closure = batched_closure(model, x, y) if method == "zo-muon" else \
                (lambda: loss_on(model, x, y))
        else:
            shards = [(x[r::data_parallel], y[r::data_parallel]) for r in range(data_parallel)]
            closure = (lambda: sum(float(loss_on(model, *s)) for s in shards) / data_parallel)
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()], opt.queries


def worker(rank, world, init_file, out, scenarios):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, (method, data_parallel, width) in scenarios.items():
        model = make_model(width, init_seed=rank)  # different on every rank: attach broadcasts
        opt = make_opt(method, model)
        par = Parallel(data=data_parallel).attach(opt)
        x, y = data()
        xs, ys = par.shard(x), par.shard(y)
        closure = batched_closure(model, xs, ys) if method == "zo-muon" else \
            (lambda: loss_on(model, xs, ys))
        for _ in range(STEPS):
            opt.step(closure)
        results[name] = dict(params=[p.detach().clone() for p in model.parameters()],
                             queries=opt.queries, bytes=par.bytes_reduced / STEPS,
                             reductions=par.reductions)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def spawn(tmp_path, world, scenarios):
    out = tmp_path / "result"
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(out), scenarios), nprocs=world)
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    scenarios = {"pp": ("mezo", 1, 16), "dp": ("mezo", 2, 16), "pp-batched": ("zo-muon", 1, 16),
                 "pp-wide": ("mezo", 1, 256)}
    return spawn(tmp_path_factory.mktemp("dist2"), 2, scenarios)


def assert_replicas_identical(results, name):
    first = results[0][name]["params"]
    for r in results[1:]:
        for a, b in zip(first, r[name]["params"]):
            assert torch.equal(a, b)


def test_perturbation_parallel_equals_one_process(two_ranks):
    assert_replicas_identical(two_ranks, "pp")
    params, queries = run_single("mezo", 1)
    for a, b in zip(two_ranks[0]["pp"]["params"], params):
        assert torch.equal(a, b)
    assert two_ranks[0]["pp"]["queries"] == queries == STEPS * 4


def test_data_parallel_equals_one_process_on_the_whole_batch(two_ranks):
    assert_replicas_identical(two_ranks, "dp")
    params, queries = run_single("mezo", 2)
    for a, b in zip(two_ranks[0]["dp"]["params"], params):
        assert torch.equal(a, b)
    assert two_ranks[0]["dp"]["queries"] == queries


def test_batched_queries_split_across_ranks(two_ranks):
    assert_replicas_identical(two_ranks, "pp-batched")
    params, queries = run_single("zo-muon", 1)
    for a, b in zip(two_ranks[0]["pp-batched"]["params"], params):
        # each rank stacks its own slices: a different GEMM size may round differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert two_ranks[0]["pp-batched"]["queries"] == queries


def test_communication_per_step_does_not_grow_with_the_model(two_ranks):
    small, wide = two_ranks[0]["pp"], two_ranks[0]["pp-wide"]
    n_small = sum(p.numel() for p in small["params"])
    n_wide = sum(p.numel() for p in wide["params"])
    assert n_wide > 10 * n_small
    assert small["bytes"] == wide["bytes"] == 4 * 8  # one float64 per point of a step
    assert small["reductions"] == STEPS


def test_two_dimensional_parallelism(tmp_path):
    results = spawn(tmp_path, 4, {"2d": ("mezo", 2, 16)})
    assert_replicas_identical(results, "2d")
    params, _ = run_single("mezo", 2)
    for a, b in zip(results[0]["2d"]["params"], params):
        assert torch.equal(a, b)


def test_parallel_needs_an_initialized_group_and_a_matching_grid():
    with pytest.raises(RuntimeError, match="init_process_group"):
        Parallel()


def test_grid_must_match_the_world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(ValueError, match="world size"):
            Parallel(data=2)
        par = Parallel()
        assert (par.perturbation, par.data) == (1, 1)
    finally:
        dist.destroy_process_group()
