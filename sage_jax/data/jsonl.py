"""SAC JSONL files: a per-line reader that reports bad records, and an append-mode writer that flushes.

Reading: every non-blank line is a record. A malformed record raises (``strict=True``) or is
reported and skipped (default) as a :class:`RecordError` naming file, line and field; a
:class:`ReadReport` counts records, converted and skipped so nothing vanishes silently
(``records == converted + skipped``). Corpus readers share the same report.

Writing: :class:`JsonlWriter` appends one JSON object per line and flushes after each, so a long
stage that is killed keeps every finished record; on reopening it drops a torn last line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from sage_jax.progress import progress as progress_bar  # `progress` is the show/hide flag here
from sage_jax.sac import Dialogue, SACFormatError, dialogue_from_json, dialogue_to_json

__all__ = ["RecordError", "ReadReport", "iter_json_lines", "iter_records", "iter_sac", "read_sac", "JsonlWriter", "write_sac",
           "done_ids"]

log = logging.getLogger("sage_jax.data")
_LOGGED_PER_REPORT = 10  # warnings printed as they happen; the report keeps more


class RecordError(ValueError):
    """A malformed input record: ``file:line: field: message``."""

    def __init__(self, file: str | os.PathLike, line: int | None, field: str, message: str):
        self.file, self.line, self.field, self.message = str(file), line, field, message
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


@dataclass
class ReadReport:
    """Counts of one read (one file or a whole corpus folder) and the errors of skipped records."""

    source: str
    strict: bool = False
    records: int = 0
    converted: int = 0
    skipped: int = 0
    errors: list[RecordError] = field(default_factory=list)
    max_kept: int = 1000  # errors kept in memory (all are counted)

    def ok(self, n: int = 1) -> None:
        self.converted += n

    def fail(self, err: RecordError) -> None:
        """Raise in strict mode; otherwise count, keep and log the error and carry on."""
        if self.strict:
            raise err
        self.skipped += 1
        if len(self.errors) < self.max_kept:
            self.errors.append(err)
        if self.skipped <= _LOGGED_PER_REPORT:
            log.warning("skipped record: %s", err)
        elif self.skipped == _LOGGED_PER_REPORT + 1:
            log.warning("further skipped records of %s are not logged; see the summary", self.source)

    @property
    def balanced(self) -> bool:
        """True when every record was either converted or skipped."""
        return self.records == self.converted + self.skipped

    def summary(self, max_errors: int = 20) -> str:
        lines = [f"{self.source}: {self.records} records, {self.converted} converted, {self.skipped} skipped"]
        lines += [f"  {e}" for e in self.errors[:max_errors]]
        if self.skipped > min(len(self.errors), max_errors):
            lines.append(f"  ... and {self.skipped - min(len(self.errors), max_errors)} more")
        return "\n".join(lines)


def iter_json_lines(path: str | os.PathLike, report: ReadReport, *, progress: bool | None = None
                    ) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed JSON)`` per non-blank line, counting each as a record.

    Undecodable bytes and invalid JSON are reported through ``report`` (field ``<json>``); the
    caller reports the outcome (``ok``/``fail``) of every record it receives.
    """
    path = Path(path)
    with open(path, "rb") as f, progress_bar(path.stat().st_size, path.name, unit="B", unit_scale=True, leave=False,
                                                      show=progress) as bar:
        for line_no, raw in enumerate(f, 1):
            bar.update(len(raw))
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                report.records += 1
                report.fail(RecordError(path, line_no, "<bytes>", f"not UTF-8 at byte {e.start}"))
                continue
            if not text.strip():
                continue
            report.records += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                report.fail(RecordError(path, line_no, "<json>", f"invalid JSON: {e.msg} (column {e.colno})"))
                continue
            yield line_no, obj


def iter_records(path: str | os.PathLike, report: ReadReport, parse: Callable[[Any, int], Any], *,
                 progress: bool | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parse(obj, line number))`` per JSON line; a record whose ``parse`` raises
    :class:`SACFormatError` is reported (file, line, field) and skipped, the others counted ok."""
    for line_no, obj in iter_json_lines(path, report, progress=progress):
        try:
            item = parse(obj, line_no)
        except SACFormatError as e:
            report.fail(RecordError(path, line_no, e.field or "<record>", e.message))
            continue
        report.ok()
        yield line_no, item


def iter_sac(path: str | os.PathLike, report: ReadReport | None = None, *, strict: bool = False,
             check: Callable[[Dialogue], None] | None = None, progress: bool | None = None) -> Iterator[Dialogue]:
    """Yield the valid dialogues of a SAC JSONL file; bad records go to ``report`` (or raise if strict).

    ``check`` (e.g. :func:`sage_jax.sac.check_dialogue`) may reject a well-formed dialogue by
    raising :class:`SACFormatError`; it is then reported like any malformed record.
    """
    report = report if report is not None else ReadReport(str(path), strict=strict)

    def parse(obj, _line):
        d = dialogue_from_json(obj)
        if check is not None:
            check(d)
        return d

    for _, d in iter_records(path, report, parse, progress=progress):
        yield d


def read_sac(path: str | os.PathLike, *, strict: bool = False, progress: bool | None = None
             ) -> tuple[list[Dialogue], ReadReport]:
    """All valid dialogues of a SAC JSONL file, and the report of what was skipped."""
    report = ReadReport(str(path), strict=strict)
    return list(iter_sac(path, report, progress=progress)), report


def _encode(obj: Any) -> bytes:
    try:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. bad model output): \u-escape instead of failing
        return (json.dumps(obj, ensure_ascii=True) + "\n").encode("ascii")


def _repair_tail(path: Path) -> None:
    """Make an existing file end at a line boundary: finish a complete last record, drop a torn one."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        block = 1 << 16  # find the start of the last line without reading the whole file
        pos, tail = size, b""
        while pos > 0 and b"\n" not in tail:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        start = pos + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.seek(start)
        last = f.read()
        try:
            json.loads(last.decode("utf-8"))
            f.seek(size)
            f.write(b"\n")
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("%s: dropping a torn last line (%d bytes) before appending", path, len(last))
            f.truncate(start)


class JsonlWriter:
    """Write JSON objects (or :class:`Dialogue`\\ s) one per line, flushed after each.

    ``append=True`` (default) continues an existing file (after repairing a torn last line);
    ``append=False`` writes ``PATH.tmp`` and renames it over ``PATH`` on a clean close, so a
    failed run never leaves a half-written output that looks finished.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = True):
        self.path = Path(path)
        if self.path.is_dir():  # checked first: the rename at the end would fail after all the work
            raise IsADirectoryError(errno.EISDIR, "output is a directory, expected a file", str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.append, self.count = append, 0
        if append:
            if self.path.exists():
                _repair_tail(self.path)
            self._target = self.path
            self._f = open(self.path, "ab")
        else:
            self._target = self.path.with_name(self.path.name + ".tmp")
            self._f = open(self._target, "wb")

    def write(self, item: Dialogue | Mapping) -> None:
        obj = dialogue_to_json(item) if isinstance(item, Dialogue) else item
        self._f.write(_encode(obj))
        self._f.flush()
        self.count += 1

    def write_all(self, items: Iterable[Dialogue | Mapping]) -> int:
        n = self.count
        for it in items:
            self.write(it)
        return self.count - n

    def close(self, *, commit: bool = True) -> None:
        if self._f.closed:
            return
        self._f.close()
        if not self.append:
            if commit:
                os.replace(self._target, self.path)
            else:
                self._target.unlink(missing_ok=True)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)


def write_sac(path: str | os.PathLike, dialogues: Iterable[Dialogue | Mapping], *, append: bool = False) -> int:
    """Write dialogues to a JSONL file (replacing it unless ``append``); returns how many."""
    with JsonlWriter(path, append=append) as w:
        return w.write_all(dialogues)


def read_records(path: str | os.PathLike) -> dict[str, dict]:
    """The records of a JSONL output keyed by their "id" (the last one wins), to resume a stage;
    unreadable lines (a line torn by a kill) are ignored: JsonlWriter repairs them on append."""
    path, recs = Path(path), {}
    if not path.exists():
        return recs
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                recs[obj["id"]] = obj
    return recs


def done_ids(path: str | os.PathLike) -> set[str]:
    """Ids already in a JSONL output (to skip finished items on restart)."""
    return set(read_records(path))
