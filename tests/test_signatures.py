"""Every public optimizer writes its parameters out, typed, with the defaults its docstring
states, and a run configuration's method settings are checked against that signature."""

import ast
import inspect
import re

import pytest
import torch

import zoptim
from zoptim.methods.deepzero import DeepZero
from zoptim.methods.first_order import BASELINES, REWARD_BASELINES
from zoptim.runs import config
from zoptim.runs.config import ConfigError

CLASSES = [*zoptim.METHODS.values(), zoptim.Composed, zoptim.PolyStep, DeepZero,
           *BASELINES.values(), *REWARD_BASELINES.values()]
ENTRY = re.compile(r"    (\w+) \(([^)]*)\): (.*)")
DEFAULT = re.compile(r"Default: (?:``(.+?)``|(\S+?))\.?(?:\s|$)")


def documented_args(cls) -> dict[str, str]:
    """The entries of the class docstring's ``Args:`` section (``name (type): text``)."""
    lines = inspect.cleandoc(cls.__doc__).splitlines()
    assert "Args:" in lines, f"{cls.__name__}: no Args section"
    entries, name = {}, None
    for line in lines[lines.index("Args:") + 1:]:
        if line and not line.startswith(" "):
            break
        match = ENTRY.fullmatch(line)
        if match:
            name = match[1]
            entries[name] = match[3]
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def parameters(cls) -> list[inspect.Parameter]:
    return list(inspect.signature(cls).parameters.values())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_parameters_are_written_out_and_typed(cls):
    for p in parameters(cls):
        assert p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL), f"{cls.__name__}: *{p.name}"
        if p.name != "params":
            assert p.annotation is not p.empty, f"{cls.__name__}.{p.name} has no annotation"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_parameter_is_documented_with_its_default(cls):
    args = documented_args(cls)
    names = [p.name for p in parameters(cls)]
    assert list(args) == names, f"{cls.__name__}: Args list {list(args)}, signature {names}"
    for p in parameters(cls):
        if p.default is p.empty:
            continue
        stated = DEFAULT.search(args[p.name])
        assert stated, f"{cls.__name__}.{p.name}: the docstring states no default"
        value = ast.literal_eval(stated[1] or stated[2])
        assert value == p.default and type(value) is type(p.default), \
            f"{cls.__name__}.{p.name}: documented default {value!r}, actual {p.default!r}"


def test_no_docstring_keeps_a_placeholder():
    for cls in CLASSES:
        assert "{" not in inspect.cleandoc(cls.__doc__).split("Args:")[1], cls.__name__


def test_unknown_keywords_are_refused_by_python():
    w = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(TypeError, match="momentum"):
        zoptim.MeZO(w, momentum=0.9)
    with pytest.raises(TypeError, match="ortho"):
        zoptim.ZOMOPI(w, ortho="svd")  # ZO-MOPI orthogonalizes partially, by k


@pytest.mark.parametrize("name", [*zoptim.METHODS, *BASELINES, *REWARD_BASELINES])
def test_every_default_passes_the_config_check(name):
    cls = config.method_class(name)
    settings = {p.name: p.default for p in parameters(cls)
                if p.name in config.method_settings(cls) and p.default is not p.empty}
    config.check_settings(name, settings)
    assert not {"params", "seed", "model", "examples"} & set(config.method_settings(cls))


@pytest.mark.parametrize("method, key", [("mezo", "lrr"), ("zo-muon", "momentun"),
                                         ("zo-mopi", "ortho"), ("es", "rank")])
def test_an_unknown_method_setting_is_refused_naming_it_and_the_settings(method, key):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f'method.name="{method}"', f"method.settings.{key}=1"])
    message = str(err.value)
    assert f"method.settings.{key}:" in message and "\n" not in message
    accepted = ", ".join(config.method_settings(config.method_class(method)))
    assert message.endswith(f"its settings are {accepted}")


@pytest.mark.parametrize("method, setting, expected", [
    ("mezo", 'lr="fast"', 'expected float or "auto"'),
    ("mezo", "lr=true", 'expected float or "auto"'),
    ("zo-muon", "rank=2.5", "expected int"),
    ("zo-muon", 'dense_head="no"', "expected bool"),
    ("zo-muon", "max_slices=[4]", "expected int | None"),
    ("zo-adam", "betas=[0.9]", "expected tuple[float, float]"),
    ("es", "members=\"many\"", "expected int"),
])
def test_a_wrongly_typed_setting_is_refused_naming_the_key_and_type(method, setting, expected):
    key = setting.partition("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"method.settings.{key}: {expected}")):
        config.load(None, [f'method.name="{method}"', f"method.settings.{setting}"])


def test_a_file_list_is_taken_for_a_tuple_and_ints_for_floats():
    cfg = config.load(None, ['method.name="zo-adam"', "method.settings.betas=[0.8, 0.99]",
                             "method.settings.lr=1"])
    assert cfg.method.settings == {"betas": [0.8, 0.99], "lr": 1}


def test_settings_the_run_passes_are_refused():
    with pytest.raises(ConfigError, match="seed is set by the run"):
        config.load(None, ["method.settings.seed=3"])
    with pytest.raises(ConfigError, match="model is set by the run"):
        config.load(None, ['method.name="zo-muon"', "method.settings.model=1"])
