import pytest


def test_zeroth_order_steps_cost_inference_memory_and_backprop_costs_more():
    transformers = pytest.importorskip("transformers")
    from zoptim.bench.memory import measure

    config = transformers.BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    rows = {r["name"]: r for r in measure(lambda: transformers.BertModel(config), batch=8,
                                          tokens=32)}
    infer = rows["inference (forward, no_grad)"]
    mezo = rows["MeZO (full)"]
    muon = rows["ZO-Muon (full, rank 32)"]
    adamw = rows["AdamW, backprop (full)"]
    assert mezo["state"] == 0 and mezo["params"] == infer["params"]
    # the MeZO step's transient memory is the forward's (noise is generated in the kernel)
    assert mezo["transient"] <= infer["transient"] * 1.05 + 4096
    assert 0 < muon["state"] < muon["params"]  # the projections P (m x 32) of the matrices (m x n)
    # two moments and the gradients of every parameter the loss reaches (not the unused pooler)
    assert adamw["state"] >= 2.5 * adamw["params"]
    assert adamw["total"] > 2 * mezo["total"]
