"""Estimator fidelity: cosines against backpropagation, per kind of tensor, and the held-out
descent along the learning rate."""

import json

import pytest
import torch

from zoptim.bench import fidelity
from zoptim.cli import main

from conftest import MR_PATH


@pytest.mark.parametrize("name, kind", [
    ("backbone.model.embed_tokens.weight", "embeddings"),
    ("backbone.embeddings.position_embeddings.weight", "embeddings"),
    ("backbone.model.layers.0.self_attn.q_proj.weight", "attention"),
    ("backbone.encoder.layer.0.attention.output.dense.weight", "attention"),
    ("backbone.model.layers.3.mlp.down_proj.weight", "mlp"),
    ("backbone.encoder.layer.0.intermediate.dense.weight", "mlp"),
    ("backbone.encoder.layer.0.output.dense.weight", "mlp"),
    ("head.weight", "head"),
    ("backbone.lm_head.weight", "head"),
    ("backbone.pooler.dense.weight", "other"),
])
def test_tensor_kinds(name, kind):
    assert fidelity.tensor_kind(name, torch.zeros(2, 2)) == kind
    assert fidelity.tensor_kind(name.replace("weight", "bias"), torch.zeros(2)) == \
        "norms and biases"


def test_cosines_and_norms_per_kind():
    a = [torch.tensor([[1.0, 0.0]]), torch.tensor([3.0, 4.0])]
    b = [torch.tensor([[2.0, 0.0]]), torch.tensor([-3.0, -4.0])]
    kinds = ["mlp", "norms and biases"]
    cos = fidelity.cosines(a, b, kinds)
    assert cos["mlp"] == pytest.approx(1.0) and cos["norms and biases"] == pytest.approx(-1.0)
    assert cos["all"] == pytest.approx((2 - 25) / (26 ** 0.5 * 29 ** 0.5))
    assert fidelity.norms(a, kinds) == pytest.approx({"mlp": 1.0, "norms and biases": 5.0,
                                                      "all": 26 ** 0.5})


CONFIG = f"""
kind = "fidelity"
draws = 6
curve_draws = 3
heldout = 8
lr_factors = [0.1, 1.0]

[base]
batch_size = 4
eval_batch_size = 8
[base.model]
max_length = 32
[base.task]
path = {json.dumps(MR_PATH)}
train = 24
dev = 4
test = 4

[along]
name = "mezo"
settings = {{ lr = 1e-3, eps = 1e-3 }}
steps = [2]

[[methods]]
label = "mezo"
name = "mezo"
settings = {{ lr = 1e-4, eps = 1e-3 }}

[[methods]]
label = "zo-muon"
name = "zo-muon"
settings = {{ lr = 1e-2, rank = 4, directions = 2 }}
"""


def test_fidelity_measures_every_method_at_every_point(tmp_path, tiny, capsys):
    cfg = tmp_path / "fidelity.toml"
    cfg.write_text(CONFIG.replace("[base.model]", f"[base.model]\nname = {json.dumps(str(tiny))}"))
    out = tmp_path / "out"
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0
    results = json.loads((out / "fidelity.json").read_text())
    assert set(results["points"]) == {"0", "2"}
    start = results["points"]["0"]
    assert start["batch"] == 4 and start["heldout"] == 8
    assert set(start["parameters"]) >= {"embeddings", "attention", "mlp", "norms and biases"}
    for label, queries in (("mezo", 2), ("zo-muon", 3)):
        m = start["methods"][label]
        assert m["queries_per_step"] == queries and m["draws"] == 6
        for key in ("all", "attention", "mlp"):
            stats = m["cos_batch"][key]
            assert stats["n"] == 6 and -1 <= stats["min"] <= stats["max"] <= 1
        assert len(m["descent"]["lr"]) == 2 and m["descent"]["curve_draws"] == 3
        assert m["best_lr"] in m["descent"]["lr"]
    # the estimate points uphill on its own batch: the draws' mean direction agrees with the
    # backpropagated gradient of that batch (MeZO's is unbiased)
    assert start["methods"]["mezo"]["cos_mean_direction"]["batch"]["all"] > 0
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # measured points are kept: a second run measures nothing again
    capsys.readouterr()
    assert main(["bench", "--config", str(cfg), "--out", str(out)]) == 0
    assert json.loads((out / "fidelity.json").read_text())["points"] == results["points"]
    assert "step 0: mezo" not in capsys.readouterr().out


def test_fidelity_refuses_a_method_without_its_reference_rate(tmp_path):
    spec = {"methods": [{"name": "mezo", "settings": {"eps": 1e-3}}]}
    with pytest.raises(ValueError, match="settings.lr"):
        fidelity.run("x.toml", tmp_path, spec=spec)
