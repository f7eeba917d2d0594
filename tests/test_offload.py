"""Offloading on the CPU (CPU as both devices, the GPU's code path): offloaded training equals
resident in-place training bit for bit, and bad models or optimizers are refused."""

import copy

import pytest
import torch
import torch.nn.functional as F

import zoptim
from zoptim.engine.evaluators.batched import per_slice, stack
from zoptim.engine.evaluators.offload import Offload, OffloadError, find_blocks

STEPS = 4


def tiny_opt(tie: bool = False):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                       word_embed_proj_dim=32, max_position_embeddings=64, vocab_size=100,
                       dropout=0.0, attention_dropout=0.0, tie_word_embeddings=tie)
    return OPTForCausalLM(config).eval()


def lm_closure(model):
    ids = torch.randint(4, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.get_input_embeddings().weight.device)

    def closure(slices=None):
        batch = ids if slices is None else stack(ids, slices)
        logits = model(input_ids=batch).logits[:, :-1]
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="none")
        return tokens.mean() if slices is None else per_slice(tokens, slices)

    return closure


METHODS = {
    "mezo": lambda ps: zoptim.MeZO(ps, lr=1e-3, eps=1e-3, directions=2, seed=0),
    "zo-adam": lambda ps: zoptim.ZOAdam(ps, lr=1e-3, eps=1e-3, seed=0),
    "zo-muon": lambda ps: zoptim.ZOMuon(ps, lr=1e-2, rank=4, directions=3, resample_every=2,
                                        seed=0),
}


@pytest.mark.parametrize("method", METHODS)
def test_offloaded_equals_resident(method):
    resident = tiny_opt()  # untied: tied weights are walked by each module that uses them
    streamed = copy.deepcopy(resident)
    opt_r = METHODS[method](list(resident.parameters()))
    opt_s = METHODS[method](list(streamed.parameters()))
    offload = Offload(streamed, device="cpu").attach(opt_s)
    blocks = find_blocks(streamed)
    assert len(blocks) == 3 and offload.holds(next(blocks[0].parameters()))
    closure_r, closure_s = lm_closure(resident), lm_closure(streamed)
    for _ in range(STEPS):
        loss_r = opt_r.step(closure_r)
        loss_s = opt_s.step(closure_s)
        assert loss_r == loss_s
        assert opt_r.last_values == opt_s.last_values
    offload.flush()
    for (name, a), b in zip(resident.named_parameters(), streamed.parameters()):
        assert torch.equal(a, b), name
    assert opt_r.queries == opt_s.queries


def test_tied_weights_follow_resident_training():
    resident = tiny_opt(tie=True)
    streamed = copy.deepcopy(resident)
    opt_r = METHODS["mezo"](list(resident.parameters()))
    opt_s = METHODS["mezo"](list(streamed.parameters()))
    offload = Offload(streamed, device="cpu").attach(opt_s)
    for _ in range(STEPS):
        opt_r.step(lm_closure(resident))
        opt_s.step(lm_closure(streamed))
    offload.flush()
    for a, b in zip(resident.parameters(), streamed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # rounding of the extra walks


def test_low_precision_transfer_keeps_blocks_in_bfloat16():
    resident = tiny_opt()
    streamed = copy.deepcopy(resident)
    opt_r = METHODS["mezo"](list(resident.parameters()))
    opt_s = METHODS["mezo"](list(streamed.parameters()))
    offload = Offload(streamed, device="cpu", transfer_dtype=torch.bfloat16).attach(opt_s)
    block = find_blocks(streamed)[0]
    seen = []
    block.fc1.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    for _ in range(STEPS):
        opt_r.step(lm_closure(resident))
        opt_s.step(lm_closure(streamed))
        # between steps a block is held in bfloat16; it computes in float32
        assert next(block.parameters()).dtype == torch.bfloat16
        torch.testing.assert_close(torch.tensor(opt_s.last_values),
                                   torch.tensor(opt_r.last_values), rtol=0, atol=2e-2)
    assert seen and set(seen) == {torch.float32}
    offload.flush()


def test_model_without_blocks_is_refused():
    with pytest.raises(OffloadError, match="no repeated block list"):
        Offload(torch.nn.Sequential(torch.nn.Linear(3, 3)), device="cpu")


def test_methods_that_evaluate_after_their_update_are_refused():
    model = tiny_opt()
    opt = zoptim.ZOSGDConservative(model.parameters(), lr=1e-3)
    with pytest.raises(OffloadError, match="after its update"):
        Offload(model, device="cpu").attach(opt)


def test_closure_must_stack_its_batch():
    model = tiny_opt()
    opt = zoptim.MeZO(model.parameters(), lr=1e-3, seed=0)
    Offload(model, device="cpu").attach(opt)
    ids = torch.randint(4, 100, (3, 5))
    with pytest.raises(OffloadError, match="not a multiple"):
        opt.step(lambda slices=None: model(input_ids=ids).logits.float().mean().repeat(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_streamed_from_pinned_memory_equals_resident_on_the_gpu():
    resident = tiny_opt().cuda()
    streamed = tiny_opt()
    opt_r = METHODS["mezo"](list(resident.parameters()))
    opt_s = METHODS["mezo"](list(streamed.parameters()))
    offload = Offload(streamed, device="cuda").attach(opt_s)
    assert next(find_blocks(streamed)[0].parameters()).is_pinned()
    for _ in range(STEPS):
        opt_r.step(lm_closure(resident))
        opt_s.step(lm_closure(streamed))
    offload.flush()
    for a, b in zip(resident.parameters(), streamed.parameters()):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("method", ["mezo", "zo-muon"])
def test_low_precision_transfer_serves_every_method_and_replays_bit_for_bit(method):
    # the step's buffers live where the blocks compute (device, model dtype), not where they
    # wait between steps (CPU memory, bfloat16); a replay walks the blocks as the live step did
    model = tiny_opt()
    start = copy.deepcopy(model)
    opt = METHODS[method](list(model.parameters()))
    offload = Offload(model, device="cpu", transfer_dtype=torch.bfloat16).attach(opt)
    closure = lm_closure(model)
    values = []
    for _ in range(STEPS):
        opt.step(closure)
        values.append(opt.last_values)
    offload.flush()
    again = METHODS[method](list(start.parameters()))
    replayed = Offload(start, device="cpu", transfer_dtype=torch.bfloat16).attach(again)
    for v in values:
        again.step(replay=v)
    replayed.flush()
    for a, b in zip(model.parameters(), start.parameters()):
        assert torch.equal(a, b)


def test_a_group_added_after_attaching_is_refused_clearly():
    model = tiny_opt()
    blocks = list(find_blocks(model)[0].parameters())
    opt = zoptim.MeZO([p for p in model.parameters() if all(p is not b for b in blocks)],
                      lr=1e-3, seed=0)
    Offload(model, device="cpu").attach(opt)
    opt.add_param_group({"params": blocks})
    with pytest.raises(OffloadError, match="attach the optimizer again"):
        opt.step(lm_closure(model))
