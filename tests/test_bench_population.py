"""The population benchmark: an ES and an EGGROLL step against greedy inference."""

import json

from zoptim.bench.population import main


def test_population_timing_reports_every_row_side_by_side(tiny, tmp_path, capsys):
    out = tmp_path / "population.json"
    assert main(["--model", str(tiny), "--members", "2", "--prompts", "2", "--rank", "2",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["seconds"]) == {"inference, one batch", "inference, stacked batch",
                                   "eggroll step", "es step"}
    assert (got["members"], got["prompts"], got["rank"]) == (2, 2, 2)
    printed = capsys.readouterr().out
    assert "eggroll step" in printed and "of batched inference's throughput" in printed


def test_eggroll_decodes_its_members_as_one_stacked_batch_and_es_one_by_one(tiny):
    """What the throughput share rests on: an EGGROLL step runs its members as slices of one
    stacked batch, as batched inference does; an ES step runs them one after another."""
    from argparse import Namespace

    from zoptim.bench.population import _run
    from zoptim.runs.run import batch, step_loss

    args = Namespace(model=str(tiny), prompts=2, members=4, rank=2, max_new_tokens=2)
    for method, settings in (("eggroll", "lr = 0.0, eps = 1e-3, rank = 2"),
                             ("es", "lr = 0.0, eps = 1e-3")):
        run = _run(method, settings, args)
        rows = []
        run.clf.backbone.register_forward_pre_hook(
            lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
        run.opt.step(step_loss(run, batch(run, 0)))
        stacked = method == "eggroll"
        assert max(rows) == (args.members * args.prompts if stacked else args.prompts)
        assert len(rows) < 2 * args.max_new_tokens * (1 if stacked else args.members) + 1
