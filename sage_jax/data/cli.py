"""`sage-jax data convert`, `sage-jax data stats` and `sage-jax mix`: thin wrappers over the data functions.

Wire into ``sage_jax/cli.py`` with ``register(sub)`` (adds ``data`` and ``mix``), or separately with
``register_data(sub)`` / ``register_mix(sub)``. Each command sets ``func`` returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register", "register_data", "register_mix"]


def _progress(args) -> bool | None:
    return False if getattr(args, "no_progress", False) else None


def _convert(args: argparse.Namespace) -> int:
    from sage_jax.data.jsonl import JsonlWriter, ReadReport
    from sage_jax.data.readers import iter_corpus

    report = ReadReport(args.input, strict=args.strict)
    with JsonlWriter(args.output, append=False) as w:  # written to OUT.tmp, renamed on success
        w.write_all(iter_corpus(args.format, args.input, report, progress=_progress(args)))
    print(report.summary(), file=sys.stderr)
    print(f"wrote {report.converted} dialogues to {args.output}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from sage_jax.data.stats import (chat_template_lengths, compute_stats, format_stats, load_dialogues,
                                     load_tokenizer, stats_to_json)

    if args.max_len is not None and args.tokenizer is None:
        raise ValueError("--max-len needs --tokenizer DIR")
    dialogues, report = load_dialogues(args.path, args.format, strict=args.strict, progress=_progress(args))
    token_length = None
    if args.tokenizer is not None:
        tok = load_tokenizer(args.tokenizer, special_tokens=args.special_tokens)
        token_length = chat_template_lengths(tok, special_tokens=args.special_tokens)
    stats = compute_stats(dialogues, token_length=token_length, max_len=args.max_len, progress=_progress(args))
    stats.read = {"records": report.records, "converted": report.converted, "skipped": report.skipped,
                  "errors": [str(e) for e in report.errors[:20]]}
    if args.json:
        print(json.dumps(stats_to_json(stats), ensure_ascii=False, indent=1))
    else:
        print(format_stats(stats, top=args.top))
        if report.skipped:
            print(report.summary(), file=sys.stderr)
    return 0


def _mix(args: argparse.Namespace) -> int:
    from sage_jax.data.jsonl import write_sac
    from sage_jax.data.mix import load_mix_spec, mix

    spec = load_mix_spec(args.spec)
    dialogues, report = mix(spec, seed=args.seed, blend_dialogues=args.blend, base_dir=Path(args.spec).parent,
                            strict=args.strict, progress=_progress(args))
    write_sac(args.output, dialogues)
    print(report.summary(), file=sys.stderr)
    print(f"wrote {len(dialogues)} dialogues to {args.output}")
    return 0


def register_data(subparsers) -> argparse.ArgumentParser:
    from sage_jax.data.readers import FORMATS

    data = subparsers.add_parser("data", help="convert corpora to SAC JSONL; corpus statistics")
    sub = data.add_subparsers(dest="data_command", required=True)

    conv = sub.add_parser("convert", help="convert a corpus (file or folder) to SAC JSONL",
                          description="Convert ShareGPT, EmpatheticDialogues (ed), ESConv or DailyDialog to SAC "
                                      "JSONL. Malformed records are reported (file, line, field) and skipped "
                                      "unless --strict.")
    conv.add_argument("--format", "-f", required=True, choices=sorted(FORMATS), help="input corpus format")
    conv.add_argument("input", metavar="IN", help="a corpus file, split folder or corpus folder")
    conv.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="SAC JSONL output (replaced)")
    conv.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars")
    conv.set_defaults(func=_convert)

    st = sub.add_parser("stats", help="counts, label distributions, turn and token lengths",
                        description="Statistics of a SAC JSONL file or a corpus folder (converted in memory).")
    st.add_argument("path", metavar="PATH", help="SAC JSONL file, or a corpus file/folder")
    st.add_argument("--format", "-f", default="auto", choices=["auto", "sac", *sorted(FORMATS)],
                    help="how to read PATH (default: by its file names; other files as SAC JSONL)")
    st.add_argument("--tokenizer", metavar="DIR", default=None, help="HF tokenizer dir: report token lengths")
    st.add_argument("--max-len", type=int, default=None, metavar="N", help="count dialogues longer than N tokens")
    st.add_argument("--special-tokens", action="store_true", help="render latents with the latent special tokens")
    st.add_argument("--top", type=int, default=10, help="values shown per label distribution (default 10)")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")
    st.set_defaults(func=_stats)
    return data


def register_mix(subparsers) -> argparse.ArgumentParser:
    m = subparsers.add_parser("mix", help="mix SAC sources by a spec, shuffle, optionally blend",
                              description="Take the first N valid dialogues of each source of SPEC "
                                          "({name: {path, size, prompt}}, YAML or JSON), shuffle under --seed, "
                                          "and with --blend append the turns of 2 other random dialogues to each.")
    m.add_argument("spec", metavar="SPEC", help="mix spec (YAML or JSON); relative paths are relative to it")
    m.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="SAC JSONL output (replaced)")
    m.add_argument("--seed", type=int, default=0, help="shuffle and blend seed (default 0)")
    m.add_argument("--blend", action="store_true", help="blend each dialogue with 2 other random ones")
    m.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=_mix)
    return m


def register(subparsers) -> None:
    """Add ``data`` (convert, stats) and ``mix`` to the ``sage-jax`` subcommands."""
    register_data(subparsers)
    register_mix(subparsers)
