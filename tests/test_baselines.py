"""The baselines of MeZO's table: runs without an update (zero-shot, in-context learning), a
decoder's linear probe, and memory beside accuracy in ``zoptim bench``."""

import json

import pytest
import torch

from zoptim.bench.matrix import BenchError, run as run_bench
from zoptim.cli import main
from zoptim.runs import config
from zoptim.runs.run import audit, build, step_loss

from conftest import MR_PATH


def mr_settings(tiny, *extra):
    return [f"model.name={json.dumps(str(tiny))}", f"task.path={json.dumps(MR_PATH)}",
            "task.train=16", "task.dev=8", "task.test=8", "batch_size=8",
            "eval_batch_size=8", "model.max_length=48", *extra]


def mr_run(tiny, *extra):
    return build(config.load(None, mr_settings(tiny, *extra)))


def test_a_decoder_linear_probe_starts_at_the_label_words_and_trains_the_head_alone(tiny):
    full = mr_run(tiny)
    probe = mr_run(tiny, "model.scheme=\"head\"", "method.name=\"adamw\"",
                   "method.settings={lr = 1e-1}")
    assert list(probe.params) == ["head.weight"] and probe.params["head.weight"].shape[0] == 2
    texts = [e.text for e in probe.splits.train]
    with torch.no_grad():
        torch.testing.assert_close(probe.clf(texts), full.clf(texts), rtol=1e-5, atol=1e-5)
    frozen = {n: p.clone() for n, p in probe.clf.backbone.named_parameters()}
    examples = probe.splits.train
    with torch.no_grad():
        before = float(probe.clf.loss(examples))
    for _ in range(20):
        probe.opt.step(lambda slices=None: probe.clf.loss(examples, slices))
    with torch.no_grad():
        assert float(probe.clf.loss(examples)) < before - 0.05
    for name, p in probe.clf.backbone.named_parameters():  # the tied embedding too
        assert torch.equal(p, frozen[name]), name


def test_a_linear_probe_takes_batched_queries_with_the_in_place_values(tiny):
    values = {}
    for batched in (False, True):
        run = mr_run(tiny, "model.scheme=\"head\"", "method.name=\"zo-muon\"",
                     f"method.settings={{lr = 1e-3, eps = 1e-3, rank = 2, batched = "
                     f"{str(batched).lower()}}}")
        examples = run.splits.train[:4]
        run.opt.step(step_loss(run, examples))
        values[batched] = run.opt.last_values
    assert values[True] == pytest.approx(values[False], rel=1e-5)


def test_the_head_scheme_is_refused_where_there_is_no_head(tiny, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n"
                            for i in range(12)))
    line = ["train", "--no-progress", "--out", str(tmp_path / "run")]
    for s in [f"model.name={json.dumps(str(tiny))}", "task.name=\"file\"",
              "task.kind=\"generation\"", f"task.path={json.dumps(str(data))}", "task.train=4",
              "task.dev=4", "task.test=4", "model.scheme=\"head\""]:
        line += ["--set", s]
    assert main(line) == 2
    assert not (tmp_path / "run").exists()


def test_a_run_of_zero_steps_scores_the_starting_model(tiny, tmp_path):
    out = tmp_path / "zero-shot"
    line = ["train", "--no-progress", "--out", str(out)]
    for s in mr_settings(tiny, "steps=0", "task.demonstrations=2"):
        line += ["--set", s]
    assert main(line) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert (after["dev_acc"], after["test_acc"]) == (before["dev_acc"], before["test_acc"])
    assert (after["steps"], after["queries"]) == (0, 0)
    assert audit(out).ok


BENCH = """
seeds = [0]
baseline = "mezo"

[base]
steps = 2
eval_every = 1
save_every = 10
batch_size = 8
eval_batch_size = 8
[base.model]
name = {model}
max_length = 96
[base.task]
path = {data}
train = 16
dev = 8
test = 8

[[methods]]
label = "zero-shot"
steps = 0

[[methods]]
label = "icl-4"
steps = 0
task = {{ demonstrations = 4 }}

[[methods]]
label = "mezo"
name = "mezo"
settings = {{ lr = 1e-3, eps = 1e-3 }}

[[methods]]
label = "linear-probe"
name = "adamw"
settings = {{ lr = 1e-2 }}
model = {{ scheme = "head" }}

[[methods]]
label = "adamw"
name = "adamw"
settings = {{ lr = 1e-4 }}
"""


def test_bench_rows_without_updates_and_memory_beside_accuracy(tiny, tmp_path):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(BENCH.format(model=json.dumps(str(tiny)), data=json.dumps(MR_PATH)))
    out = tmp_path / "bench"
    results = run_bench(str(cfg), out, log=lambda *_: None)["methods"]
    zero, icl, mezo = results["zero-shot"], results["icl-4"], results["mezo"]
    assert "queries_to_target" not in zero and zero["queries"]["median"] == 0
    before = json.loads((out / "zero-shot" / "seed-0" / "summary.json").read_text())["before"]
    assert zero["final_dev"]["median"] == before["dev_acc"]
    assert mezo["queries_to_target"]["per_seed"] == {0: 1.0}
    params = zero["memory"]["params"]
    assert zero["memory"]["state"] == mezo["memory"]["state"] == 0
    # four demonstrations lengthen every prompt: more activations in the same forward
    assert icl["memory"]["transient"] > zero["memory"]["transient"]
    # AdamW keeps two moments of every weight; the probe's, of its head's two rows alone
    assert results["adamw"]["memory"]["state"] >= 2 * params
    head = 2 * 32 * 4
    assert 2 * head <= results["linear-probe"]["memory"]["state"] < 4 * head
    report = (out / "report.md").read_text()
    assert "| zero-shot | no update | no update |" in report and "memory (MiB)" in report
    # a finished benchmark measures nothing again
    stamp = (out / "mezo" / "memory.json").stat().st_mtime_ns
    run_bench(str(cfg), out, log=lambda *_: None)
    assert (out / "mezo" / "memory.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change, message", [
    ('label = "zero-shot"\nsteps = 0', 'label = "zero-shot"\nsteps = 0\ngrid = { lr = [1, 2] }'),
    ('baseline = "mezo"', 'baseline = "zero-shot"')])
def test_bench_refuses_a_tuned_or_baseline_row_without_updates(tiny, tmp_path, change, message):
    text = BENCH.format(model=json.dumps(str(tiny)), data=json.dumps(MR_PATH))
    cfg = tmp_path / "bench.toml"
    cfg.write_text(text.replace(change, message))
    with pytest.raises(BenchError, match="no update|methods that train"):
        run_bench(str(cfg), tmp_path / "bench", log=lambda *_: None)
    assert not (tmp_path / "bench").exists()
