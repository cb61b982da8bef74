"""Whole-dialogue SAC annotation by a judge (SAGE.md §2): raw dialogues -> SAC dialogues.

One call per dialogue: the annotator sees the whole dialogue (future-aware) in
:func:`~sage_jax.judge.prompts.annotation_prompt` and returns one JSON object labelling the
motivation, emotion and topics of every utterance::

    {"annotations": [{"turn": 1, "role": "user", "motivation": "venting", "emotion": "sad", "topic": ["exam"]},
                     {"turn": 2, "role": "assistant", "motivation": "sympathizing", "emotion": "caring", "topic": []}]}

:func:`parse_annotation` reads it strictly (one JSON value, optionally inside a single ```json
fence; exactly one entry per utterance, in order, with the right turn number and role; string or
null labels; a list of string topics; no unknown keys; values inside the schema's closed
vocabularies) and raises :class:`AnnotationError` otherwise. Failures are resampled (try t uses
seed ``seed + t``) up to ``tries`` times, then reported with their reason and skipped.

**Light rewrites and bridging questions** (``allow_rewrite``, the default, as the reference
annotator): the prompt lets the annotator lightly rewrite an utterance for readability and asks
it to append a short bridging question to an assistant utterance that does not end with one; an
entry's optional ``"text"`` replaces the utterance, and ``meta["rewritten"]`` lists the 1-based
numbers of the utterances that changed. The ``rules:`` annotator appends such a question (its
only rewrite). ``allow_rewrite=False``: labels only, ``"text"`` is an error.

**Where the user state goes.** Each user utterance's labels become that user turn's ``state``,
each assistant utterance's labels its ``action`` (DESIGN.md §3 keeps them as structured fields on
the turns). The paper's "move the user state into the next assistant turn" is done by the
renderer: :func:`sage_jax.sac.to_messages` writes the state of user turn i at the start of
assistant message i+1, before that turn's action (``{u_...} {a_...} reply``). A final user turn
keeps its state (no assistant message follows to carry it). ``meta["annotator"]`` records the
judge that produced the labels (``rules:v1`` for the heuristic one).

:func:`annotate_file` is the resumable, incremental file stage behind ``sage-jax annotate``.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_jax.judge.base import Judge
from sage_jax.judge.prompts import annotation_prompt, as_turns
from sage_jax.sac import DEFAULT_SCHEMA, Dialogue, Latent, SACFormatError, Schema, Turn

__all__ = ["AnnotationError", "AnnotationFailure", "parse_annotation", "annotate_dialogues", "iter_annotate",
           "AnnotateReport", "annotate_file", "read_dialogues"]

_ENTRY_KEYS = frozenset({"turn", "role", "motivation", "emotion", "topic"})
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n(.*)\n[ \t]*```\Z", re.S)
_RAW_KEPT = 2000  # characters of a failed output kept in the report


class AnnotationError(ValueError):
    """Annotator output that does not parse or does not fit the dialogue."""


@dataclass(frozen=True)
class AnnotationFailure:
    """A dialogue the annotator could not label: its id, why (the last try's reason), tries, last output."""

    id: str
    reason: str
    tries: int
    raw: str | None = None

    def to_json(self) -> dict[str, Any]:
        raw = self.raw if self.raw is None or len(self.raw) <= _RAW_KEPT else self.raw[:_RAW_KEPT] + "..."
        return {"id": self.id, "reason": self.reason, "tries": self.tries, "raw": raw}


def _label(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise AnnotationError(f"{where}: expected a string or null, got {type(v).__name__}")
    v = v.strip()
    return v or None


def _json_value(text: str) -> Any:
    t = text.strip()
    m = _FENCE.fullmatch(t)
    if m:
        t = m.group(1).strip()
    if not t:
        raise AnnotationError("empty output")
    try:
        return json.loads(t)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"not a single JSON value: {e.msg} at line {e.lineno} column {e.colno}") from None


def parse_annotation(text: str | None, dialogue: Dialogue, schema: Schema = DEFAULT_SCHEMA, *,
                     allow_rewrite: bool = False) -> Dialogue:
    """The annotated copy of ``dialogue`` from annotator output (strict; see the module docstring).

    ``allow_rewrite``: an entry may carry ``"text"``, a light rewrite of the utterance that replaces
    it (the reference annotator may rewrite for readability); otherwise ``"text"`` is an error.
    """
    if text is None:
        raise AnnotationError("no output")
    obj = _json_value(text)
    if not isinstance(obj, dict):
        raise AnnotationError(f'expected a JSON object {{"annotations": [...]}}, got {type(obj).__name__}')
    if set(obj) != {"annotations"}:
        extra = sorted(set(obj) - {"annotations"})
        raise AnnotationError(f"unexpected key {extra[0]!r} (expected only 'annotations')" if extra
                              else "missing key 'annotations'")
    rows = obj["annotations"]
    if not isinstance(rows, list):
        raise AnnotationError(f"annotations: expected a list, got {type(rows).__name__}")
    n = len(dialogue.turns)
    if len(rows) != n:
        raise AnnotationError(f"annotations: expected {n} entries (one per utterance), got {len(rows)}")
    allowed = _ENTRY_KEYS | ({"text"} if allow_rewrite else set())
    turns = []
    for i, (row, t) in enumerate(zip(rows, dialogue.turns)):
        where = f"annotations[{i}]"
        if not isinstance(row, dict):
            raise AnnotationError(f"{where}: expected an object, got {type(row).__name__}")
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise AnnotationError(f"{where}: unexpected key {unknown[0]!r}")
        for k in ("turn", "role", "motivation", "emotion", "topic"):
            if k not in row:
                raise AnnotationError(f"{where}: missing key {k!r}")
        num = row["turn"]
        if not isinstance(num, int) or isinstance(num, bool) or num != i + 1:
            raise AnnotationError(f"{where}.turn: expected {i + 1}, got {num!r}")
        if row["role"] != t.role:
            raise AnnotationError(f"{where}.role: expected {t.role!r}, got {row['role']!r}")
        topic = row["topic"]
        if topic is None:
            topic = []
        if not isinstance(topic, list):
            raise AnnotationError(f"{where}.topic: expected a list of strings, got {type(topic).__name__}")
        topics: list[str] = []
        for j, tp in enumerate(topic):
            if not isinstance(tp, str):
                raise AnnotationError(f"{where}.topic[{j}]: expected a string, got {type(tp).__name__}")
            if tp.strip() and tp.strip() not in topics:
                topics.append(tp.strip())
        latent = Latent(_label(row["motivation"], f"{where}.motivation"), _label(row["emotion"], f"{where}.emotion"),
                        tuple(topics))
        try:
            schema.validate_latent(latent, t.role, where)
        except SACFormatError as e:
            raise AnnotationError(str(e)) from None
        text_out = t.text
        if "text" in row:
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise AnnotationError(f"{where}.text: expected a non-empty string")
            text_out = row["text"]
        turns.append(Turn(t.role, text_out, state=latent) if t.role == "user"
                     else Turn(t.role, text_out, action=latent))
    return dialogue.replace(turns=tuple(turns))


def _annotate_batch(judge: Judge, dialogues: Sequence[Dialogue], *, tries: int, schema: Schema,
                    temperature: float, max_tokens: int, seed: int, example: bool,
                    allow_rewrite: bool) -> list[Dialogue | AnnotationFailure]:
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    out: list[Dialogue | AnnotationFailure | None] = [None] * len(dialogues)
    prompts: dict[int, str] = {}
    for i, d in enumerate(dialogues):
        try:
            if not as_turns(d, schema):
                raise ValueError("no turn to annotate")
            prompts[i] = annotation_prompt(d, schema=schema, example=example, allow_rewrite=allow_rewrite)
        except (ValueError, TypeError) as e:
            out[i] = AnnotationFailure(d.id, f"cannot build the prompt: {e}", 0)
    pending = sorted(prompts)
    used = {i: 0 for i in pending}
    last: dict[int, tuple[str, str | None]] = {}
    for t in range(tries):
        if not pending:
            break
        comps = judge.complete([prompts[i] for i in pending], temperature=temperature, max_tokens=max_tokens,
                               seed=seed + t)
        still = []
        for i, c in zip(pending, comps):
            used[i] += 1
            if not c.ok:
                last[i] = (f"call failed: {c.error}", None)
                still.append(i)
                continue
            try:
                d = parse_annotation(c.text, dialogues[i], schema, allow_rewrite=allow_rewrite)
            except (AnnotationError, SACFormatError) as e:
                last[i] = (f"malformed annotation: {e}", c.text)
                still.append(i)
                continue
            meta = {**d.meta, "annotator": judge.name}
            changed = [n for n, (a, b) in enumerate(zip(dialogues[i].turns, d.turns), 1) if a.text != b.text]
            if changed:
                meta["rewritten"] = changed
            out[i] = d.replace(meta=meta)
        pending = still
    for i in pending:
        reason, raw = last[i]
        out[i] = AnnotationFailure(dialogues[i].id, reason, used[i], raw)
    return out  # type: ignore[return-value]


def annotate_dialogues(judge: Judge, dialogues: Sequence[Dialogue], *, tries: int = 3,
                       schema: Schema = DEFAULT_SCHEMA, temperature: float = 0.8, max_tokens: int = 2048,
                       seed: int = 0, example: bool = True, allow_rewrite: bool = True
                       ) -> tuple[list[Dialogue], list[AnnotationFailure]]:
    """Annotate dialogues in one batch per try; returns (annotated, failures), input order kept in each.

    Defaults follow the reference annotator (temperature 0.8, 2048 tokens, one in-context example,
    light rewrites and bridging questions allowed).
    """
    res = _annotate_batch(judge, list(dialogues), tries=tries, schema=schema, temperature=temperature,
                          max_tokens=max_tokens, seed=seed, example=example, allow_rewrite=allow_rewrite)
    return ([r for r in res if isinstance(r, Dialogue)], [r for r in res if isinstance(r, AnnotationFailure)])


def iter_annotate(judge: Judge, dialogues: Iterable[Dialogue], *, chunk_size: int = 32, **kw
                  ) -> Iterator[tuple[Dialogue, Dialogue | AnnotationFailure]]:
    """Yield ``(input, annotated or failure)`` chunk by chunk (each chunk is one concurrent batch per try)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk: list[Dialogue] = []
    for d in dialogues:
        chunk.append(d)
        if len(chunk) == chunk_size:
            yield from zip(chunk, _annotate_batch(judge, chunk, **_defaults(kw)))
            chunk = []
    if chunk:
        yield from zip(chunk, _annotate_batch(judge, chunk, **_defaults(kw)))


def _defaults(kw: dict[str, Any]) -> dict[str, Any]:
    d = {"tries": 3, "schema": DEFAULT_SCHEMA, "temperature": 0.8, "max_tokens": 2048, "seed": 0, "example": True,
         "allow_rewrite": True}
    unknown = set(kw) - set(d)
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
    d.update(kw)
    return d


# ---------------------------------------------------------------- the file stage
def read_dialogues(path: str | os.PathLike, fmt: str = "auto", *, progress: bool | None = None):
    """(dialogues, ReadReport) of a ShareGPT JSON/JSONL file or folder, or a SAC JSONL file (latents dropped)."""
    from sage_jax.data.jsonl import read_sac
    from sage_jax.data.readers import detect_format, read_corpus

    if not Path(path).exists():  # not "cannot tell the format"
        raise FileNotFoundError(errno.ENOENT, "file not found", str(path))
    if fmt == "auto":
        fmt = detect_format(path) or ("sharegpt" if Path(path).is_dir() else "")
        if fmt not in ("sharegpt", "sac"):
            raise ValueError(f"{path}: cannot tell the format (expected ShareGPT JSON/JSONL or SAC JSONL); "
                             "pass --format sharegpt or --format sac")
    if fmt == "sac":
        return read_sac(path, progress=progress)
    if fmt != "sharegpt":
        raise ValueError(f"annotate reads sharegpt or sac, not {fmt!r}")
    return read_corpus("sharegpt", path, progress=progress)


@dataclass
class AnnotateReport:
    """What one ``annotate_file`` run did; ``summary()`` is what the CLI prints."""

    input: str
    output: str
    failures_path: str
    judge: str
    read: Any = None  # ReadReport of the input
    total: int = 0  # valid input dialogues
    already_done: int = 0  # skipped: id already in the output
    duplicates: int = 0  # skipped: id seen earlier in the input
    annotated: int = 0
    failed: int = 0
    failures: list[AnnotationFailure] = field(default_factory=list)
    judge_stats: dict[str, int] = field(default_factory=dict)

    def summary(self, max_failures: int = 10) -> str:
        lines = [f"annotate {self.input} -> {self.output} (judge {self.judge}): {self.total} dialogues, "
                 f"{self.annotated} annotated, {self.already_done} already done, {self.failed} failed"
                 + (f", {self.duplicates} duplicate ids skipped" if self.duplicates else "")]
        if self.read is not None and self.read.skipped:
            lines.append(f"input: {self.read.skipped} malformed records skipped")
        for f in self.failures[:max_failures]:
            lines.append(f"  failed {f.id}: {f.reason}")
        if self.failed > max_failures:
            lines.append(f"  ... and {self.failed - max_failures} more")
        if self.failed or (self.read is not None and self.read.skipped):
            lines.append(f"failure report: {self.failures_path}")
        if self.judge_stats:
            lines.append("judge: " + ", ".join(f"{k} {v}" for k, v in self.judge_stats.items()))
        return "\n".join(lines)


def annotate_file(input: str | os.PathLike, output: str | os.PathLike, judge: Judge, *, fmt: str = "auto",
                  failures_path: str | os.PathLike | None = None, chunk_size: int = 32, limit: int | None = None,
                  progress: bool | None = None, **kw) -> AnnotateReport:
    """Annotate a raw dialogue file into SAC JSONL, resumably.

    Ids already in ``output`` are skipped (a killed run continues where it stopped; a torn last
    line is dropped first); each output record keeps its input's content hash (``meta.content_sha``)
    and a resume whose input holds a different dialogue under a finished id (positional ids of a
    reordered or edited file) stops with a ValueError naming it, instead of skipping it silently; each annotated dialogue is appended and flushed as its chunk finishes.
    Failures of this run (and malformed input records) go to ``failures_path`` (default
    ``OUT.failures.jsonl``, rewritten each run: failed ids are tried again on the next run).
    ``limit`` caps the dialogues annotated in this run. ``kw``: see :func:`annotate_dialogues`.
    """
    from sage_jax.data.jsonl import JsonlWriter, read_records
    from sage_jax.data.readers import content_sha
    from sage_jax.progress import progress as progress_bar

    output = Path(output)
    fpath = Path(failures_path) if failures_path is not None else output.with_name(
        (output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name) + ".failures.jsonl")
    dialogues, read = read_dialogues(input, fmt, progress=False if progress is False else None)
    rep = AnnotateReport(str(input), str(output), str(fpath), judge.name, read=read, total=len(dialogues))
    done = read_records(output)
    todo, seen, shas = [], set(), {}
    for d in dialogues:
        shas[d.id] = sha = content_sha(d.turns, d.system)
        if d.id in done:
            was = (done[d.id].get("meta") or {}).get("content_sha")
            if was is not None and was != sha:
                raise ValueError(
                    f"{output}: {d.id!r} was annotated from another dialogue than {input} now holds under that "
                    f"id (content {was} -> {sha}); ids by position in a reordered or edited input? Annotate into "
                    f"a new output file")
            rep.already_done += 1
        elif d.id in seen:
            rep.duplicates += 1
        else:
            seen.add(d.id)
            todo.append(d)
    if limit is not None:
        todo = todo[:max(0, int(limit))]
    with JsonlWriter(output, append=True) as w, JsonlWriter(fpath, append=False) as fw, \
            progress_bar(len(todo), "annotate", unit="dlg", leave=False, show=progress) as bar:
        for _, res in iter_annotate(judge, todo, chunk_size=chunk_size, **kw):
            if isinstance(res, Dialogue):
                w.write(dataclasses.replace(res, meta={**res.meta, "content_sha": shas[res.id]}))
                rep.annotated += 1
            else:
                fw.write(res.to_json())
                rep.failures.append(res)
                rep.failed += 1
            bar.update(1)
        for e in read.errors:
            fw.write({"id": None, "reason": f"malformed input record: {e}", "tries": 0, "raw": None})
    stats = getattr(judge, "stats", None)
    if stats is not None and hasattr(stats, "as_dict"):
        rep.judge_stats = stats.as_dict()
    return rep
