"""Tokenize a corpus once into ArrayRecord files that SFT/DPO stream through Grain (`sage-jax data build`).

    build_dataset(BuildSpec(kind="sft", inputs=("train.jsonl",), output="data/built", seq_len=2048), tokenizer)
    ds = open_built("data/built")                       # random access, nothing loaded but two small index files
    check_built(ds, expected_settings("sft", tokenizer, template, seq_len, latent_tokens))

A built directory holds, per kind:

    dataset.json                 format, kind, settings (tokenizer fingerprint, template, seq_len, latent
                                 tokens), sources, counts; written last (its presence = complete)
    part-00000.array_record ...  one record per kept dialogue (sft) or pair (dpo), input order
    dialogue_index.i64           per record: its index among the valid input dialogues/pairs (the JSONL
                                 path's eval split is over that index, so a built dataset splits identically)
    lengths.i32                  per record: tokens (sft) or the longer branch (dpo), to plan packing
                                 without reading records
    build_state.json             progress of an unfinished build (removed when done)

Records are exactly what the JSONL path tokenizes (`encode.encode_dialogues` for SFT: chat template,
assistant-only loss mask, latent mask, cut to seq_len + 1 at a turn boundary; `pairs.last_turn_only`
masks for DPO, pairs longer than seq_len + 1 dropped). Bytes, little-endian:
sft ``<q index><I n>`` + tokens int32[n] + loss_mask u8[n] + latent_mask u8[n];
dpo ``<q index><I nc><I nr>`` + chosen tokens int32[nc] + mask u8[nc] + rejected tokens int32[nr] + mask u8[nr].

The build streams (constant memory) and is resumable: records go to shards of ``records_per_shard``;
after each shard the state (input position, counts) is saved, and a rerun with the same settings
continues after the last finished shard. Malformed input lines are skipped and reported
(``strict``: the first raises), naming file, line and field, as the JSONL path does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from grain.sources import ArrayRecordDataSource

from sage_jax.data.encode import latent_chars
from sage_jax.data.jsonl import ReadReport, RecordError, iter_records
from sage_jax.data.pairs import last_turn_only, pair_from_json
from sage_jax.data.templates import resolve_template
from sage_jax.data.tokenize import encode_dialogue
from sage_jax.progress import progress as progress_bar
from sage_jax.sac import DEFAULT_SCHEMA, dialogue_from_json, to_messages

__all__ = ["FORMAT", "META_FILE", "BuildSpec", "BuiltDataset", "BuiltMismatch", "build_dataset", "open_built",
           "is_built", "expected_settings", "check_built", "tokenizer_fingerprint", "load_tokenizer",
           "split_built", "packed_row_count", "pair_row"]

FORMAT = "sage_jax.built/1"
META_FILE, STATE_FILE = "dataset.json", "build_state.json"
INDEX_FILE, LENGTHS_FILE = "dialogue_index.i64", "lengths.i32"
Kind = Literal["sft", "dpo"]


class BuiltMismatch(ValueError):
    """A built dataset whose settings differ from the run's (tokenizer, template, seq_len, ...)."""


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What to build: ``kind`` sft (SAC JSONL) or dpo (preference-pair JSONL), with the run's settings."""

    kind: Kind
    inputs: tuple[str, ...]
    output: str
    seq_len: int = 2048
    template: str | None = None  # as the run's `template`
    latent_tokens: bool = False  # as the run's `model.latent_tokens`
    strict: bool = False
    records_per_shard: int = 50_000
    overwrite: bool = False
    progress: bool | None = None


def load_tokenizer(path: str | os.PathLike, latent_tokens: bool):
    """The tokenizer a run uses (``model.loader.load_base``): the HF directory's, with the latent
    special tokens added when ``latent_tokens``."""
    from transformers import AutoTokenizer  # transformers is heavy: only when building

    if not Path(path).is_dir():  # never a hub download: the run's model is a local directory
        raise FileNotFoundError(f"tokenizer {path!r}: not a directory (give the run's model directory; for "
                                "the built-in model, the one `sage-jax models fetch smollm2` prints)")
    tok = AutoTokenizer.from_pretrained(str(path))
    if latent_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(DEFAULT_SCHEMA.special_tokens())})
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, added tokens, normalizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and added tokens
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def expected_settings(kind: str, tokenizer, template: str | None, seq_len: int, latent_tokens: bool) -> dict:
    """Everything the records depend on; a run refuses a dataset whose settings differ."""
    jinja, eot = resolve_template(tokenizer, template)
    return {"kind": kind, "tokenizer": tokenizer_fingerprint(tokenizer), "template": template,
            "template_sha256": hashlib.sha256((jinja + "\0" + eot).encode("utf-8")).hexdigest(),
            "seq_len": int(seq_len), "latent_tokens": bool(latent_tokens)}


# ---------------------------------------------------------------------------------------- records

def _sft_bytes(index: int, tokens, loss_mask, latent_mask) -> bytes:
    n = len(tokens)
    latent = np.zeros(n, np.uint8) if latent_mask is None else np.asarray(latent_mask, np.uint8)
    return b"".join((struct.pack("<qI", index, n), np.asarray(tokens, "<i4").tobytes(),
                     np.asarray(loss_mask, np.uint8).tobytes(), latent.tobytes()))


def _sft_record(data: bytes) -> dict:
    index, n = struct.unpack_from("<qI", data)
    o = 12
    tokens = np.frombuffer(data, "<i4", n, o).astype(np.int32)
    o += 4 * n
    mask = np.frombuffer(data, np.uint8, n, o).astype(bool)
    latent = np.frombuffer(data, np.uint8, n, o + n).astype(bool)
    return {"tokens": tokens, "loss_mask": mask, "latent_mask": latent, "index": index}


def _dpo_bytes(index: int, chosen: tuple, rejected: tuple) -> bytes:
    (ct, cm), (rt, rm) = chosen, rejected
    return b"".join((struct.pack("<qII", index, len(ct), len(rt)), np.asarray(ct, "<i4").tobytes(),
                     np.asarray(cm, np.uint8).tobytes(), np.asarray(rt, "<i4").tobytes(),
                     np.asarray(rm, np.uint8).tobytes()))


def _dpo_record(data: bytes) -> dict:
    index, nc, nr = struct.unpack_from("<qII", data)
    o, out = 16, {"index": index}
    for side, n in (("chosen", nc), ("rejected", nr)):
        tokens = np.frombuffer(data, "<i4", n, o).astype(np.int32)
        mask = np.frombuffer(data, np.uint8, n, o + 4 * n).astype(bool)
        out[side] = {"tokens": tokens, "loss_mask": mask}
        o += 5 * n
    return out


def pair_row(tokens: np.ndarray, mask: np.ndarray, seq_len: int) -> dict:
    """One DPO branch as a right-padded [seq_len] row (``mask``: its final assistant turn only)."""
    n = len(tokens) - 1
    row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    row["loss_mask"] = np.zeros(seq_len, bool)
    row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
    row["loss_mask"][:n] = mask[1:]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


# ------------------------------------------------------------------------------------ building

def _sources(inputs: Sequence[str]) -> list[dict]:
    out = []
    for p in inputs:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data build: no such input file {p}")
        st = path.stat()
        out.append({"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _items(spec: BuildSpec, report: ReadReport, path: str) -> Iterator[tuple[int, Any]]:
    """(line, dialogue or pair) of one input file; malformed records go to ``report``."""
    parse = dialogue_from_json if spec.kind == "sft" else pair_from_json
    yield from iter_records(path, report, lambda obj, _line: parse(obj), progress=spec.progress)


def _encode_item(spec: BuildSpec, tokenizer, item) -> tuple[bytes | None, int, str]:
    """(record bytes or None when dropped, length, outcome) for one dialogue/pair, as the run encodes it."""
    special = spec.latent_tokens
    if spec.kind == "sft":
        msgs = to_messages(item, DEFAULT_SCHEMA, special_tokens=special)
        enc = encode_dialogue(msgs, tokenizer, template=spec.template, max_len=spec.seq_len + 1,
                              latent_chars=latent_chars)
        if enc is None:
            return None, 0, "too_long" if any(m["role"] == "assistant" for m in msgs) else "no_assistant"
        outcome = "truncated" if enc.truncated_turns else "kept"
        return _sft_bytes(-1, enc.tokens, enc.loss_mask, enc.latent_mask), len(enc.tokens), outcome
    branches = []
    for d in (item.chosen, item.rejected):
        enc = encode_dialogue(to_messages(d, DEFAULT_SCHEMA, special_tokens=special), tokenizer,
                              template=spec.template)
        if enc is None or len(enc.tokens) > spec.seq_len + 1:
            return None, 0, "too_long"
        branches.append((enc.tokens, last_turn_only(enc.loss_mask)))
    return _dpo_bytes(-1, *branches), max(len(b[0]) for b in branches), "kept"


def _with_index(record: bytes, index: int) -> bytes:
    return struct.pack("<q", index) + record[8:]


def _atomic_json(path: Path, obj: Mapping) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.array_record"


def build_dataset(spec: BuildSpec, tokenizer) -> dict:
    """Build (or resume, or find up to date) the dataset of ``spec``; returns its metadata."""
    if spec.kind not in ("sft", "dpo"):
        raise ValueError(f"data build: kind must be 'sft' or 'dpo', got {spec.kind!r}")
    if not spec.inputs:
        raise ValueError("data build: no input files")
    if spec.records_per_shard < 1:
        raise ValueError(f"data build: records_per_shard must be >= 1, got {spec.records_per_shard}")
    out = Path(spec.output)
    settings = expected_settings(spec.kind, tokenizer, spec.template, spec.seq_len, spec.latent_tokens)
    sources = _sources(spec.inputs)
    ident = {"settings": settings, "sources": sources, "records_per_shard": spec.records_per_shard}
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"data build: output {out} exists and is not a directory")
    meta_path, state_path = out / META_FILE, out / STATE_FILE
    if meta_path.exists() and not spec.overwrite:
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in ident} == ident:
            print(f"data build: {out} is up to date ({meta['records']} records)", file=sys.stderr)
            return meta
        raise FileExistsError(f"data build: {out} holds a dataset built from other inputs or settings; "
                              "give overwrite=true (--overwrite) to rebuild it")
    state = None
    if state_path.exists() and not spec.overwrite:
        old = json.loads(state_path.read_text())
        if {k: old.get(k) for k in ident} == ident:
            state = old
    if state is None:  # a fresh build: clear what an older one left
        out.mkdir(parents=True, exist_ok=True)
        for p in out.iterdir():
            if p.name in (META_FILE, STATE_FILE, INDEX_FILE, LENGTHS_FILE) or p.name.endswith(".array_record"):
                p.unlink()
        state = {**ident, "shards": [], "records": 0, "items": 0, "position": [0, 0],
                 "counts": {"kept": 0, "truncated": 0, "too_long": 0, "no_assistant": 0, "skipped": 0,
                            "tokens": 0, "supervised_tokens": 0}}
    else:
        meta_path.unlink(missing_ok=True)
        for p in out.glob("*.array_record"):  # a shard being written when interrupted
            if p.name not in state["shards"]:
                p.unlink()
        print(f"data build: resuming {out} after {state['records']} records ({len(state['shards'])} shards)",
              file=sys.stderr)
    for name, width in ((INDEX_FILE, 8), (LENGTHS_FILE, 4)):  # drop entries past the last finished shard
        with open(out / name, "ab") as f:
            f.truncate(state["records"] * width)

    counts = dict(state["counts"])
    records, items = state["records"], state["items"]
    done_file, done_line = state["position"]
    # Per file, the reader's bar shows bytes with rate and ETA; this one counts files.
    bar = progress_bar(len(sources), f"build {spec.kind}", unit="file", initial=done_file, show=spec.progress)
    writer, shard_records, shards = None, 0, list(state["shards"])
    idx_f, len_f = open(out / INDEX_FILE, "ab"), open(out / LENGTHS_FILE, "ab")

    def finish_shard(position):
        nonlocal writer, shard_records
        writer.close()
        idx_f.flush(), len_f.flush()
        shards.append(_shard_name(len(shards)))
        writer, shard_records = None, 0
        _atomic_json(state_path, {**ident, "shards": shards, "records": records, "items": items,
                                  "position": position, "counts": counts})

    try:
        for fi, src in enumerate(sources):
            if fi < done_file:
                continue
            report = ReadReport(src["path"], strict=spec.strict)
            for line_no, item in _items(spec, report, src["path"]):
                if fi == done_file and line_no <= done_line:
                    continue  # before the resume point: counted in the saved state already
                try:
                    rec, length, outcome = _encode_item(spec, tokenizer, item)
                except Exception as e:  # tokenization failure: name the input record
                    raise RecordError(src["path"], line_no, "turns" if spec.kind == "sft" else "",
                                      f"cannot tokenize: {e}") from e
                counts[outcome] += 1  # kept / truncated (also kept) / too_long / no_assistant
                counts["kept"] += outcome == "truncated"
                if rec is not None:
                    if writer is None:
                        writer = ArrayRecordWriter(str(out / _shard_name(len(shards))), "group_size:1")
                    writer.write(_with_index(rec, items))
                    idx_f.write(struct.pack("<q", items))
                    len_f.write(struct.pack("<i", length))
                    records += 1
                    shard_records += 1
                    if spec.kind == "sft":
                        r = _sft_record(rec)
                        counts["tokens"] += len(r["tokens"])
                        counts["supervised_tokens"] += int(r["loss_mask"].sum())
                items += 1
                if shard_records >= spec.records_per_shard:
                    finish_shard([fi, line_no])
            counts["skipped"] += report.skipped
            if report.skipped:
                print(report.summary(3), file=sys.stderr)
            bar.update(1, postfix={"records": records})
            if writer is not None:
                finish_shard([fi + 1, 0])
            else:
                _atomic_json(state_path, {**ident, "shards": shards, "records": records, "items": items,
                                          "position": [fi + 1, 0], "counts": counts})
    finally:
        bar.close()
        idx_f.close(), len_f.close()
        if writer is not None:
            writer.close()
    if not records:
        raise ValueError(f"data build: no record left from {list(spec.inputs)} ({items} valid inputs, "
                         f"{counts['skipped']} skipped)")
    meta = {"format": FORMAT, **ident, "shards": shards, "records": records, "items": items, "counts": counts}
    _atomic_json(meta_path, meta)
    state_path.unlink(missing_ok=True)
    print(f"data build: {records} records ({spec.kind}) from {items} valid inputs into {out}: {counts}",
          file=sys.stderr)
    return meta


# ------------------------------------------------------------------------------------- reading

def is_built(path: str | os.PathLike) -> bool:
    """True for a directory written by :func:`build_dataset` (finished)."""
    return (Path(path) / META_FILE).is_file()


class BuiltDataset:
    """A built dataset as a random-access source of decoded records (Grain reads it by index).

    ``positions`` (optional) selects records (a view: e.g. the training split). Only the two small
    per-record index files are memory-mapped; records are read from the ArrayRecord shards on access.
    """

    def __init__(self, path: str | os.PathLike, positions: np.ndarray | None = None, *, meta: dict | None = None):
        self.path = Path(path)
        if meta is None:
            meta_path = self.path / META_FILE
            if not meta_path.is_file():
                hint = " (an unfinished build: run `sage-jax data build` again)" if (
                    self.path / STATE_FILE).exists() else ""
                raise FileNotFoundError(f"{self.path}: not a built dataset, no {META_FILE}{hint}")
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"{self.path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.meta = meta
        self.kind = meta["settings"]["kind"]
        n = meta["records"]
        self.dialogue_index = np.memmap(self.path / INDEX_FILE, dtype="<i8", mode="r", shape=(n,))
        self.lengths_all = np.memmap(self.path / LENGTHS_FILE, dtype="<i4", mode="r", shape=(n,))
        self.positions = positions
        self._source = None

    def _src(self) -> ArrayRecordDataSource:
        if self._source is None:  # opened lazily: a pickled copy (Grain workers) opens its own
            self._source = ArrayRecordDataSource([str(self.path / s) for s in self.meta["shards"]])
        return self._source

    def __getstate__(self):
        return {"path": self.path, "positions": self.positions, "meta": self.meta}

    def __setstate__(self, st):
        self.__init__(st["path"], st["positions"], meta=st["meta"])

    def __len__(self) -> int:
        return len(self.positions) if self.positions is not None else int(self.meta["records"])

    def _pos(self, i: int) -> int:
        return int(self.positions[i]) if self.positions is not None else int(i)

    def __getitem__(self, i) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)}")
        data = self._src()[self._pos(i)]
        return _sft_record(data) if self.kind == "sft" else _dpo_record(data)

    def lengths(self) -> np.ndarray:
        """Tokens of every selected record (sft), without reading records."""
        return np.asarray(self.lengths_all if self.positions is None else self.lengths_all[self.positions])

    def subset(self, positions: np.ndarray) -> BuiltDataset:
        base = np.arange(len(self)) if self.positions is None else self.positions
        return BuiltDataset(self.path, np.asarray(base)[positions], meta=self.meta)


def open_built(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> BuiltDataset:
    """The built dataset at ``paths`` (one directory; a list must hold exactly one)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if len(paths) != 1:
        raise ValueError(f"give exactly one built dataset directory, got {len(paths)}: {paths} "
                         "(build several inputs into one with `sage-jax data build IN1 IN2 ... -o DIR`)")
    return BuiltDataset(paths[0])


def check_built(ds: BuiltDataset, expected: Mapping[str, Any]) -> None:
    """Refuse a dataset built with other settings than the run's, naming each difference."""
    got = ds.meta["settings"]
    diff = [k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
    if diff:
        parts = "; ".join(f"{k}: built with {got.get(k)!r}, the run has {expected.get(k)!r}" for k in diff)
        raise BuiltMismatch(f"{ds.path}: built with other settings than this run ({parts}); rebuild it with "
                            "`sage-jax data build` and the run's tokenizer, template, seq_len and latent_tokens")


def split_built(ds: BuiltDataset, fraction: float, seed: int) -> tuple[BuiltDataset, list[dict]]:
    """(train view, held-out records): the split `encode.split_eval` makes of the input items
    (same seed, same held-out items), applied to the kept records. Costs O(items) integers."""
    idx = list(range(int(ds.meta["items"])))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(idx) * fraction))) if fraction > 0 and len(idx) > 1 else 0
    held = np.zeros(len(idx), bool)
    held[idx[:n_eval]] = True
    del idx
    index = ds.dialogue_index if ds.positions is None else ds.dialogue_index[ds.positions]
    is_held = held[np.asarray(index)]
    train = ds.subset(np.flatnonzero(~is_held))
    evals = ds.subset(np.flatnonzero(is_held))
    return train, [evals[i] for i in range(len(evals))]


def packed_row_count(examples, seq_len: int, bins: int) -> int:
    """Rows that the pipeline's first-fit packing (``packing.pack_dataset``, Grain's
    ``FirstFitPackIterDataset``) makes of ``examples`` in order, computed from their lengths alone.

    The same algorithm, without building rows: each shifted example (``T - 1`` tokens; ``T < 2``
    is dropped) goes into the first of ``bins`` open rows with room; when none has room the open
    rows are emitted (those holding something) and a new group starts with it. A
    :class:`BuiltDataset` is counted from its length index without reading records.
    """
    if isinstance(examples, BuiltDataset):
        lengths = examples.lengths()
    else:
        lengths = [len(e["tokens"] if isinstance(e, Mapping) else e.tokens) for e in examples]
    free = np.full(bins, seq_len, np.int64)
    rows, used = 0, 0
    for t in lengths:
        n = int(t) - 1
        if n < 1:
            continue
        if n > seq_len:
            raise ValueError(f"an example of {n + 1} tokens does not fit rows of seq_len + 1 = {seq_len + 1}")
        fit = np.flatnonzero(free[:used] >= n)
        if fit.size:
            free[fit[0]] -= n
        elif used < bins:
            free[used] -= n
            used += 1
        else:
            rows += used
            free[:] = seq_len
            free[0] -= n
            used = 1
    return rows + used
