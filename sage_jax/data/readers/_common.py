"""Shared plumbing of the corpus readers: split names, record errors with file and line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sage_jax.data.jsonl import ReadReport, iter_records
from sage_jax.sac import Dialogue, SACFormatError, Turn

_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
           "test": "test"}
SPLIT_ORDER = ("train", "valid", "test")


def split_name(name: str) -> str:
    """Normalise a split name (``validation``/``dev`` -> ``valid``); unknown names pass through."""
    return _SPLITS.get(name.lower(), name)


def content_sha(turns: Sequence[Turn], system: str | None = None) -> str:
    """12 hex digits of the SHA-256 of a dialogue's system prompt, roles and texts (not its latents,
    id or meta): what stays the same when a file is reordered or re-converted."""
    blob = json.dumps([system, [[t.role, t.text] for t in turns]], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def bad(field: str, message: str):
    """Raise a record-level format error (the caller adds file and line)."""
    raise SACFormatError(message, field)


def type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def require_str(obj: dict, key: str, where: str = "", *, empty_ok: bool = False) -> str:
    path = f"{where}.{key}" if where else key
    if key not in obj:
        bad(path, "missing field")
    v = obj[key]
    if not isinstance(v, str):
        bad(path, f"expected a string, got {type_name(v)}")
    if not empty_ok and not v.strip():
        bad(path, "empty text")
    return v


def convert_json_lines(path: Path, report: ReadReport, convert: Callable[[Any, int], Dialogue],
                       progress: bool | None) -> Iterator[Dialogue]:
    """Read a JSONL corpus file: ``convert(obj, line_no)`` per record, errors reported with file and line."""
    for _, d in iter_records(path, report, convert, progress=progress):
        yield d


def ordered_split_files(folder: Path, candidates: dict[str, str]) -> list[tuple[Path, str]]:
    """``[(file, split)]`` for the files of ``{filename: split}`` that exist in ``folder``, train first."""
    found = [(folder / name, split) for name, split in candidates.items() if (folder / name).is_file()]
    return sorted(found, key=lambda fs: SPLIT_ORDER.index(fs[1]) if fs[1] in SPLIT_ORDER else 99)
