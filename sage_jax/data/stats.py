"""Corpus statistics: counts per split and source, turn counts, latent label distributions and,
given a tokenizer, token lengths of the rendered chat and how many exceed a maximum length.

Token lengths come from a pluggable ``token_length`` function (a batch of dialogues -> lengths).
:func:`chat_template_lengths` builds one from a Hugging Face tokenizer: it renders
:func:`sage_jax.sac.to_messages` with the tokenizer's chat template
(``apply_chat_template(..., tokenize=True)``); swap in the training tokenization for exact counts.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sage_jax.data.jsonl import ReadReport, read_sac
from sage_jax.progress import progress as progress_bar
from sage_jax.sac import DEFAULT_SCHEMA, Dialogue, Schema, to_messages

__all__ = ["Summary", "TokenStats", "CorpusStats", "compute_stats", "format_stats", "stats_to_json",
           "chat_template_lengths", "load_tokenizer", "load_dialogues", "TokenLengthFn"]

TokenLengthFn = Callable[[Sequence[Dialogue]], list[int]]
NULL, UNANNOTATED = "null", "(unannotated)"


@dataclass
class Summary:
    """min / mean / median / 95th percentile / max of a list of numbers."""

    n: int = 0
    min: float = 0
    mean: float = 0
    median: float = 0
    p95: float = 0
    max: float = 0

    @classmethod
    def of(cls, xs: Sequence[float]) -> Summary:
        if not xs:
            return cls()
        s = sorted(xs)
        return cls(len(s), s[0], round(statistics.fmean(s), 2), statistics.median(s),
                   s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)], s[-1])

    def __str__(self) -> str:
        return f"n={self.n} min={self.min} mean={self.mean} median={self.median} p95={self.p95} max={self.max}"


@dataclass
class TokenStats:
    lengths: Summary
    max_len: int | None
    over_max_len: int  # dialogues longer than max_len (truncated in training)
    by_split_over: dict[str, int] = field(default_factory=dict)


@dataclass
class CorpusStats:
    dialogues: int
    splits: dict[str, int]
    sources: dict[str, int]
    turns: int
    user_turns: int
    assistant_turns: int
    unannotated_turns: int
    turns_per_dialogue: Summary
    turn_histogram: dict[int, int]
    labels: dict[str, dict[str, int]]  # field key -> value -> count ("null", "(unannotated)")
    tokens: TokenStats | None = None
    read: dict[str, Any] | None = None  # the read report's counts, when read from a path


def _split(d: Dialogue) -> str:
    s = d.meta.get("split")
    return s if isinstance(s, str) else "-"


def compute_stats(dialogues: Sequence[Dialogue], *, schema: Schema = DEFAULT_SCHEMA,
                  token_length: TokenLengthFn | None = None, max_len: int | None = None,
                  batch_size: int = 256, progress: bool | None = None) -> CorpusStats:
    """Statistics of a list of dialogues (token lengths only when ``token_length`` is given)."""
    splits, sources, hist = Counter(), Counter(), Counter()
    labels: dict[str, Counter] = {k: Counter() for k in (*schema.user_keys, *schema.assistant_keys)}
    user = assistant = unannotated = 0
    for d in dialogues:
        splits[_split(d)] += 1
        sources[str(d.meta.get("mix_source", d.meta.get("source", "-")))] += 1
        hist[len(d.turns)] += 1
        for t in d.turns:
            keys = schema.keys(t.role)
            if t.role == "user":
                user += 1
            else:
                assistant += 1
            lat = t.latent
            if lat is None:
                unannotated += 1
                for k in keys:
                    labels[k][UNANNOTATED] += 1
                continue
            labels[keys[0]][NULL if lat.motivation is None else lat.motivation] += 1
            labels[keys[1]][NULL if lat.emotion is None else lat.emotion] += 1
            labels[keys[2]].update(lat.topic or [NULL])
    lens = [len(d.turns) for d in dialogues]
    stats = CorpusStats(len(dialogues), dict(splits), dict(sources), sum(lens), user, assistant, unannotated,
                        Summary.of(lens), dict(sorted(hist.items())),
                        {k: dict(c.most_common()) for k, c in labels.items()})
    if token_length is not None:
        lengths: list[int] = []
        with progress_bar(len(dialogues), "tokenizing", unit="dlg", unit_scale=True, leave=False, show=progress) as bar:
            for i in range(0, len(dialogues), batch_size):
                chunk = dialogues[i:i + batch_size]
                lengths += token_length(chunk)
                bar.update(len(chunk))
        over = Counter(_split(d) for d, n in zip(dialogues, lengths) if max_len is not None and n > max_len)
        stats.tokens = TokenStats(Summary.of(lengths), max_len, sum(over.values()), dict(over))
    return stats


def load_tokenizer(path: str | os.PathLike, *, schema: Schema = DEFAULT_SCHEMA, special_tokens: bool = False):
    """A Hugging Face tokenizer from a local directory, with the latent tokens added when asked."""
    from transformers import AutoTokenizer  # imported here: stats without tokens need no transformers

    tok = AutoTokenizer.from_pretrained(str(path))
    if special_tokens:
        tok.add_tokens(list(schema.special_tokens()), special_tokens=True)
    return tok


def chat_template_lengths(tokenizer, *, schema: Schema = DEFAULT_SCHEMA, special_tokens: bool = False
                          ) -> TokenLengthFn:
    """Token count of each dialogue rendered by the tokenizer's chat template (no generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; token lengths need one")

    def lengths(batch: Sequence[Dialogue]) -> list[int]:
        convs = [to_messages(d, schema, special_tokens=special_tokens) for d in batch]
        out = tokenizer.apply_chat_template(convs, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [len(x) for x in ids]

    return lengths


def load_dialogues(path: str | os.PathLike, fmt: str = "auto", *, strict: bool = False,
                   progress: bool | None = None) -> tuple[list[Dialogue], ReadReport]:
    """Dialogues of a SAC JSONL file (``fmt="sac"``) or a corpus file/folder (converted in memory).

    ``auto``: :func:`~sage_jax.data.readers.detect_format` (folder: file names; file: name or first
    record); an unrecognised file is read as SAC JSONL.
    """
    from sage_jax.data.readers import detect_format, read_corpus

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if fmt == "auto":
        fmt = detect_format(path) or ("sac" if path.is_file() else "")
        if not fmt:
            raise ValueError(f"{path}: cannot tell which corpus this folder holds; pass --format")
    if fmt == "sac":
        return read_sac(path, strict=strict, progress=progress)
    return read_corpus(fmt, path, strict=strict, progress=progress)


def stats_to_json(stats: CorpusStats, top: int | None = 100) -> dict:
    """A JSON-able dict; each label distribution keeps its ``top`` values plus a ``distinct`` count."""
    out = asdict(stats)
    out["turn_histogram"] = {str(k): v for k, v in stats.turn_histogram.items()}
    out["labels"] = {k: {"distinct": len(c), "top": dict(list(c.items())[:top] if top else c.items())}
                     for k, c in stats.labels.items()}
    return out


def _table(counter: dict[str, int], top: int, total: int) -> Iterable[str]:
    for k, v in list(counter.items())[:top]:
        yield f"    {k:<32} {v:>8}  {100 * v / max(total, 1):5.1f}%"
    if len(counter) > top:
        yield f"    ... {len(counter) - top} more values"


def format_stats(stats: CorpusStats, top: int = 10) -> str:
    """A human-readable report."""
    lines = [f"dialogues: {stats.dialogues}"]
    if stats.read:
        lines.append(f"read: {stats.read['records']} records, {stats.read['converted']} converted, "
                     f"{stats.read['skipped']} skipped")
    lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in stats.splits.items()))
    lines.append("sources: " + ", ".join(f"{k} {v}" for k, v in stats.sources.items()))
    lines.append(f"turns: {stats.turns} ({stats.user_turns} user, {stats.assistant_turns} assistant, "
                 f"{stats.unannotated_turns} unannotated)")
    lines.append(f"turns per dialogue: {stats.turns_per_dialogue}")
    for key, counter in stats.labels.items():
        total = sum(counter.values())
        lines.append(f"  {key}: {len(counter)} distinct")
        lines += _table(counter, top, total)
    if stats.tokens is not None:
        t = stats.tokens
        lines.append(f"tokens per dialogue: {t.lengths}")
        if t.max_len is not None:
            by = ", ".join(f"{k} {v}" for k, v in t.by_split_over.items())
            lines.append(f"longer than max_len {t.max_len}: {t.over_max_len} dialogues" + (f" ({by})" if by else ""))
    return "\n".join(lines)
