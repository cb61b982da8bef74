"""`sage-jax data convert`, `data stats`, `data build` and `sage-jax mix`: thin wrappers over the data functions.

Wire into ``sage_jax/cli.py`` with ``register(sub)`` (adds ``data`` and ``mix``), or separately with
``register_data(sub)`` / ``register_mix(sub)``. Each command is a config dataclass (YAML ``--config``,
``key=value`` overrides, ``--print-config``); the flags are shorthands for fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from pathlib import Path
from typing import Literal

__all__ = ["register", "register_data", "register_mix", "ConvertConfig", "StatsConfig", "MixConfig",
           "BuildConfig", "convert", "stats", "mix_command", "build"]

Format = Literal["sharegpt", "ed", "esconv", "dailydialog"]  # sage_jax.data.readers.FORMATS


def _progress(cfg) -> bool | None:
    return None if cfg.progress else False


def _need(value, what: str) -> None:
    if value is None or value == "":
        raise ValueError(f"{what} is required")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """`sage-jax data convert`: a corpus (file, split folder or corpus folder) to SAC JSONL."""

    format: Format | None = None  # input corpus format (required)
    input: str | None = None  # a corpus file, split folder or corpus folder (required)
    output: str | None = None  # SAC JSONL output, replaced (required)
    strict: bool = False  # stop at the first malformed record
    progress: bool = True  # progress bars


def convert(cfg: ConvertConfig) -> int:
    from sage_jax.data.jsonl import JsonlWriter, ReadReport
    from sage_jax.data.readers import iter_corpus

    _need(cfg.format, "data convert: format= (--format)")
    _need(cfg.input, "data convert: input= (IN)")
    _need(cfg.output, "data convert: output= (-o OUT.jsonl)")
    if not Path(cfg.input).exists():
        raise FileNotFoundError(errno.ENOENT, "file not found", cfg.input)
    report = ReadReport(cfg.input, strict=cfg.strict)
    with JsonlWriter(cfg.output, append=False) as w:  # written to OUT.tmp, renamed on success
        w.write_all(iter_corpus(cfg.format, cfg.input, report, progress=_progress(cfg)))
        if not w.count:  # an empty OUT would look like a finished conversion: keep the old one
            print(report.summary(), file=sys.stderr)
            raise ValueError(f"no valid dialogue in {cfg.input} ({report.records} records, {report.skipped} "
                             f"skipped); {cfg.output} not written")
    print(report.summary(), file=sys.stderr)
    print(f"wrote {report.converted} dialogues to {cfg.output}")
    return 0


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """`sage-jax data stats`: counts, label distributions, turn and token lengths."""

    path: str | None = None  # SAC JSONL file, or a corpus file/folder (required)
    format: Literal["auto", "sac"] | Format = "auto"  # how to read path (auto: by its file names)
    tokenizer: str | None = None  # HF tokenizer dir: report token lengths
    max_len: int | None = None  # count dialogues longer than this many tokens (needs tokenizer)
    special_tokens: bool = False  # render latents with the latent special tokens
    top: int = 10  # values shown per label distribution
    json: bool = False  # print JSON instead of text
    strict: bool = False  # stop at the first malformed record
    progress: bool = True  # progress bars


def stats(cfg: StatsConfig) -> int:
    from sage_jax.data.stats import (chat_template_lengths, compute_stats, format_stats, load_dialogues,
                                     load_tokenizer, stats_to_json)

    _need(cfg.path, "data stats: path= (PATH)")
    if cfg.max_len is not None and cfg.tokenizer is None:
        raise ValueError("--max-len needs --tokenizer DIR (max_len= needs tokenizer=)")
    dialogues, report = load_dialogues(cfg.path, cfg.format, strict=cfg.strict, progress=_progress(cfg))
    token_length = None
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer, special_tokens=cfg.special_tokens)
        token_length = chat_template_lengths(tok, special_tokens=cfg.special_tokens)
    st = compute_stats(dialogues, token_length=token_length, max_len=cfg.max_len, progress=_progress(cfg))
    st.read = {"records": report.records, "converted": report.converted, "skipped": report.skipped,
               "errors": [str(e) for e in report.errors[:20]]}
    if cfg.json:
        print(json.dumps(stats_to_json(st), ensure_ascii=False, indent=1))
    else:
        print(format_stats(st, top=cfg.top))
        if report.skipped:
            print(report.summary(), file=sys.stderr)
    return 0


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """`sage-jax data build`: tokenize JSONL once into ArrayRecord that sft/dpo stream (train_files=[DIR])."""

    inputs: tuple[str, ...] = ()  # SAC JSONL (kind=sft) or preference-pair JSONL (kind=dpo), in order (required)
    output: str | None = None  # the dataset directory (required)
    tokenizer: str | None = None  # the run's model directory (HF; its tokenizer) (required)
    kind: Literal["sft", "dpo"] = "sft"
    seq_len: int = 2048  # the run's seq_len (records are cut/dropped to fit it)
    template: str | None = None  # the run's template (None: the tokenizer's own)
    latent_tokens: bool = False  # the run's model.latent_tokens
    records_per_shard: int = 50_000  # records per ArrayRecord file (a rerun resumes after the last whole one)
    overwrite: bool = False  # rebuild a finished dataset of other inputs or settings
    strict: bool = False  # stop at the first malformed record
    progress: bool = True  # progress bars


def build(cfg: BuildConfig) -> int:
    from sage_jax.data.build import BuildSpec, build_dataset, load_tokenizer

    _need(cfg.inputs, "data build: inputs= (--inputs IN.jsonl ...)")
    _need(cfg.output, "data build: output= (-o DIR)")
    _need(cfg.tokenizer, "data build: tokenizer= (--tokenizer MODEL_DIR)")
    tok = load_tokenizer(cfg.tokenizer, cfg.latent_tokens)
    meta = build_dataset(BuildSpec(kind=cfg.kind, inputs=tuple(cfg.inputs), output=cfg.output, seq_len=cfg.seq_len,
                                   template=cfg.template, latent_tokens=cfg.latent_tokens, strict=cfg.strict,
                                   records_per_shard=cfg.records_per_shard, overwrite=cfg.overwrite,
                                   progress=_progress(cfg)), tok)
    print(f"wrote {meta['records']} {cfg.kind} records to {cfg.output}")
    return 0


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """`sage-jax mix`: SAC sources mixed by a spec ({name: {path, size, prompt}}), shuffled, optionally blended."""

    spec: str | None = None  # mix spec (YAML or JSON); relative paths are relative to it (required)
    output: str | None = None  # SAC JSONL output, replaced (required)
    seed: int = 0  # shuffle and blend seed
    blend: bool = False  # blend each dialogue with 2 other random ones
    strict: bool = False  # stop at the first malformed record
    progress: bool = True  # progress bars


def mix_command(cfg: MixConfig) -> int:
    from sage_jax.data.jsonl import write_sac
    from sage_jax.data.mix import load_mix_spec, mix

    _need(cfg.spec, "mix: spec= (SPEC)")
    _need(cfg.output, "mix: output= (-o OUT.jsonl)")
    spec = load_mix_spec(cfg.spec)
    dialogues, report = mix(spec, seed=cfg.seed, blend_dialogues=cfg.blend, base_dir=Path(cfg.spec).parent,
                            strict=cfg.strict, progress=_progress(cfg))
    print(report.summary(), file=sys.stderr)
    if not dialogues:
        raise ValueError(f"no valid dialogue in the sources of {cfg.spec}; {cfg.output} not written")
    write_sac(cfg.output, dialogues)
    print(f"wrote {len(dialogues)} dialogues to {cfg.output}")
    return 0


_COMMON = {"--strict": "+strict", "--no-progress": "!progress"}


def register_data(subparsers) -> argparse.ArgumentParser:
    from sage_jax.config import add_config_command

    data = subparsers.add_parser("data", help="convert corpora to SAC JSONL; corpus statistics; tokenized datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    add_config_command(sub, "convert", "sage_jax.data.cli:ConvertConfig:convert",
                       help="convert a corpus (file or folder) to SAC JSONL",
                       description="Convert ShareGPT, EmpatheticDialogues (ed), ESConv or DailyDialog to SAC "
                                   "JSONL. Malformed records are reported (file, line, field) and skipped "
                                   "unless strict=true (--strict).",
                       example="--format ed data/ed -o data/ed.jsonl strict=true",
                       positionals=["input IN"],
                       flags={"-f --format": "format FORMAT", "-o --output": "output OUT.jsonl", **_COMMON})
    add_config_command(sub, "stats", "sage_jax.data.cli:StatsConfig:stats",
                       help="counts, label distributions, turn and token lengths",
                       description="Statistics of a SAC JSONL file or a corpus folder (converted in memory).",
                       example="data/train.jsonl tokenizer=runs/m1/tokenizer max_len=2048 top=5",
                       positionals=["path PATH"],
                       flags={"-f --format": "format FORMAT", "--tokenizer": "tokenizer DIR", "--max-len": "max_len N",
                              "--special-tokens": "+special_tokens", "--top": "top N", "--json": "+json",
                              **_COMMON})
    add_config_command(sub, "build", "sage_jax.data.cli:BuildConfig:build",
                       help="tokenize JSONL once into ArrayRecord for sft/dpo (train_files=[DIR])",
                       description="Tokenize SAC JSONL (kind=sft) or preference pairs (kind=dpo) with the run's "
                                   "tokenizer, template, seq_len and latent_tokens into an ArrayRecord dataset "
                                   "that sft/dpo stream through Grain (give the directory as train_files). "
                                   "Streams in constant memory; an interrupted build resumes after its last "
                                   "whole shard. A run with other settings refuses the dataset.",
                       example="--inputs data/train.jsonl -o data/train_built --tokenizer runs/base seq_len=2048",
                       flags={"-i --inputs": "inputs* IN.jsonl", "-o --output": "output DIR",
                              "--tokenizer": "tokenizer DIR", "--kind": "kind KIND", "--seq-len": "seq_len N",
                              "--overwrite": "+overwrite", **_COMMON})
    return data


def register_mix(subparsers) -> argparse.ArgumentParser:
    from sage_jax.config import add_config_command

    return add_config_command(
        subparsers, "mix", "sage_jax.data.cli:MixConfig:mix_command",
        help="mix SAC sources by a spec, shuffle, optionally blend",
        description="Take the first N valid dialogues of each source of the spec "
                    "({name: {path, size, prompt}}, YAML or JSON), shuffle under seed, and with blend=true "
                    "(--blend) append the turns of 2 other random dialogues to each.",
        example="mix.yaml -o data/mixed.jsonl seed=3 blend=true",
        positionals=["spec SPEC"],
        flags={"-o --output": "output OUT.jsonl", "--seed": "seed S", "--blend": "+blend", **_COMMON})


def register(subparsers) -> None:
    """Add ``data`` (convert, stats) and ``mix`` to the ``sage-jax`` subcommands."""
    register_data(subparsers)
    register_mix(subparsers)
