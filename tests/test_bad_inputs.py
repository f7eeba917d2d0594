"""A catalogue of bad inputs: each is refused before any work with one message that names the
problem, a non-zero exit, and nothing already written is touched."""

import json

import pytest

from zoptim.cli import main

from conftest import MR_PATH

GOOD = ["task.train=16", "task.dev=8", "task.test=8", f"task.path={json.dumps(MR_PATH)}",
        "batch_size=4", "eval_batch_size=8", "model.scheme=\"lora\"", "model.max_length=32",
        "method.name=\"mezo\"", "method.settings={lr = 1e-3, eps = 1e-2}", "steps=2",
        "save_every=1"]


def train_args(out, *sets, extra=()):
    args = ["train", "--out", str(out), "--no-progress", *extra]
    for s in [*GOOD, *sets]:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A finished run whose files every bad input must leave as they are."""
    out = tmp_path_factory.mktemp("existing") / "run"
    assert main(train_args(out)) == 0
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def data(tmp, name):
    return ["task.name=\"file\"", f"task.path={json.dumps(str(tmp / name))}"]


def files(tmp_path):
    (tmp_path / "bad.toml").write_text("steps = = 3")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "nolabel.csv").write_text("text,other\nhello,1\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
    (tmp_path / "data.xlsx").write_text("not really")
    (tmp_path / "mr_bad.txt").write_text("1\tnot-a-number\tsentence\n")
    (tmp_path / "mr_cols.txt").write_text("just one column\n")
    (tmp_path / "empty.csv").write_text("text,label\ngood film,1\n  ,0\n")
    (tmp_path / "null.jsonl").write_text('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n')
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    (tmp_path / "listrow.jsonl").write_text('{"text": "a", "label": 1}\n["b", 0]\n')
    (tmp_path / "latin1.csv").write_bytes("text,label\nfine,1\ncaf\xe9,0\n".encode("latin-1"))
    (tmp_path / "short.csv").write_text("text,label\nfine,1\nno label here\n")
    (tmp_path / "out_file").write_text("a file, not a folder")
    hf = tmp_path / "hf_output"
    (hf / "checkpoint-500").mkdir(parents=True)
    (hf / "checkpoint-500" / "model.safetensors").write_text("weights")
    (hf / "journal.jsonl").write_text("someone else's journal\n")


CASES = [
    # (name, arguments given the existing run folder and a scratch folder, expected message)
    ("unknown key", lambda run, tmp: train_args(tmp / "o", "stepz=3"), "stepz"),
    ("negative steps", lambda run, tmp: train_args(tmp / "o", "steps=-5"), "steps"),
    ("zero batch", lambda run, tmp: train_args(tmp / "o", "batch_size=0"), "batch_size"),
    ("text for a number", lambda run, tmp: train_args(tmp / "o", "batch_size=many"), "batch_size"),
    ("unknown dtype", lambda run, tmp: train_args(tmp / "o", "model.dtype=\"float8\""), "model.dtype"),
    ("unknown scheme", lambda run, tmp: train_args(tmp / "o", "model.scheme=\"adapter\""), "model.scheme"),
    ("unknown method", lambda run, tmp: train_args(tmp / "o", "method.name=\"rmsprop\""), "unknown method"),
    ("negative lr", lambda run, tmp: train_args(tmp / "o", "method.settings.lr=-1.0"), "lr=-1.0 is invalid"),
    ("zero eps", lambda run, tmp: train_args(tmp / "o", "method.settings.eps=0.0"), "eps=0.0 is invalid"),
    ("unknown setting", lambda run, tmp: train_args(tmp / "o", "method.settings.momentum=0.9"), "momentum"),
    ("zero queries", lambda run, tmp: train_args(tmp / "o", "method.settings.directions=0"), "directions=0"),
    ("zero rank", lambda run, tmp: train_args(tmp / "o", "method.name=\"zo-muon\"", "method.settings={rank = 0}"), "rank=0"),
    ("rank above every matrix", lambda run, tmp: train_args(tmp / "o", "method.name=\"zo-muon\"", "method.settings={rank = 100000}"), "exceeds every matrix"),
    ("bad orthogonalization", lambda run, tmp: train_args(tmp / "o", "method.name=\"zo-muon\"", "method.settings={ortho = \"qr\"}"), "orthogonalization"),
    ("unknown task", lambda run, tmp: train_args(tmp / "o", "task.name=\"imdb\""), "unknown task"),
    ("missing task file", lambda run, tmp: train_args(tmp / "o", "task.path=\"/no/such/file.txt\""), "does not exist"),
    ("file task without path", lambda run, tmp: train_args(tmp / "o", "task.name=\"file\"", "task.path=\"\""), "needs a path"),
    ("missing label column", lambda run, tmp: train_args(tmp / "o", "task.name=\"file\"", f"task.path={json.dumps(str(tmp / 'nolabel.csv'))}"), "no column 'label'"),
    ("broken JSON lines", lambda run, tmp: train_args(tmp / "o", "task.name=\"file\"", f"task.path={json.dumps(str(tmp / 'broken.jsonl'))}"), "not valid JSON"),
    ("unknown data format", lambda run, tmp: train_args(tmp / "o", "task.name=\"file\"", f"task.path={json.dumps(str(tmp / 'data.xlsx'))}"), "unknown data format"),
    ("malformed mr file", lambda run, tmp: train_args(tmp / "o", f"task.path={json.dumps(str(tmp / 'mr_cols.txt'))}"), "expected 'id<TAB>rating<TAB>sentence'"),
    ("unreadable rating", lambda run, tmp: train_args(tmp / "o", f"task.path={json.dumps(str(tmp / 'mr_bad.txt'))}"), "rating"),
    ("more examples than the task has", lambda run, tmp: train_args(tmp / "o", "task.train=20000"), "asked for"),
    ("template without text", lambda run, tmp: train_args(tmp / "o", "task.template=\"It was {label}.\""), "must contain"),
    ("one label word", lambda run, tmp: train_args(tmp / "o", "task.label_words=[\"great\"]"), "at least two"),
    ("repeated label words", lambda run, tmp: train_args(tmp / "o", "task.label_words=[\"good\", \"good\"]"), "all different"),
    ("labels and words differ in number", lambda run, tmp: train_args(tmp / "o", "task.labels=[\"a\", \"b\", \"c\"]"), "same length"),
    ("unknown model", lambda run, tmp: train_args(tmp / "o", "model.name=\"/no/such/model\""), "cannot load model"),
    ("prefix tuning of an encoder", lambda run, tmp: train_args(tmp / "o", "model.scheme=\"prefix\""), "decoder"),
    ("missing config file", lambda run, tmp: train_args(tmp / "o", extra=["--config", str(tmp / "none.toml")]), "not found"),
    ("unparsable config", lambda run, tmp: train_args(tmp / "o", extra=["--config", str(tmp / "bad.toml")]), "cannot parse"),
    ("config that is not a table", lambda run, tmp: train_args(tmp / "o", extra=["--config", str(tmp / "list.yaml")]), "top level"),
    ("malformed override", lambda run, tmp: ["train", "--out", str(tmp / "o"), "--set", "steps"], "key=value"),
    ("a second run into a used folder", lambda run, tmp: train_args(run), "already holds a run"),
    ("resume with another configuration", lambda run, tmp: train_args(run, "seed=5", extra=["--resume"]), "different configuration"),
    ("eval of a folder without a run", lambda run, tmp: ["eval", str(tmp)], "holds no run"),
    ("replay of a folder without a run", lambda run, tmp: ["replay", str(tmp)], "holds no run"),
    ("verify of a folder without a run", lambda run, tmp: ["verify", str(tmp)], "holds no run"),
    # run folders
    ("--out holding someone else's files", lambda run, tmp: train_args(tmp / "hf_output"), "holds no zoptim run"),
    ("--out holding someone else's files, resumed", lambda run, tmp: train_args(tmp / "hf_output", extra=["--resume"]), "holds no zoptim run"),
    ("--out that is a file", lambda run, tmp: train_args(tmp / "out_file"), "is a file"),
    ("resume with fewer steps than done", lambda run, tmp: train_args(run, "steps=1", extra=["--resume"]), "give --steps 2 or more"),
    # settings
    ("text for the learning rate", lambda run, tmp: train_args(tmp / "o", "method.settings.lr=\"fast\""), "method.settings.lr: expected float or \"auto\", got 'fast'"),
    ("infinite learning rate", lambda run, tmp: train_args(tmp / "o", "method.settings.lr=inf"), "lr=inf is invalid"),
    ("infinite eps", lambda run, tmp: train_args(tmp / "o", "method.settings.eps=inf"), "eps=inf is invalid"),
    ("true as a count of directions", lambda run, tmp: train_args(tmp / "o", "method.settings.directions=true"), "method.settings.directions: expected int, got True"),
    ("max_length beyond the model", lambda run, tmp: train_args(tmp / "o", "model.max_length=100000"), "model.max_length=100000 exceeds"),
    # data files: the file and the row are named
    ("empty text cell", lambda run, tmp: train_args(tmp / "o", *data(tmp, "empty.csv")), "empty.csv:3: 'text' is empty"),
    ("null text", lambda run, tmp: train_args(tmp / "o", *data(tmp, "null.jsonl")), "null.jsonl:2: 'text' is None, not text"),
    ("a later row without the label", lambda run, tmp: train_args(tmp / "o", *data(tmp, "nolabel.jsonl")), "nolabel.jsonl:3: no column 'label'"),
    ("a row that is a list", lambda run, tmp: train_args(tmp / "o", *data(tmp, "listrow.jsonl")), "listrow.jsonl:2: a row must be an object"),
    ("bytes that are not UTF-8", lambda run, tmp: train_args(tmp / "o", *data(tmp, "latin1.csv")), "latin1.csv:3: not UTF-8 text"),
    ("a row with a missing cell", lambda run, tmp: train_args(tmp / "o", *data(tmp, "short.csv")), "short.csv:3: 2 cells expected"),
]


@pytest.mark.parametrize("name, build, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_harms_nothing(name, build, message, existing, tmp_path,
                                                        capsys):
    files(tmp_path)
    before, scratch = snapshot(existing), snapshot(tmp_path)
    code = main(build(existing, tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1  # one message, no traceback
    assert snapshot(existing) == before
    assert snapshot(tmp_path) == scratch  # the user's files byte for byte, nothing added
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("setting, where", [('model.weights="w.pt"', "image models"),
                                            ("model.lora_r=4", "scheme"),
                                            ("model.virtual_tokens=4", "scheme")])
def test_a_setting_the_run_would_ignore_is_refused_by_name(tmp_path, capsys, setting, where):
    args = train_args(tmp_path / "run", 'model.scheme="full"', setting)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert setting.split("=")[0] in err and where in err and not (tmp_path / "run").exists()


def test_label_words_the_tokenizer_makes_identical_are_refused_both_named(tmp_path, capsys):
    assert main(train_args(tmp_path / "run", 'task.label_words=["Great", "great"]')) == 2
    err = capsys.readouterr().err
    assert "'Great'" in err and "'great'" in err and not (tmp_path / "run").exists()


def test_files_past_the_stated_limits_are_refused_with_their_place(tmp_path):
    from PIL import Image

    from zoptim.tasks.data import DataError, read_rows
    from zoptim.tasks.images import MAX_IMAGE_PIXELS, load_image_folder

    big = tmp_path / "big.csv"
    big.write_text("text,label\nfine,1\n" + "a" * 200_000 + ",0\n")
    with pytest.raises(DataError, match=r"big.csv:3: not readable as CSV \(field larger"):
        list(read_rows(big))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="saved with datasets' save_to_disk"):
        list(read_rows(texts))
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "images" / name / "ok.png")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "images" / "b" / "huge.png")
    with pytest.raises(DataError, match=f"huge.png is {side} x {side} pixels, over the limit"):
        load_image_folder(str(tmp_path / "images"))


def test_a_prompts_file_that_is_not_text_is_refused_by_name(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe not text")
    assert main(["generate", str(tmp_path), "--prompts", str(bad)]) == 2
    assert f"{bad}: not UTF-8 text" in capsys.readouterr().err
