"""One command idiom: every `sage-jax` command is a config dataclass + YAML + key=value overrides.

For every registered (leaf) subcommand: ``--help`` exits 0 and lists the config's fields with their
defaults and an example that parses; ``--print-config`` exits 0 and prints YAML that loads back
through ``--config`` to the same config. New commands are covered by walking the parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex

import pytest
import yaml

from sage_jax import cli
from sage_jax.config import load_config, to_dict


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*path, name))


LEAVES = dict(_leaves(cli.build_parser()))
COMMANDS = sorted(LEAVES)


def test_every_documented_command_is_registered():
    expected = {("models", "fetch"), ("demo",), ("loop",), ("aot",), ("data", "convert"), ("data", "stats"),
                ("mix",), ("annotate",), ("sft",), ("dpo",), ("export-hf",), ("search",), ("compare",),
                ("eval", "eq-bench"), ("eval", "mt-bench"), ("eval", "latent"), ("serve",), ("chat",)}
    assert expected <= set(LEAVES)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def _help(path, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _print_config(argv, capsys) -> str:
    capsys.readouterr()
    assert cli.main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_command_is_a_config_command(path, capsys, tmp_path):
    parser = LEAVES[path]
    spec = getattr(parser, "config_spec", None)
    assert spec is not None, f"`sage-jax {' '.join(path)}` is not registered with config.add_config_command"
    cls = spec.config_class()

    # --help: every field (nested ones dotted) with its type and default, and an example
    text = _help(path, capsys)
    assert "--config" in text and "--print-config" in text
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.init:
            assert re.search(rf"^  {re.escape(f.name)}: .+ = ", text, re.M), f"{f.name} not listed"
    for name, value in to_dict(defaults).items():
        if not isinstance(value, (dict, list)):
            assert f"  {name}: " in text and yaml.safe_load(re.search(
                rf"^  {re.escape(name)}: .+? = (.*?)(  \[.*\])?$", text, re.M).group(1)) == value

    # the example parses: it resolves (--print-config) and each key=value in it lands in the config
    example = text.split("\nexample:\n", 1)[1].strip().splitlines()[0]
    argv = shlex.split(example)
    assert argv[: 1 + len(path)] == ["sage-jax", *path]
    overrides = [a for a in argv[1 + len(path):] if re.match(r"^[A-Za-z_][\w.]*=", a)]
    assert overrides, f"the example {example!r} has no key=value override"
    printed = yaml.safe_load(_print_config(argv[1:], capsys))
    for ov in overrides:
        assert _get(printed, ov.partition("=")[0]) == _get(to_dict(load_config(cls, None, [ov])),
                                                            ov.partition("=")[0]), ov

    # --print-config: YAML that loads back through --config to the same config
    out = _print_config(path, capsys)
    assert yaml.safe_load(out) == to_dict(defaults)
    f = tmp_path / "cfg.yaml"
    f.write_text(out)
    assert load_config(cls, f) == defaults
    assert _print_config([*path, "--config", str(f)], capsys) == out
    example_out = _print_config(argv[1:], capsys)
    f.write_text(example_out)
    assert _print_config([*path, "--config", str(f)], capsys) == example_out


def test_help_shows_the_parents_section_defaults(capsys):
    text = _help(("loop",), capsys)
    assert re.search(r"^  round_sft\.epochs: float = 1\.0$", text, re.M)  # LoopConfig's, not SFTConfig's 3.0
    assert re.search(r"^  sft\.epochs: float = 3\.0$", text, re.M)
    assert re.search(r"^  sft\.lora\.rank: int = 8$", text, re.M)  # nested two levels, dotted


def test_flags_positionals_and_overrides_mix(capsys, tmp_path):
    # the README's spellings are shorthands for fields; key=value may come anywhere, and wins
    cfg = yaml.safe_load(_print_config(["annotate", "raw.json", "-o", "out.jsonl", "tries=5", "--judge", "rules:",
                                        "--no-progress", "limit=3"], capsys))
    assert (cfg["input"], cfg["output"], cfg["judge"], cfg["tries"], cfg["progress"], cfg["limit"]) == (
        "raw.json", "out.jsonl", "rules:", 5, False, 3)
    f = tmp_path / "a.yaml"
    f.write_text("tries: 9\njudge: openai:gpt-4o\n")
    cfg = yaml.safe_load(_print_config(["annotate", "--config", str(f), "--judge", "rules:"], capsys))
    assert (cfg["tries"], cfg["judge"]) == (9, "rules:")  # YAML <- flags
    cfg = yaml.safe_load(_print_config(["eval", "eq-bench", "--score-results", "a.json", "b.json",
                                        "--no-cache"], capsys))
    assert cfg["score_results"] == ["a.json", "b.json"] and cfg["cache"] is False
    cfg = yaml.safe_load(_print_config(["export-hf", "step=3", "runs/m1", "-o", "runs/m1_hf"], capsys))
    assert (cfg["run_dir"], cfg["output"], cfg["step"]) == ("runs/m1", "runs/m1_hf", 3)
    cfg = yaml.safe_load(_print_config(["demo", "--quick"], capsys))
    assert cfg["quick"] is True


def test_command_line_errors_are_clear(capsys):
    capsys.readouterr()
    assert cli.main(["export-hf", "runs/m1", "extra", "--print-config"]) == 1
    assert "unexpected argument 'extra'" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "eighty", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert "--port 'eighty'" in err and "expected int" in err
    assert cli.main(["mix", "sede=3", "--print-config"]) == 1
    assert "did you mean seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["mix", "--no-such-flag"])
