"""Fine-tuning real models end to end on small real data (CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zoptim.runs import config
from zoptim.cli import main
from zoptim.integrations.classifier import PromptClassifier
from zoptim.integrations.models import load_model
from zoptim.integrations.schemes import apply_scheme
from zoptim.tasks import Prompt, load_task
from zoptim.runs.run import audit, train

from conftest import MR_PATH

PROMPT = Prompt("{text} It was {label}.", ("terrible", "great"))
TINY = ["task.train=32", "task.dev=32", "task.test=32", f"task.path={json.dumps(MR_PATH)}",
        "batch_size=8", "eval_every=2", "save_every=2", "eval_batch_size=32",
        "method.settings.rank=4"]


@pytest.fixture(scope="module")
def data():
    return load_task("mr", MR_PATH, train=32, dev=16, test=16, seed=0)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def run_steps(clf, params, data, steps=2):
    import zoptim

    opt = zoptim.MeZO(params, lr=1e-3, eps=1e-2, seed=0)
    for step in range(steps):
        examples = data.train[step * 8:(step + 1) * 8]
        opt.step(lambda: clf.loss(examples))


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_encoder_schemes_change_only_their_parameters(scheme, data):
    model, tok, decoder = load_model("minilm-l6")
    clf = PromptClassifier(model, tok, PROMPT, decoder)
    torch.manual_seed(0)
    params = apply_scheme(clf, scheme)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    before = snapshot(clf)
    run_steps(clf, params, data)
    moved = changed(before, clf)
    assert moved and moved <= trainable
    if scheme == "lora":
        assert all("lora_" in n or n == "head.weight" for n in trainable)
        assert "head.weight" in moved and any("lora_" in n for n in moved)


@pytest.mark.parametrize("scheme", ["prompt", "prefix"])
def test_decoder_prompt_schemes_train_only_virtual_tokens(scheme, data):
    pytest.importorskip("gguf")
    model, tok, decoder = load_model("smollm2-135m")
    assert decoder
    clf = PromptClassifier(model, tok, PROMPT, decoder, max_length=48)
    torch.manual_seed(0)
    params = apply_scheme(clf, scheme, virtual_tokens=4)
    assert sum(p.numel() for p in params) < 1e6
    before = snapshot(clf)
    run_steps(clf, params, data, steps=1)
    moved = changed(before, clf)
    assert moved and all("prompt_encoder" in n for n in moved)


def test_prefix_scheme_needs_a_decoder(data):
    model, tok, decoder = load_model("minilm-l6")
    clf = PromptClassifier(model, tok, PROMPT, decoder)
    with pytest.raises(ValueError, match="decoder"):
        apply_scheme(clf, "prefix")


# A given rate: a calibrated one is chosen for the steps a run starts with, so a run of 2
# steps resumed to 4 is not a run of 4 (test_calibration resumes an interrupted one).
@pytest.mark.parametrize("method", [["method.settings.lr=1e-2"],
                                    ['method.name="grzo"',
                                     "method.settings={lr = 1e-6, rank = 4}"]],
                         ids=["zo-muon", "grzo"])
def test_resume_equals_an_uninterrupted_run_and_replay_equals_both(tmp_path, method):
    whole = config.load(None, TINY + method + ["steps=4"])
    train(whole, tmp_path / "whole", progress=False, log=lambda *_: None)
    part = config.load(None, TINY + method + ["steps=2"])
    train(part, tmp_path / "split", progress=False, log=lambda *_: None)
    halfway = load_file(str(tmp_path / "split" / "checkpoint-2" / "trainable.safetensors"))
    train(whole, tmp_path / "split", resume=True, progress=False, log=lambda *_: None)
    a = load_file(str(tmp_path / "whole" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], halfway[k]) for k in a)  # the resumed steps moved it
    journal = (tmp_path / "split" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in journal] == [0, 1, 2, 3]
    # the resumed run's clock goes on from the first run's: time-to-target counts both
    metrics = [json.loads(ln) for ln in (tmp_path / "split" / "metrics.jsonl").read_text()
               .splitlines()]
    elapsed = [m["elapsed_s"] for m in metrics]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and elapsed == sorted(elapsed)
    assert elapsed[2] > elapsed[1] > 0
    found = audit(tmp_path / "split")
    assert (found.steps, found.compared, found.equal, found.problems) == \
        (4, "checkpoint-4", True, [])
    assert main(["replay", str(tmp_path / "split")]) == 0


def test_demo_trains_side_by_side(capsys):
    assert main(["demo", "--methods", "mezo,zo-muon,grzo", "--queries", "300",
                 "--log-every", "0"]) == 0
    out = capsys.readouterr().out
    assert "mezo" in out and "zo-muon" in out and "grzo" in out and "test acc" in out


def test_cli_trains_evaluates_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "2", "--no-progress", "--method", "mezo"]
    for s in TINY[:-1] + ["method.settings={lr = 1e-5, eps = 1e-3}"]:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"before", "after", "wall_s"}
    assert summary["after"]["queries"] == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [0, 1]
    assert "dev_acc" in json.loads(lines[-1])
    assert main(["eval", str(out), "--split", "dev"]) == 0
    assert "dev accuracy" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A second run into the same folder, a bad key and a bad value: refused, nothing touched.
    assert main(args) == 2
    assert main(["train", "--out", str(out), "--set", "stepz=3"]) == 2
    assert main(["train", "--out", str(tmp_path / "x"), "--set", "batch_size=-1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "stepz" in err and "batch_size" in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_load_and_step(dtype, data):
    import zoptim

    model, tok, decoder = load_model("minilm-l6", dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    clf = PromptClassifier(model, tok, PROMPT, decoder)
    params = apply_scheme(clf, "lora")  # peft keeps adapters in float32 over a half base
    opt = zoptim.ZOMuon(params, lr=1e-3, rank=4, seed=0)
    before = snapshot(clf)
    loss = opt.step(lambda: clf.loss(data.train[:4]))
    assert torch.isfinite(torch.tensor(loss)) and opt.last_skip is None
    assert changed(before, clf)


def test_every_method_steps_a_real_transformer(data):
    """One step of each method on MiniLM with LoRA: real attention kernels, real PEFT layers
    (forward gradient needs the math attention kernel for forward-mode derivatives)."""
    import zoptim

    model, tok, decoder = load_model("minilm-l6")
    clf = PromptClassifier(model, tok, PROMPT, decoder, max_length=32)
    torch.manual_seed(0)
    params = apply_scheme(clf, "lora")
    for name, cls in zoptim.METHODS.items():
        # in place, except where the method needs batched queries (GRZO)
        extra = {**zoptim.model_arguments(cls, clf, stacked_closure=False),
                 **zoptim.batch_arguments(cls, 4)}
        opt = cls(params, lr=1e-4, seed=0, **extra)
        before = snapshot(clf)
        loss = opt.step(lambda slices=None: clf.loss(data.train[:4], slices))
        assert torch.isfinite(torch.tensor(loss)) and opt.last_skip is None, name
        assert changed(before, clf), name


def test_torchrun_run_equals_one_process(tmp_path):
    """Two processes under torchrun (perturbation parallelism, each evaluating one side of
    each two-point difference) write the run a single process writes."""
    import os
    import subprocess
    import sys

    sets = []
    for s in TINY[:-1] + ["method.settings={lr = 1e-4, eps = 1e-3, directions = 2}"]:
        sets += ["--set", s]
    common = ["train", "--steps", "3", "--no-progress", "--method", "mezo", *sets]
    # Both with one thread a process: on some CPUs a model's forward pass rounds differently
    # with another number of threads, which is the machine's arithmetic, not the run's.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "zoptim.cli", *common, "--out", str(tmp_path / "one")],
                   check=True, env=env, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29517", "-m", "zoptim.cli", *common,
                    "--out", str(tmp_path / "two")], check=True, env=env, timeout=600)
    a = load_file(str(tmp_path / "one" / "checkpoint-3" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint-3" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["after"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["after"]
    assert one["queries"] == two["queries"] == 12 and one["test_acc"] == two["test_acc"]
