"""Tests for sage_jax.config (pure Python, fast)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field
from typing import Any, Literal, Optional

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_jax.config import (
    ConfigError,
    add_config_args,
    apply_overrides,
    config_from_args,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    num_layers: int = 2
    hidden: int = 64
    dropout: float = 0.1
    activation: Literal["gelu", "relu"] = "gelu"


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-4
    steps: int = 100
    use_bf16: bool = False
    seed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class MeshCfg:
    shape: tuple[int, ...] = (1, 1)
    axes: tuple[str, ...] = ("data", "model")


@dataclasses.dataclass(frozen=True)
class OptCfg:
    beta: float = 0.9
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class Cfg:
    name: str | None = "run"
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    mesh: MeshCfg = field(default_factory=MeshCfg)
    opt: OptCfg | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "a")


@dataclasses.dataclass
class Required:
    data_path: str
    n: int = 1


@dataclasses.dataclass
class Checked:
    k: int = 1

    def __post_init__(self):
        if self.k <= 0:
            raise ValueError("k must be positive")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- basics
def test_defaults():
    assert load_config(Cfg) == Cfg()
    assert from_dict(Cfg, {}) == Cfg()
    assert apply_overrides(Cfg, []) == Cfg()


def test_yaml_load_and_conversions(tmp_path):
    path = write(tmp_path, """
name: exp1
model:
  num_layers: 4
  dropout: 0          # int -> float
  activation: relu
train:
  lr: 1e-5            # YAML reads this as a string; converted to float
  use_bf16: true
mesh:
  shape: [2, 2]       # list -> tuple
tags: [a, b]
extra: {foo: {bar: 1}}
""")
    cfg = load_config(Cfg, path)
    assert cfg.name == "exp1"
    assert cfg.model == ModelCfg(num_layers=4, dropout=0.0, activation="relu")
    assert isinstance(cfg.model.dropout, float)
    assert cfg.train.lr == 1e-5 and cfg.train.use_bf16 is True and cfg.train.steps == 100
    assert cfg.mesh.shape == (2, 2) and cfg.mesh.axes == ("data", "model")
    assert cfg.tags == ["a", "b"] and cfg.extra == {"foo": {"bar": 1}}
    assert load_config(Cfg, str(path)) == cfg  # str path works too


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(Cfg, write(tmp_path, "# nothing\n")) == Cfg()


def test_overrides_precedence(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 4\n  hidden: 128\ntrain:\n  lr: 0.01\n")
    cfg = load_config(Cfg, path, ["model.num_layers=8", "train.lr=5e-5", "model.num_layers=6"])
    assert cfg.model.num_layers == 6  # later override wins
    assert cfg.model.hidden == 128  # from the file
    assert cfg.train.lr == 5e-5  # override beats file
    assert cfg.model.dropout == 0.1 and cfg.train.steps == 100  # defaults


def test_overrides_values():
    cfg = apply_overrides(Cfg, [
        "mesh.shape=[2,2]", "mesh.axes=[x, y]", "name=null", "train.use_bf16=true",
        "train.seed=3", "model.activation=relu", "tags=[p, q]", "extra.a.b=1", "pair=[3, z]",
    ])
    assert cfg.mesh == MeshCfg(shape=(2, 2), axes=("x", "y"))
    assert cfg.name is None and cfg.train.use_bf16 is True and cfg.train.seed == 3
    assert cfg.model.activation == "relu" and cfg.tags == ["p", "q"]
    assert cfg.extra == {"a": {"b": 1}} and cfg.pair == (3, "z")
    # a str field keeps the raw text when YAML would parse it as something else
    assert apply_overrides(Cfg, ["name=123"]).name == "123"
    assert apply_overrides(Cfg, ["name="]).name is None  # Optional: empty -> null
    assert apply_overrides(Cfg, ["train.seed=null"]).train.seed is None


def test_overrides_on_instance_and_optional_section():
    base = Cfg(model=ModelCfg(num_layers=5))
    cfg = apply_overrides(base, ["model.hidden=32", "opt.beta=0.5"])
    assert cfg.model == ModelCfg(num_layers=5, hidden=32)
    assert cfg.opt == OptCfg(beta=0.5)
    assert base.model.hidden == 64  # original untouched


def test_override_supplies_required_field(tmp_path):
    assert load_config(Required, None, ["data_path=/x"]) == Required("/x")
    assert load_config(Required, write(tmp_path, "n: 3\n"), ["data_path=/y"]) == Required("/y", 3)


def test_yaml_aliases_not_mutated_by_overrides(tmp_path):
    path = write(tmp_path, "extra:\n  a: &x {k: 1}\n  b: *x\n")
    cfg = load_config(Cfg, path, ["extra.a.k=2"])
    assert cfg.extra == {"a": {"k": 2}, "b": {"k": 1}}


def test_from_dict_nested_instances_and_int_to_float():
    cfg = from_dict(Cfg, {"model": ModelCfg(num_layers=3), "train": {"lr": 1}})
    assert cfg.model.num_layers == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


# ---------------------------------------------------------------- round trip
def test_round_trip():
    cfg = Cfg(name=None, model=ModelCfg(3, 32, 0.5, "relu"), mesh=MeshCfg((4, 2), ("a", "b")),
              opt=OptCfg(), tags=["t"], extra={"k": [1, 2], "s": {"x": None}}, pair=(7, "q"))
    d = to_dict(cfg)
    assert d["mesh"]["shape"] == [4, 2] and d["pair"] == [7, "q"]
    assert from_dict(Cfg, d) == cfg
    assert from_dict(Cfg, yaml.safe_load(to_yaml(cfg))) == cfg
    assert yaml.safe_load(to_yaml(cfg)) == d


def test_round_trip_through_file(tmp_path):
    cfg = apply_overrides(Cfg, ["train.lr=3e-4", "mesh.shape=[8]"])
    assert load_config(Cfg, write(tmp_path, to_yaml(cfg))) == cfg


_text = st.text(max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_text, kids, max_size=3),
    max_leaves=8,
)
_floats = st.floats(allow_nan=False)
_cfgs = st.builds(
    Cfg,
    name=st.none() | _text,
    model=st.builds(ModelCfg, st.integers(), st.integers(), _floats, st.sampled_from(["gelu", "relu"])),
    train=st.builds(TrainCfg, _floats, st.integers(), st.booleans(), st.none() | st.integers()),
    mesh=st.builds(MeshCfg, st.lists(st.integers(), max_size=4).map(tuple),
                   st.lists(_text, max_size=4).map(tuple)),
    opt=st.none() | st.builds(OptCfg, _floats, _floats),
    tags=st.lists(_text, max_size=4),
    extra=st.dictionaries(_text, _json, max_size=4),
    pair=st.tuples(st.integers(), _text),
)


@settings(max_examples=150, deadline=None)
@given(_cfgs)
def test_round_trip_property(cfg):
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert from_dict(Cfg, yaml.safe_load(to_yaml(cfg))) == cfg


# ---------------------------------------------------------------- errors
def test_yaml_type_error_names_file_line_path_type_value(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  hidden: 8\n  num_layers: four\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path)
    msg = str(e.value)
    assert f"{path}:4" in msg and "model.num_layers" in msg and "int" in msg and "'four'" in msg


def test_yaml_error_in_list_item_and_literal(tmp_path):
    path = write(tmp_path, "mesh:\n  shape: [1, x]\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2: mesh\.shape\[1\]: expected int"):
        load_config(Cfg, path)
    path = write(tmp_path, "model:\n  activation: tanh\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2: model\.activation: expected Literal"):
        load_config(Cfg, path)


def test_yaml_unknown_key_with_line_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  num_layer: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path)
    msg = str(e.value)
    assert f"{path}:3" in msg and "model.num_layer" in msg and "unknown key" in msg and "num_layers" in msg


@pytest.mark.parametrize("data, path, expected", [
    ({"train": {"use_bf16": 1}}, "train.use_bf16", "bool"),  # no int -> bool
    ({"train": {"steps": 1.5}}, "train.steps", "int"),
    ({"train": {"steps": True}}, "train.steps", "int"),  # no bool -> int
    ({"model": 3}, "model", "ModelCfg"),
    ({"name": 5}, "name", "str | None"),
    ({"pair": [1, "a", 2]}, "pair", "tuple[int, str]"),
    ({"train": {"lr": "fast"}}, "train.lr", "float"),
])
def test_from_dict_type_errors(data, path, expected):
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, data, source="mydict")
    msg = str(e.value)
    assert msg.startswith("mydict") and f"{path}:" in msg and expected in msg


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: data_path: missing required field"):
        load_config(Required, write(tmp_path, "n: 2\n"))
    with pytest.raises(ConfigError, match="data_path"):
        from_dict(Required, {})


def test_post_init_error_is_config_error():
    with pytest.raises(ConfigError, match="k must be positive"):
        from_dict(Checked, {"k": 0})


def test_override_unknown_key_suggests():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Cfg, ["model.num_layrs=4"])
    msg = str(e.value)
    assert "model.num_layrs" in msg and "did you mean" in msg and "model.num_layers" in msg
    with pytest.raises(ConfigError, match="model.num_layers"):
        apply_overrides(Cfg, ["num_layers=4"])  # missing section prefix
    with pytest.raises(ConfigError, match="valid keys under model: num_layers, hidden"):
        apply_overrides(Cfg, ["model.zzz=1"])  # no bogus "did you mean model?"


def test_override_errors():
    with pytest.raises(ConfigError, match="malformed override 'model.num_layers'.*key=value"):
        apply_overrides(Cfg, ["model.num_layers"])
    with pytest.raises(ConfigError, match="train.lr.*expected float.*'abc'"):
        apply_overrides(Cfg, ["train.lr=abc"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(Cfg, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="model: expected ModelCfg"):
        apply_overrides(Cfg, ["model=3"])


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(Cfg, missing)
    with pytest.raises(ConfigError, match="cfg.yaml: top level must be a mapping"):
        load_config(Cfg, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(Cfg, write(tmp_path, "model: [1,\n", name="bad.yaml"))


# ---------------------------------------------------------------- CLI
def test_cli_helpers(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 4\n")
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(path), "train.lr=1e-3", "mesh.shape=[2,4]"])
    cfg = config_from_args(Cfg, args)
    assert cfg.model.num_layers == 4 and cfg.train.lr == 1e-3 and cfg.mesh.shape == (2, 4)
    assert config_from_args(Cfg, parser.parse_args([])) == Cfg()


# ---------------------------------------------------------------- nested overrides keep the parent's defaults
@dataclasses.dataclass(frozen=True)
class Leaf:
    a: int = 1
    b: float = 3.0


@dataclasses.dataclass(frozen=True)
class Mid:
    x: int = 10
    leaf: Leaf = field(default_factory=Leaf)
    maybe: Leaf | None = None


@dataclasses.dataclass(frozen=True)
class Top:
    plain: Mid = field(default_factory=Mid)  # the nested class's own defaults
    tuned: Mid = field(default_factory=lambda: Mid(x=20, leaf=Leaf(a=2, b=1.0)))  # parent defaults differ
    inst: Mid = Mid(x=30, leaf=Leaf(b=0.5), maybe=Leaf(a=7))  # an instance as the default
    opt: Mid | None = field(default_factory=lambda: Mid(x=40))
    none: Mid | None = None


def test_cli_override_of_one_nested_field_keeps_parent_defaults():
    cfg = load_config(Top, None, ["tuned.x=21"])
    assert cfg.tuned == Mid(x=21, leaf=Leaf(a=2, b=1.0))
    cfg = load_config(Top, None, ["tuned.leaf.a=5"])  # two levels deep
    assert cfg.tuned == Mid(x=20, leaf=Leaf(a=5, b=1.0))
    cfg = load_config(Top, None, ["inst.leaf.a=9", "inst.maybe.b=2.5", "opt.leaf.b=4.0"])
    assert cfg.inst == Mid(x=30, leaf=Leaf(a=9, b=0.5), maybe=Leaf(a=7, b=2.5))
    assert cfg.opt == Mid(x=40, leaf=Leaf(b=4.0))
    assert cfg.plain == Mid() and cfg.tuned == Top().tuned and cfg.none is None
    cfg = load_config(Top, None, ["none.x=1", "plain.maybe.a=3"])  # None defaults: the nested class's defaults
    assert cfg.none == Mid(x=1) and cfg.plain.maybe == Leaf(a=3)


def test_yaml_nested_block_keeps_parent_defaults(tmp_path):
    path = write(tmp_path, "tuned:\n  x: 22\ninst:\n  leaf:\n    a: 8\nopt:\n  maybe: {a: 4}\n")
    cfg = load_config(Top, path)
    assert cfg.tuned == Mid(x=22, leaf=Leaf(a=2, b=1.0))
    assert cfg.inst == Mid(x=30, leaf=Leaf(a=8, b=0.5), maybe=Leaf(a=7))
    assert cfg.opt == Mid(x=40, maybe=Leaf(a=4))
    # YAML then an override of the same section: both start from the parent's defaults
    cfg = load_config(Top, path, ["tuned.leaf.b=9.0"])
    assert cfg.tuned == Mid(x=22, leaf=Leaf(a=2, b=9.0))
    assert from_dict(Top, {"tuned": {"leaf": {"b": 0.0}}}).tuned == Mid(x=20, leaf=Leaf(a=2, b=0.0))


def test_null_and_whole_section_replacement_still_work(tmp_path):
    cfg = load_config(Top, None, ["opt=null"])
    assert cfg.opt is None
    cfg = load_config(Top, write(tmp_path, "opt: null\ninst:\n  maybe: null\n"))
    assert cfg.opt is None and cfg.inst.maybe is None and cfg.inst.leaf == Leaf(b=0.5)
    cfg = load_config(Top, None, ["tuned={x: 1, leaf: {a: 0, b: 0.0}}", "inst.maybe=null"])
    assert cfg.tuned == Mid(x=1, leaf=Leaf(a=0, b=0.0)) and cfg.inst.maybe is None
    assert from_dict(Top, {"tuned": Mid()}).tuned == Mid()  # an instance replaces the section as is
    assert apply_overrides(Top(), ["tuned.x=5"]).tuned == Mid(x=5, leaf=Leaf(a=2, b=1.0))


def test_loop_round_sft_override_keeps_loop_default_epochs(tmp_path):
    from sage_jax.loop import LoopConfig

    assert LoopConfig().round_sft.epochs == 1.0
    assert load_config(LoopConfig, None, ["round_sft.max_steps=100"]).round_sft.epochs == 1.0
    cfg = load_config(LoopConfig, write(tmp_path, "round_sft:\n  max_steps: 100\n"))
    assert cfg.round_sft.epochs == 1.0 and cfg.round_sft.max_steps == 100
