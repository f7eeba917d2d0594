import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoptim.runs import config
from zoptim.runs.config import ConfigError


def test_toml_and_yaml_files_with_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 7\n[model]\nscheme = "lora"\n[method]\nname = "mezo"\n'
                    'settings = { lr = 1e-5 }\n')
    yaml = tmp_path / "run.yaml"
    yaml.write_text("steps: 7\nmodel:\n  scheme: lora\nmethod:\n  name: mezo\n"
                    "  settings:\n    lr: 1.0e-5\n")
    for path in (toml, yaml):
        cfg = config.load(str(path), ["task.train=12", "method.settings.eps=0.01",
                                      'task.label_words=["bad", "good"]'])
        assert cfg.steps == 7 and cfg.model.scheme == "lora" and cfg.task.train == 12
        assert cfg.method.settings == {"lr": 1e-5, "eps": 0.01}
        assert cfg.task.label_words == ["bad", "good"]


@pytest.mark.parametrize("overrides, message", [
    (["stepz=3"], "stepz"),
    (["steps=-1"], "steps"),
    (["model.dtype=float8"], "model.dtype"),
    (["model.scheme=adapter"], "model.scheme"),
    (["batch_size=many"], "batch_size"),
    (["task.labels=[\"a\"]"], "same length"),
    (["steps"], "key=value"),
    (["method.name=\"grzo\"", "task.kind=\"generation\"", "task.name=\"squad\"",
      "task.objective=\"f1\""], "a metric of greedy generations nor a reward"),
    (["method.name=\"grzo\"", "method.settings={examples = 4}"], "examples is set by the run"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "missing.toml"), [])
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load(str(bad), [])


KEYS = ["steps", "batch_size", "seed", "model.name", "model.dtype", "model.scheme", "task.train",
        "task.template", "task.label_words", "method.name", "method.settings.lr", "guard.spike",
        "unknown", "task", "model.lora_r", "journal_fsync_every"]
VALUES = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                   st.booleans(), st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_any_overrides_give_a_config_or_a_config_error(pairs):
    import json

    overrides = [f"{k}={json.dumps(v) if not isinstance(v, float) else repr(v)}" for k, v in pairs]
    try:
        cfg = config.load(None, overrides)
    except ConfigError as err:
        assert str(err)
    else:
        assert cfg.steps >= 0 and cfg.batch_size >= 1
