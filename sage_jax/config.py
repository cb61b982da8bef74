"""Typed dataclass configs: defaults <- YAML file <- ``key=value`` overrides.

    cfg = load_config(TrainConfig, "train.yaml", ["model.num_layers=4", "train.lr=5e-5"])

Configs are plain (optionally frozen) dataclasses; fields may be int, float, bool, str,
``X | None``, ``tuple[X, ...]``, ``list[X]``, ``dict[str, X]``, ``Literal[...]``, ``Any``
or nested dataclasses. Every problem raises :class:`ConfigError` naming the source
(file and YAML line when known), the dotted field path, the expected type and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "to_yaml", "apply_overrides", "load_config",
           "add_config_args", "config_from_args"]

T = TypeVar("T")
_NoneType = type(None)


class ConfigError(ValueError):
    """An invalid configuration (file, key, type or value)."""


# ---------------------------------------------------------------- YAML with line numbers
class _LineDict(dict):
    """A dict that remembers the 1-based YAML line of each key (``.lines``)."""

    def __init__(self, items=(), lines=None):
        super().__init__(items)
        self.lines = dict(lines or {})


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader, node):
    data = loader.construct_mapping(node, deep=True)  # also flattens "<<" merge keys
    lines = {loader.construct_object(k, deep=True): k.start_mark.line + 1 for k, _ in node.value}
    return _LineDict(data, lines)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def load_yaml_lines(path: Path, what: str = "config file") -> Any:
    """YAML (or JSON) whose mappings remember each key's line, for errors naming file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_LineLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e


def _read_yaml(path: Path) -> _LineDict:
    data = load_yaml_lines(path)
    if data is None:
        return _LineDict()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- validation / conversion
def _tname(tp) -> str:
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _fail(src: str, line: int | None, path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{src}:{line}: {path or '<root>'}: {msg}" if line else f"{src}: {path or '<root>'}: {msg}")


@functools.cache
def _hints(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_of(tp):
    """The dataclass behind ``tp`` or ``tp | None``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not _NoneType]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _convert(tp, v, path: str, src: str, line: int | None, strict: bool = False, base: Any = None):
    """``v`` as ``tp``; a mapping for a dataclass section starts from ``base`` (the parent's default) if given."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad():
        _fail(src, line, path, f"expected {_tname(tp)}, got {v!r} ({type(v).__name__})")

    if tp is Any:
        return v
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(v, tp):
            return v
        if not isinstance(v, Mapping):
            bad()
        return _build(tp, v, path, src, line, base if isinstance(base, tp) else None)
    if origin in (Union, types.UnionType):
        if v is None and _NoneType in args:
            return None
        arms = [a for a in args if a is not _NoneType]
        if len(arms) == 1 and not isinstance(v, (str, int, float)):  # keep nested errors precise
            return _convert(arms[0], v, path, src, line, strict, base)
        for s in (True,) if strict else (True, False):  # exact type match first, then coercions
            for a in arms:
                try:
                    return _convert(a, v, path, src, line, s)
                except ConfigError:
                    pass
        bad()
    if origin is Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        bad()
    if tp is float and not strict:
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
    if tp in (int, float, bool, str):
        if isinstance(v, tp) and not (tp is int and isinstance(v, bool)):
            return v
        bad()
    if tp in (tuple, list) or origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(v) != len(args):
                _fail(src, line, path, f"expected {_tname(tp)} ({len(args)} items), got {v!r}")
            types_ = args
        else:
            types_ = [args[0] if args else Any] * len(v)
        items = [_convert(a, x, f"{path}[{i}]", src, line, strict) for i, (a, x) in enumerate(zip(types_, v))]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(v, Mapping):
            bad()
        kt, vt = args or (Any, Any)
        lines = getattr(v, "lines", {})
        return {_convert(kt, k, f"{path}.{k}", src, lines.get(k, line), strict):
                _convert(vt, x, f"{path}.{k}", src, lines.get(k, line), strict) for k, x in v.items()}
    if origin is None and isinstance(tp, type):
        if isinstance(v, tp):
            return v
        bad()
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls, data: Mapping, path: str, src: str, line: int | None, base: Any = None):
    """``cls`` from ``data``; fields not in ``data`` come from ``base`` (an instance) or the field defaults.

    A nested section given as a mapping starts from the parent's default of that section (``base``'s
    value, else the field's default / default_factory result), not from the nested class's defaults:
    ``round_sft.max_steps=100`` keeps the ``epochs`` that LoopConfig set for ``round_sft``.
    """
    hints, lines = _hints(cls), getattr(data, "lines", {})
    for k in data:
        if k not in hints:
            close = difflib.get_close_matches(str(k), list(hints), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(hints)}"
            _fail(src, lines.get(k, line), f"{path}.{k}" if path else str(k), f"unknown key for {cls.__name__}; {hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        p = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            v, parent = data[f.name], None
            if isinstance(v, Mapping) and _dataclass_of(hints[f.name]) is not None:
                parent = getattr(base, f.name) if base is not None else _field_default(f)
            kwargs[f.name] = _convert(hints[f.name], v, p, src, lines.get(f.name, line), base=parent)
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(src, line, p, f"missing required field of type {_tname(hints[f.name])}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # e.g. checks in __post_init__
        if isinstance(e, ConfigError):
            raise
        _fail(src, line, path, f"invalid {cls.__name__}: {e}")


def from_dict(cls: type[T], data: Mapping, *, source: str = "<dict>") -> T:
    """Build ``cls`` from a (nested) mapping, validating and converting every field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    return _build(cls, data, "", source, None)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (tuples become lists); ``from_dict`` inverts it."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_yaml(cfg) -> str:
    """YAML text of ``to_dict(cfg)`` in field order (loadable by ``load_config``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)  # allow_unicode=True mangles "\x85"


# ---------------------------------------------------------------- overrides
def _paths(cls, prefix: str = "", depth: int = 0) -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        out.append(prefix + name)
        if (sub := _dataclass_of(tp)) is not None and depth < 8:
            out += _paths(sub, f"{prefix}{name}.", depth + 1)
    return out


def _override_type(cls, key: str, ov: str):
    tp, parts = cls, key.split(".")
    for i, part in enumerate(parts):
        if (dc := _dataclass_of(tp)) is not None:
            if part not in (hints := _hints(dc)):
                paths = _paths(cls)
                close = [p for p in difflib.get_close_matches(key, paths, n=3) if not key.startswith(p + ".")]
                close += [p for p in paths if p not in close  # same or similar leaf name elsewhere
                          and difflib.get_close_matches(parts[-1], [p.rsplit(".", 1)[-1]], cutoff=0.8)]
                hint = (f"did you mean {', '.join(close[:5])}?" if close
                        else f"valid keys{' under ' + '.'.join(parts[:i]) if i else ''}: {', '.join(hints)}")
                raise ConfigError(f"override {ov!r}: unknown key {key!r}; {hint}")
            tp = hints[part]
        elif tp is Any or tp is dict or typing.get_origin(tp) is dict:
            tp = (typing.get_args(tp) or (Any, Any))[1]
        else:
            raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i])} is {_tname(tp)}, not a section")
    return tp


def _apply(cls, data: dict, overrides: Sequence[str]) -> None:
    """Validate each override against its field type and write it into ``data`` in place."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    for ov in overrides:
        key, sep, raw = ov.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed override {ov!r}: expected key=value, e.g. model.num_layers=4")
        tp, src = _override_type(cls, key, ov), f"override {ov!r}"
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        try:
            value = _convert(tp, parsed, key, src, None)
        except ConfigError as err:
            try:  # e.g. name=123 or name=null for a str field: keep the raw text
                value = _convert(tp, raw, key, src, None)
            except ConfigError:
                raise err from None
        *parents, last = key.split(".")
        node = data
        for p in parents:  # copy the path so YAML aliases are not mutated
            child = node.get(p)
            node[p] = child = _LineDict(child, getattr(child, "lines", None)) if isinstance(child, Mapping) else {}
            node = child
        node[last] = value
        getattr(node, "lines", {}).pop(last, None)


def apply_overrides(cls_or_cfg, overrides: Sequence[str]):
    """Apply ``key=value`` overrides (dotted paths, YAML-parsed values) to a class's defaults or a config."""
    if isinstance(cls_or_cfg, type):
        cls, data = cls_or_cfg, {}
    else:
        cls, data = type(cls_or_cfg), to_dict(cls_or_cfg)
    _apply(cls, data, overrides)
    return from_dict(cls, data, source="<overrides>")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file at ``path`` (if given) <- ``overrides``."""
    data = _read_yaml(Path(path)) if path is not None else {}
    _apply(cls, data, overrides)
    return from_dict(cls, data, source=str(path) if path is not None else "<overrides>")


# ---------------------------------------------------------------- CLI helpers
def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and positional ``KEY=VALUE`` overrides to ``parser``."""
    parser.add_argument("--config", metavar="PATH", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. model.num_layers=4 train.lr=5e-5")
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``load_config(cls, args.config, args.overrides)``."""
    return load_config(cls, args.config, args.overrides or ())


def add_config_command(subparsers, name: str, target: str, *, help: str, description: str = "",
                       show: str | None = None) -> argparse.ArgumentParser:
    """A CLI subcommand ``NAME [--config YAML] key=value ...`` that resolves a config and runs it.

    ``target`` is ``"module:ConfigClass:function"`` and ``show`` an optional ``"module:function"``
    formatting the result (default: JSON). Both are imported only when the command runs, so
    ``sage-jax --help`` stays fast.
    """
    import importlib

    p = subparsers.add_parser(name, help=help, description=description or help)
    add_config_args(p)

    def run(args: argparse.Namespace) -> int:
        mod, cls, fn = target.split(":")
        m = importlib.import_module(mod)
        result = getattr(m, fn)(config_from_args(getattr(m, cls), args))
        if show:
            smod, sfn = show.split(":")
            print(getattr(importlib.import_module(smod), sfn)(result))
        else:
            import json

            print(json.dumps(result, indent=2, default=str))
        return int(getattr(result, "exit_code", 0))  # a result may carry the command's exit status

    p.set_defaults(func=run)
    return p
