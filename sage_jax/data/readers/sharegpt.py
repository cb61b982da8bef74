"""ShareGPT JSON / JSONL (the paper's raw input) -> SAC without latents.

Input: a JSON list of records, or JSONL with one record per line:
``{"id": ..., "conversations": [{"from": "human"|"gpt", "value": "..."}], "system": optional}``.

Validation (SAGE.md §2): each message has exactly the keys ``from`` and ``value``; ``from`` is
``human`` or ``gpt``, strictly alternating and starting with ``human``; every ``value`` is a
non-empty string. One extension: a first message ``{"from": "system"}`` (or a top-level
``"system"`` string) becomes the dialogue's system prompt.

Mapping: human -> user, gpt -> assistant; no latents (``state``/``action`` absent: not annotated,
see ``sage-jax annotate``). Id: the record's ``id`` (string or integer), else
``<file stem>_<12 hex of the content's SHA-256>`` (system, roles, texts): a record keeps its id when
the file is reordered or extended, so resumable stages keyed by id (annotate) stay exactly-once;
identical records share an id (annotate counts the repeats as duplicates). ``meta``: source, file. Other top-level keys are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sage_jax.data.jsonl import ReadReport, RecordError
from sage_jax.progress import progress as progress_bar
from sage_jax.data.readers._common import bad, content_sha, convert_json_lines, type_name
from sage_jax.sac import Dialogue, SACFormatError, Turn

NAME = "sharegpt"
SOURCE = "sharegpt"
_ROLE = {"human": "user", "gpt": "assistant"}


def files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        return [(path, path.stem)]
    return [(f, f.stem) for f in sorted(path.iterdir()) if f.suffix in (".json", ".jsonl") and f.is_file()]


def convert(obj, fallback_prefix: str, file_name: str) -> Dialogue:
    if not isinstance(obj, dict):
        bad("<record>", f"expected a JSON object, got {type_name(obj)}")
    rid = obj.get("id")
    if rid is not None and not (isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid)):
        bad("id", f"expected a non-empty string or an integer, got {rid!r}")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        bad("system", f"expected a string, got {type_name(system)}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        bad("conversations", "missing field" if "conversations" not in obj else "expected a non-empty list")
    turns = []
    for i, m in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(m, dict):
            bad(where, f"expected an object, got {type_name(m)}")
        extra = sorted(set(m) - {"from", "value"})
        if extra:
            bad(f"{where}.{extra[0]}", "unexpected key (a message has only 'from' and 'value')")
        for k in ("from", "value"):
            if k not in m:
                bad(f"{where}.{k}", "missing field")
        frm, value = m["from"], m["value"]
        if not isinstance(value, str) or not value.strip():
            bad(f"{where}.value", "expected a non-empty string" if isinstance(value, str)
                else f"expected a string, got {type_name(value)}")
        if frm == "system" and i == 0 and system is None:
            system = value
            continue
        want = "human" if len(turns) % 2 == 0 else "gpt"
        if frm != want:
            why = "a conversation starts with human" if not turns else "human and gpt alternate"
            bad(f"{where}.from", f"expected {want!r}, got {frm!r} ({why})")
        turns.append(Turn(_ROLE[frm], value))
    if not turns:
        bad("conversations", "no human/gpt message")
    rid = str(rid) if rid is not None else f"{fallback_prefix}_{content_sha(turns, system)}"
    return Dialogue(rid, tuple(turns), system,
                    meta={"source": SOURCE, "file": file_name})


def _iter_json_array(path: Path, report: ReadReport, progress: bool | None) -> Iterator[tuple[int, int, object]]:
    """``(line, index, record)`` of a JSON list file, with the line where each record starts."""
    text = path.read_text(encoding="utf-8-sig")
    dec = json.JSONDecoder()
    p = _skip(text, 0)
    if p < len(text) and text[p] == "{":  # a single record
        try:
            obj, end = dec.raw_decode(text, p)
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, "<json>", f"invalid JSON: {e.msg} (column {e.colno})") from None
        report.records += 1
        yield text.count("\n", 0, p) + 1, 0, obj
        return
    if p >= len(text) or text[p] != "[":
        raise RecordError(path, text.count("\n", 0, p) + 1, "<json>", "expected a JSON list of conversations "
                          "(or JSONL: use a .jsonl extension)")
    p, line, last, index = _skip(text, p + 1), 1, 0, 0
    with progress_bar(len(text), path.name, unit="chr", unit_scale=True, leave=False, show=progress) as bar:
        while p < len(text) and text[p] != "]":
            line += text.count("\n", last, p)
            last = p
            try:
                obj, end = dec.raw_decode(text, p)
            except json.JSONDecodeError as e:  # the list is broken: no later record can be trusted
                raise RecordError(path, e.lineno, f"[{index}]", f"invalid JSON: {e.msg} (column {e.colno}); "
                                  "cannot resynchronise a JSON list") from None
            report.records += 1
            yield line, index, obj
            bar.update(end - p)
            index += 1
            p = _skip(text, end)
            if p < len(text) and text[p] == ",":
                p = _skip(text, p + 1)
            elif p < len(text) and text[p] != "]":
                raise RecordError(path, text.count("\n", 0, p) + 1, f"[{index}]", "expected ',' or ']'")
    if p >= len(text):
        raise RecordError(path, text.count("\n") + 1, "<json>", "unterminated JSON list")


def _skip(text: str, p: int) -> int:
    while p < len(text) and text[p].isspace():
        p += 1
    return p


def iter_file(path: Path, split: str, report: ReadReport, progress: bool | None = None) -> Iterator[Dialogue]:
    if path.suffix == ".jsonl":
        def conv(obj, line):
            return convert(obj, path.stem, path.name)
        yield from convert_json_lines(path, report, conv, progress)
        return
    for line, index, obj in _iter_json_array(path, report, progress):
        try:
            d = convert(obj, path.stem, path.name)
        except SACFormatError as e:
            report.fail(RecordError(path, line, f"[{index}].{e.field}", e.message))
            continue
        report.ok()
        yield d
