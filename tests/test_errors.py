import pytest
import torch

import zoptim


def params():
    return torch.nn.Linear(4, 3).parameters()


@pytest.mark.parametrize("build, message", [
    (lambda: zoptim.MeZO(params(), lr=-1.0), "lr=-1.0 is invalid"),
    (lambda: zoptim.MeZO(params(), eps=0.0), "eps=0.0 is invalid"),
    (lambda: zoptim.MeZO(params(), weight_decay=-0.1), "weight_decay=-0.1 is invalid"),
    (lambda: zoptim.MeZO(params(), noise="uniform"), "noise='uniform' is invalid"),
    (lambda: zoptim.MeZO(params(), directions=0), "directions=0 is invalid"),
    (lambda: zoptim.MeZO(params(), directions=True), "directions=True is invalid"),
    (lambda: zoptim.MeZO(params(), lr=float("inf")), "lr=inf is invalid"),
    (lambda: zoptim.ZOMuon(params(), rank=0), "rank=0 is invalid"),
    (lambda: zoptim.ZOMuon(params(), resample_every=0), "resample_every=0 is invalid"),
    (lambda: zoptim.ZOMuon(params(), ortho="qr"), "orthogonalization must be"),
    (lambda: zoptim.SparseMeZO(params(), sparsity=1.0), "sparsity=1.0 is invalid"),
    (lambda: zoptim.HiZOO(params(), smoothing=2.0), "smoothing=2.0 is invalid"),
    (lambda: zoptim.LOZO([], lr=1e-3), "empty parameter list"),
    (lambda: zoptim.MeZO([torch.zeros(3, dtype=torch.long)]), "floating-point"),
])
def test_invalid_settings_are_refused_with_the_key_named(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_step_without_closure_is_refused():
    with pytest.raises(ValueError, match="needs a closure"):
        zoptim.MeZO(params()).step(None)


def test_forward_gradient_needs_the_model_of_its_parameters():
    other = torch.nn.Linear(4, 3)
    opt = zoptim.ForwardGradient(params(), model=other, lr=1e-3)
    with pytest.raises(ValueError, match="must belong to `model`"):
        opt.step(lambda: other(torch.ones(1, 4)).sum())


def test_foreign_state_dict_is_refused():
    model = torch.nn.Linear(4, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a zoptim optimizer state"):
        zoptim.MeZO(model.parameters()).load_state_dict(sgd.state_dict())
