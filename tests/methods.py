"""Every method with settings that work on the test problems, shared by the test modules."""

import zoptim

# name: (class, settings, evaluations per step)
METHODS = {
    "mezo": (zoptim.MeZO, dict(lr=1e-2), 2),
    "mezo-rademacher": (zoptim.MeZO, dict(lr=1e-2, noise="rademacher"), 2),
    "zo-sgd-momentum": (zoptim.ZOSGDMomentum, dict(lr=2e-3), 2),
    "zo-sign-sgd": (zoptim.ZOSignSGD, dict(lr=1e-2), 2),
    "zo-sgd-conservative": (zoptim.ZOSGDConservative, dict(lr=1e-2), 5),
    "zo-adam": (zoptim.ZOAdam, dict(lr=1e-2), 2),
    "forward-gradient": (zoptim.ForwardGradient, dict(lr=1e-2), 1),
    "sparse-mezo": (zoptim.SparseMeZO, dict(lr=1e-2, sparsity=0.5), 2),
    "hizoo": (zoptim.HiZOO, dict(lr=1e-2, smoothing=1e-6), 3),
    "lozo": (zoptim.LOZO, dict(lr=1e-2, rank=4, resample_every=50), 2),
    "lozo-m": (zoptim.LOZO, dict(lr=1e-2, rank=4, resample_every=50, momentum=0.9), 2),
    "subzero": (zoptim.SubZero, dict(lr=1e-2, rank=4, resample_every=50), 2),
    "subspace-mezo": (zoptim.SubspaceMeZO, dict(lr=3e-2, rank=8, resample_every=50,
                                                 vector_lr=1e-2), 2),
    "zo-muon": (zoptim.ZOMuon, dict(lr=1e-1, rank=8, resample_every=50, vector_lr=1e-2), 5),
    "zo-muon-svd": (zoptim.ZOMuon, dict(lr=1e-1, rank=8, resample_every=50, vector_lr=1e-2,
                                        ortho="svd"), 5),
    "zo-muon-momentum": (zoptim.ZOMuon, dict(lr=3e-2, rank=8, resample_every=50,
                                             vector_lr=1e-2, momentum=0.9), 5),
    "zo-mopi": (zoptim.ZOMOPI, dict(lr=3e-2, rank=8, resample_every=50, vector_lr=1e-2), 5),
    "fzoo": (zoptim.FZOO, dict(lr=1e-2), 9),
    "es": (zoptim.ES, dict(lr=3e-2, eps=1e-2, members=10), 10),
    "eggroll": (zoptim.EGGROLL, dict(lr=3e-2, eps=1e-2, members=10, rank=4), 10),
    "zo-rank-sgd": (zoptim.ZORankSGD, dict(lr=1e-2, candidates=4), 4),
    "zo-comparison": (zoptim.ZOComparison, dict(lr=1e-2, pairs=2), 4),
}


def make(name, model, **overrides):
    """The named method over ``model``'s parameters, with ``overrides`` on its settings."""
    cls, settings, _ = METHODS[name]
    extra = zoptim.model_arguments(cls, model, stacked_closure=False)
    return cls(list(model.parameters()), **{"seed": 1, **settings, **extra, **overrides})


def per_step(name):
    return METHODS[name][2]


def resampling(name):
    return "resample_every" in METHODS[name][1]


def eggroll_pairs(params, example_loss, examples: int, lr: float, eps: float, seed: int):
    """GRZO's per-example values as EGGROLL draws them in place (rank 1, antithetic pairs, the
    same seed and spaces), pair ``b`` evaluated on example ``b`` alone by ``example_loss(b)``:
    the values at ``+eps z_b`` and at ``-eps z_b``, by example."""
    calls = []

    def one_example():
        b = len(calls) // 2  # the pair's two members, +z_b then -z_b
        calls.append(b)
        return example_loss(b)

    ref = zoptim.EGGROLL(params, lr=lr, eps=eps, rank=1, members=2 * examples, antithetic=True,
                         seed=seed)
    ref.step(one_example)
    return ref.last_values[0::2], ref.last_values[1::2]
