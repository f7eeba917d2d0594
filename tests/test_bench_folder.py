"""zoptim bench's --out under a run folder's rules: checked before anything is written,
locked while written, and labels and grid points that are plain names, so that nothing is
written outside it."""

import pytest

from zoptim.cli import main
from zoptim.runs.folder import Lock

from test_bad_inputs import snapshot, train_args
from test_bench_matrix import CONFIG


def bench(tmp_path, text, out):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(text)
    return main(["bench", "--config", str(cfg), "--out", str(out)])


@pytest.mark.parametrize("label", ["../escape", "/tmp/abs", "a/b", "..", ".hidden", "a b"])
def test_a_label_that_is_not_a_plain_name_is_refused_and_nothing_is_written(tmp_path, capsys,
                                                                              label):
    text = CONFIG.replace('label = "zo-muon"', f'label = "{label}"')
    assert bench(tmp_path, text, tmp_path / "out") == 2
    assert "names a folder of the benchmark" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.toml"]
    assert not (tmp_path.parent / "escape").exists()


def test_a_grid_point_s_cell_folder_is_a_plain_name_inside_out(tmp_path):
    from zoptim.bench.folder import NAME
    from zoptim.bench.matrix import point_folder

    for point in ({"betas": [0.9, 0.99]}, {"noise": "../x"}, {"x": ".."}, {"lr": 1e-5}):
        name = point_folder(point)
        assert NAME.fullmatch(name) and ".." not in name
    assert point_folder({"lr": 1e-5}) == "lr=1e-05"  # kept cells keep their folders
    # a grid value that is no value of its setting is refused before anything is written
    text = CONFIG.replace("settings = { lr = 1e-3, eps = 1e-2 }",
                          'settings = { lr = 1e-3 }\ngrid = { noise = ["gaussian", "../x"] }')
    assert bench(tmp_path, text, tmp_path / "out") == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_an_out_folder_of_the_user_s_own_files_or_a_train_run_is_refused_as_it_is(tmp_path,
                                                                                 capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    (mine / "results.json").write_text("{}")
    run = tmp_path / "run"
    assert main(train_args(run)) == 0
    kept = {mine: snapshot(mine), run: snapshot(run)}
    for out, why in ((mine, "holds no benchmark"), (run, "holds a zoptim train run"),
                     (mine / "report.md", "is a file"), (mine / "report.md" / "x", "is a file")):
        assert bench(tmp_path, CONFIG, out) == 2
        assert why in capsys.readouterr().err
        assert {folder: snapshot(folder) for folder in kept} == kept


def test_a_benchmark_being_written_by_another_process_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with Lock(out):
        assert bench(tmp_path, CONFIG, out) == 2
    assert "being written by process" in capsys.readouterr().err
