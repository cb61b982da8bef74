"""Corpus readers: ShareGPT, EmpatheticDialogues, ESConv and DailyDialog -> SAC dialogues.

    dialogues, report = read_corpus("ed", "shared/data/empatheticdialogues")      # all splits
    dialogues, report = read_corpus("esconv", "shared/data/esconv/train.jsonl")  # one split

IN is a file or a corpus folder (every split found, train, valid, test in that order; each
dialogue records its split in ``meta["split"]``, with ``validation``/``dev`` written ``valid``).
A malformed record is a :class:`~sage_jax.data.jsonl.RecordError` naming file, line and field:
reported and skipped by default (``report.skipped``, ``report.errors``), fatal with
``strict=True``; ``report.records == report.converted + report.skipped`` always.

Label mappings, user state / assistant action as (motivation, emotion, topic); details and
reasons in each module's docstring:

* ``sharegpt`` (human -> user, gpt -> assistant): no latents (not annotated).
* ``ed`` (speaker -> user, listener -> assistant): state = (the utterance's EDOS intent, else
  ``sharing``; its emotion label, else the conversation emotion; []); action = (the utterance's
  EDOS intent, else null; its emotion label, else null; []).
* ``esconv`` (usr -> user, sys -> assistant; consecutive same-speaker utterances merged): state =
  (null; ``emotion_type``; [``problem_type`` lower-cased]); action = (support strategy, the
  first of a merged turn; null; [``problem_type``]).
* ``dailydialog`` (first speaker -> user, second -> assistant): both = (dialogue act; emotion,
  0 -> null; []).

ESConv conversations that open with the supporter lose that opening (kept in
``meta["opening"]``) because a SAC dialogue starts with the user. The DailyDialog train dialogue
with misaligned labels is reported and skipped. Seeds: :func:`read_seeds`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from sage_jax.data.jsonl import ReadReport
from sage_jax.data.readers import dailydialog, empathetic, esconv, sharegpt
from sage_jax.data.readers._common import content_sha
from sage_jax.data.readers.seeds import SeedFile, read_seeds
from sage_jax.sac import Dialogue

__all__ = ["FORMATS", "read_corpus", "iter_corpus", "corpus_files", "detect_format", "read_seeds", "SeedFile",
           "content_sha"]

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (sharegpt, empathetic, esconv, dailydialog)}


def _module(fmt: str) -> ModuleType:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def corpus_files(fmt: str, path: str | os.PathLike) -> list[tuple[Path, str]]:
    """``[(file, split)]`` that ``read_corpus`` would read for ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found = _module(fmt).files(path)
    if not found:
        raise FileNotFoundError(f"{path}: no {fmt} corpus files found here")
    return found


def iter_corpus(fmt: str, path: str | os.PathLike, report: ReadReport, *,
                progress: bool | None = None) -> Iterator[Dialogue]:
    """Yield the dialogues of a corpus file or folder, reporting bad records into ``report``."""
    mod = _module(fmt)
    for f, split in corpus_files(fmt, path):
        yield from mod.iter_file(f, split, report, progress)


def read_corpus(fmt: str, path: str | os.PathLike, *, strict: bool = False,
                progress: bool | None = None) -> tuple[list[Dialogue], ReadReport]:
    """Convert a corpus file or folder to SAC dialogues; returns them and the read report."""
    report = ReadReport(str(path), strict=strict)
    return list(iter_corpus(fmt, path, report, progress=progress)), report


def _sniff(path: Path) -> str | None:
    """The format of a JSON/JSONL file by the keys of its first record."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return None
    first = head.lstrip()[:1]
    if first == "[":
        return "sharegpt"  # only ShareGPT comes as a JSON list
    line = next((ln for ln in head.splitlines() if ln.strip()), "")
    try:
        keys = set(json.loads(line))
    except (ValueError, TypeError):
        return None
    if "conv_id" in keys:
        return "ed"
    if "dialog" in keys:
        return "esconv"
    if "conversations" in keys:
        return "sharegpt"
    if "turns" in keys:
        return "sac"
    return None


def detect_format(path: str | os.PathLike) -> str | None:
    """The format of a corpus folder (by file names) or file (by name, else its first record):
    one of :data:`FORMATS`, ``"sac"`` for a SAC JSONL file, or None if unknown."""
    path = Path(path)
    if path.is_file():
        if path.name.startswith("dialogues_") and path.suffix == ".txt":
            return "dailydialog"
        return _sniff(path) if path.suffix in (".json", ".jsonl") else None
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if any(re.fullmatch(r"ed_(train|valid|test)\.jsonl", n) for n in names):
        return "ed"
    if "strategy.json" in names or path.name == "esconv":
        return "esconv"
    if any(n.startswith("dialogues_") and n.endswith(".txt") for n in names) or any(
            (path / s).is_dir() and any((path / s).glob("dialogues_*.txt"))
            for s in ("train", "validation", "valid", "test")):
        return "dailydialog"
    return None
