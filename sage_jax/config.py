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
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "to_yaml", "apply_overrides", "load_config",
           "add_config_args", "config_from_args", "add_config_command", "config_fields", "config_help",
           "resolve_command_config"]

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
    if tp is _NoneType:
        return "None"
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_tname(a) for a in typing.get_args(tp))
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

    return _plain(cfg)


def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


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


def _override_type(cls, key: str, ov: str, what: str | None = None):
    what = what or f"override {ov!r}"
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
                raise ConfigError(f"{what}: unknown key {key!r}; {hint}")
            tp = hints[part]
        elif tp is Any or tp is dict or typing.get_origin(tp) is dict:
            tp = (typing.get_args(tp) or (Any, Any))[1]
        else:
            raise ConfigError(f"{what}: {'.'.join(parts[:i])} is {_tname(tp)}, not a section")
    return tp


def _set(cls, data: dict, key: str, raw: Any, what: str, *, raw_first: bool = False) -> None:
    """Validate ``raw`` (text, a list of texts or a value) for the field ``key`` and write it into ``data``.

    Text is tried YAML-parsed and as is (``raw_first``: as is first, for command-line flags).
    """
    tp = _override_type(cls, key, "", what)
    if isinstance(raw, str):
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        parsed = []
        for x in raw:
            try:
                parsed.append(yaml.safe_load(x))
            except yaml.YAMLError:
                parsed.append(x)
    else:
        parsed = raw
    first, second = (raw, parsed) if raw_first else (parsed, raw)
    try:
        value = _convert(tp, first, key, what, None)
    except ConfigError as err:
        try:  # e.g. name=123 or name=null for a str field: keep the raw text
            value = _convert(tp, second, key, what, None)
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


def _apply(cls, data: dict, overrides: Sequence[str]) -> None:
    """Validate each override against its field type and write it into ``data`` in place."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    for ov in overrides:
        key, sep, raw = ov.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed override {ov!r}: expected key=value, e.g. model.num_layers=4")
        _set(cls, data, key, raw, f"override {ov!r}")


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


_OVERRIDE_TOKEN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


@dataclasses.dataclass(frozen=True)
class _Flag:
    options: tuple[str, ...]  # e.g. ("-o", "--output")
    field: str  # dotted config path
    kind: str  # "value" | "list" | "true" | "false"
    metavar: str | None = None

    @property
    def dest(self) -> str:
        long = [o for o in self.options if o.startswith("--")] or list(self.options)
        return long[0].lstrip("-").replace("-", "_")


def _parse_flags(flags: Mapping[str, str] | None) -> list[_Flag]:
    out = []
    for opts, spec in (flags or {}).items():
        field, _, metavar = spec.partition(" ")
        kind = "value"
        if field[:1] in "+!":
            kind, field = ("true" if field[0] == "+" else "false"), field[1:]
        elif field.endswith("*"):
            kind, field = "list", field[:-1]
        out.append(_Flag(tuple(opts.replace("/", " ").split()), field, kind, metavar or None))
    return out


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    """How a config command's command line maps onto its config dataclass (see add_config_command)."""

    target: str  # "module:ConfigClass:function"
    example: str | None = None  # arguments after the command, e.g. "max_steps=100 lora.rank=16"
    positionals: tuple[str, ...] = ()  # config fields filled by plain (non key=value) arguments, in order
    flags: tuple[_Flag, ...] = ()

    def config_class(self) -> type:
        import importlib

        mod, cls, _ = self.target.split(":")
        return getattr(importlib.import_module(mod), cls)


def _flow(v: Any) -> str:
    """A value as one line of YAML (what a ``key=value`` override takes)."""
    text = yaml.safe_dump(_plain(v), default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text.removesuffix("...").rstrip()


def config_fields(cls, inst: Any = dataclasses.MISSING, prefix: str = "", depth: int = 0) -> list[tuple[str, str, Any]]:
    """``(dotted path, type name, default)`` of every field, nested sections included (``MISSING``: required).

    Defaults are the resolved ones: a section's fields show the parent's default of that section
    (LoopConfig's ``round_sft.epochs`` is 1.0), falling back to the nested class's own defaults when
    the section defaults to None.
    """
    if inst is dataclasses.MISSING:
        try:
            inst = cls()
        except Exception:  # required fields: per-field defaults below
            inst = None
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _hints(cls)[f.name]
        val = getattr(inst, f.name) if inst is not None else _field_default(f)
        out.append((prefix + f.name, _tname(tp), val))
        if (sub := _dataclass_of(tp)) is not None and depth < 8:
            out += config_fields(sub, val if isinstance(val, sub) else dataclasses.MISSING,
                                 f"{prefix}{f.name}.", depth + 1)
    return out


def _default_example(cls) -> str:
    import shlex

    for path, _, val in config_fields(cls):  # the first top-level scalar that needs no shell quoting
        if "." not in path and isinstance(val, (bool, int, float, str)) and val != "":
            if shlex.quote(text := f"{path}={_flow(val)}") == text:
                return text
    return ""


def config_help(cls, *, prog: str = "", example: str | None = None, positionals: Sequence[str] = (),
                flags: Sequence[_Flag] = ()) -> str:
    """The config part of a command's ``--help``: every field (dotted), its type and default, and an example."""
    aliases: dict[str, list[str]] = {}
    for i, name in enumerate(positionals):
        aliases.setdefault(name, []).append(f"argument {i + 1}")
    for fl in flags:
        aliases.setdefault(fl.field, []).append("/".join(fl.options)
                                                + {"true": " (=true)", "false": " (=false)"}.get(fl.kind, ""))
    import shutil
    import textwrap

    intro = (f"config: {cls.__name__} ({cls.__module__}). Resolved as: field defaults <- --config FILE.yaml "
             "<- arguments and flags <- KEY=VALUE overrides (dotted for nested sections; values are YAML). "
             "--print-config prints the resolved config as YAML and exits.")
    width = max(40, min(shutil.get_terminal_size().columns, 100) - 2)
    lines = [textwrap.fill(intro, width), "", "fields (type = default):"]
    for path, tname, val in config_fields(cls):
        if val is dataclasses.MISSING:
            shown = "(required)"
        elif dataclasses.is_dataclass(val) and not isinstance(val, type):
            shown = "(section)"
        else:
            shown = _flow(val)
        extra = f"  [{', '.join(aliases[path])}]" if path in aliases else ""
        lines.append(f"  {path}: {tname} = {shown}{extra}")
    example = _default_example(cls) if example is None else example
    lines += ["", "example:", f"  {prog} {example}".rstrip()]
    return "\n".join(lines) + "\n"


class _ConfigParser(argparse.ArgumentParser):
    """The parser of one config command: lazy field help, key=value tokens accepted between flags."""

    config_spec: CommandSpec | None = None

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        rest = []
        for e in extras:  # "IN -o OUT key=value": argparse leaves the late positionals over
            if e.startswith("-") or not hasattr(ns, "overrides"):
                rest.append(e)
            else:
                ns.overrides = [*(ns.overrides or []), e]
        return ns, rest

    def format_help(self) -> str:
        text = super().format_help()
        spec = self.config_spec
        if spec is None:
            return text
        try:
            cls = spec.config_class()
        except Exception as e:  # noqa: BLE001  (help must still print)
            return text + f"\n(config fields unavailable: {type(e).__name__}: {e})\n"
        return text + "\n" + config_help(cls, prog=self.prog, example=spec.example,
                                          positionals=spec.positionals, flags=spec.flags)


def resolve_command_config(cls: type[T], args: argparse.Namespace, spec: CommandSpec | None = None) -> T:
    """The config of a command line: defaults <- ``--config`` YAML <- arguments and flags <- ``key=value``."""
    spec = spec or CommandSpec(target="")
    path = getattr(args, "config", None)
    data = _read_yaml(Path(path)) if path is not None else {}
    tokens = [v for name in spec.positionals if (v := getattr(args, f"arg_{name}", None)) is not None]
    tokens += list(getattr(args, "overrides", None) or ())
    plain = [t for t in tokens if not _OVERRIDE_TOKEN.match(t)]
    overrides = [t for t in tokens if _OVERRIDE_TOKEN.match(t)]
    if len(plain) > len(spec.positionals):
        raise ConfigError(f"unexpected argument {plain[len(spec.positionals)]!r}: give config fields as key=value"
                          + (f" (positional: {', '.join(spec.positionals)})" if spec.positionals else ""))
    for name, tok in zip(spec.positionals, plain):
        _set(cls, data, name, tok, f"argument {tok!r} ({name})", raw_first=True)
    for fl in spec.flags:
        v = getattr(args, fl.dest, None)
        if v is not None:
            _set(cls, data, fl.field, v, f"{'/'.join(fl.options)} {v!r}", raw_first=True)
    _apply(cls, data, overrides)
    return from_dict(cls, data, source=str(path) if path is not None else "<command line>")


def _run_target(spec: CommandSpec, show: str | None, args: argparse.Namespace) -> int:
    import importlib
    import json

    mod, cname, fn = spec.target.split(":")
    m = importlib.import_module(mod)
    cfg = resolve_command_config(getattr(m, cname), args, spec)
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        return 0
    result = getattr(m, fn)(cfg)
    if isinstance(result, int) and not isinstance(result, bool):
        return result  # the function's own exit code (it printed what it had to)
    if show:
        smod, sfn = show.split(":")
        print(getattr(importlib.import_module(smod), sfn)(result))
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))
    return int(getattr(result, "exit_code", 0))  # a result may carry the command's exit status


def add_config_command(subparsers, name: str, target: str, *, help: str, description: str = "",
                       show: str | None = None, example: str | None = None, positionals: Sequence[str] = (),
                       flags: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """A CLI subcommand ``NAME [--config YAML] [--print-config] key=value ...`` that resolves a config and runs it.

    ``target`` is ``"module:ConfigClass:function"``: the function takes the config and returns an exit
    code (int: it printed its own output), None, or a result printed as JSON, or by ``show``
    (``"module:function"`` formatting the result); a result's ``exit_code`` attribute is the exit status. Both are
    imported only when the command runs (or its ``--help`` is shown), so ``sage-jax --help`` stays fast.

    ``--help`` lists every field of the config with its type and default (nested sections dotted)
    and ``example`` (the arguments after the command; default: one field's default as an override).

    Shorthands, each only another way to write an override: ``positionals`` names the fields that
    plain (not ``key=value``) arguments fill, in order (``"input IN"``: field ``input``, shown as ``IN``;
    ``annotate x.json`` is ``input=x.json``); ``flags``
    maps option strings to fields: ``{"-o --output": "output"}`` takes a value,
    ``"+strict"`` sets a bool field true, ``"!progress"`` sets it false, ``"files*"`` takes one or
    more values (a list field); a metavar may follow the field after a space (``"output OUT.jsonl"``).
    Precedence: field defaults <- ``--config`` <- positionals and flags <- ``key=value`` overrides.
    """
    pos = [p.split() for p in positionals]  # "input IN": field input, shown as IN
    spec = CommandSpec(target=target, example=example, positionals=tuple(p[0] for p in pos),
                       flags=tuple(_parse_flags(flags)))
    old = getattr(subparsers, "_parser_class", None)
    subparsers._parser_class = _ConfigParser  # argparse builds subparsers with this class
    try:
        p = subparsers.add_parser(name, help=help, description=description or help)
    finally:
        subparsers._parser_class = old
    p.config_spec = spec
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML config file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for fl in spec.flags:
        kw: dict[str, Any] = {"dest": fl.dest, "default": None}
        if fl.kind in ("true", "false"):
            kw.update(action="store_const", const=fl.kind == "true", help=f"{fl.field}={fl.kind}")
        else:
            meta = fl.metavar or fl.field.rsplit(".", 1)[-1].upper()
            kw.update(metavar=meta, help=f"{fl.field}={meta}")
            if fl.kind == "list":
                kw["nargs"] = "+"
        p.add_argument(*fl.options, **kw)
    for field, *meta in pos:
        m = meta[0] if meta else field.upper()
        p.add_argument(f"arg_{field}", nargs="?", default=None, metavar=m, help=f"{field}={m}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (fields below)")
    p.set_defaults(func=functools.partial(_run_target, spec, show), command_prog=p.prog)  # for error lines
    return p
