"""Verdict parsing and the judge helpers built on it: best of K, pairwise comparison.

A :class:`Verdict` is one of three things, never a guess:

* ``choice`` with a 0-based ``index`` (``Response 2 is better`` -> 1; ``Dialog B is better`` -> 1),
* ``none`` (``No good one``; best-of-K only),
* ``failure`` with a ``reason`` (no verdict, two different verdicts, an out-of-range number, a
  failed call).

Parsing is tolerant of case, whitespace, markdown emphasis, quotes, punctuation and extra words
around the verdict ("I think **Response 2 is better** because ..."), and of a few fixed intensifiers
("is much better", "is the best"), but it never guesses: a text claiming two different winners,
or a negated one ("Response 2 is not better"), or only naming a response without the verdict
words, is a failure (except a bare ``Response 2`` / ``Dialog B`` that is the whole answer).

Helpers (SAGE.md §4, §6): :func:`select_best` resamples unparseable / out-of-range verdicts up
to ``tries`` times, each try with a new sampling seed (``seed + try``), and counts failures;
:func:`compare_dialogues` does the same for ``Dialog A`` vs ``Dialog B``; :func:`compare_with_swap`
judges both orders and keeps a win only when they agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sage_jax.judge.base import Judge
from sage_jax.judge.prompts import Context, best_of_k_prompt, pairwise_prompt

__all__ = ["Verdict", "parse_best_of_k", "parse_pairwise", "Selection", "select_best", "rank_top", "selection_summary",
           "PairResult", "compare_dialogues", "compare_with_swap"]


@dataclass(frozen=True)
class Verdict:
    """A parsed verdict: ``kind`` is ``"choice"`` (``index`` 0-based), ``"none"`` or ``"failure"`` (``reason``)."""

    kind: Literal["choice", "none", "failure"]
    index: int | None = None
    reason: str | None = None
    text: str | None = None  # the raw judge output

    @classmethod
    def choice(cls, index: int, text: str | None = None) -> Verdict:
        return cls("choice", index=index, text=text)

    @classmethod
    def none(cls, text: str | None = None) -> Verdict:
        return cls("none", text=text)

    @classmethod
    def failure(cls, reason: str, text: str | None = None) -> Verdict:
        return cls("failure", reason=reason, text=text)

    @property
    def ok(self) -> bool:
        """True for a usable verdict (a choice or "no good one")."""
        return self.kind != "failure"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "reason": self.reason, "text": self.text}


# ---------------------------------------------------------------- parsing
_WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10, "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}
_NUM = r"(\d+|" + "|".join(_WORD_NUMBERS) + r")"
_INTENS = r"(?:(?:much|slightly|clearly|far|definitely|somewhat|way|overall|the|a\s+bit|a\s+lot)\s+)*"
_BETTER = r"(?:is|was|seems|looks)\s+" + _INTENS + r"(?:better|best)\b"
_RESP_VERDICT = re.compile(r"\bresponse\s*(?:#|no\.?|number)?\s*" + _NUM + r"\s*[:)\].]?\s*" + _BETTER)
_RESP_BARE = re.compile(r"response\s*(?:#|no\.?|number)?\s*" + _NUM + r"\s*\Z")
_NO_GOOD = re.compile(r"\bno\s+good\s+ones?\b")
_DIALOG_VERDICT = re.compile(r"\bdialog(?:ue)?\s*([a-z0-9]+)\s*[:)\].]?\s*" + _BETTER)
_DIALOG_BARE = re.compile(r"dialog(?:ue)?\s*([a-z])\s*\Z")


def _normalise(text: str) -> str:
    t = text.lower()
    t = re.sub(r"[*_`\"'“”‘’]", "", t)  # markdown emphasis and quotes
    t = re.sub(r"\s+", " ", t).strip()
    return t.strip(" .!:;,-")


def _as_number(tok: str) -> int:
    return int(tok) if tok.isdigit() else _WORD_NUMBERS[tok]


def parse_best_of_k(text: str | None, k: int) -> Verdict:
    """Parse ``Response X is better`` / ``No good one`` for K candidates (X is 1-based in the text)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if text is None:
        return Verdict.failure("no text", text)
    t = _normalise(text)
    if not t:
        return Verdict.failure("empty answer", text)
    nums = {_as_number(m.group(1)) for m in _RESP_VERDICT.finditer(t)}
    bare = _RESP_BARE.fullmatch(t)
    if not nums and bare:
        nums = {_as_number(bare.group(1))}
    none = bool(_NO_GOOD.search(t))
    if len(nums) > 1:
        return Verdict.failure(f"ambiguous: several responses named better ({sorted(nums)})", text)
    if nums and none:
        return Verdict.failure("ambiguous: a response named better and 'no good one'", text)
    if none:
        return Verdict.none(text)
    if not nums:
        return Verdict.failure("no verdict found (expected 'Response X is better' or 'No good one')", text)
    x = nums.pop()
    if not 1 <= x <= k:
        return Verdict.failure(f"out of range: response {x} of {k}", text)
    return Verdict.choice(x - 1, text)


def parse_pairwise(text: str | None) -> Verdict:
    """Parse ``Dialog A is better`` / ``Dialog B is better`` (index 0 = A, 1 = B)."""
    if text is None:
        return Verdict.failure("no text", text)
    t = _normalise(text)
    if not t:
        return Verdict.failure("empty answer", text)
    names = {m.group(1) for m in _DIALOG_VERDICT.finditer(t)}
    bare = _DIALOG_BARE.fullmatch(t)
    if not names and bare:
        names = {bare.group(1)}
    if len(names) > 1:
        return Verdict.failure(f"ambiguous: several dialogs named better ({sorted(names)})", text)
    if not names:
        return Verdict.failure("no verdict found (expected 'Dialog A is better' or 'Dialog B is better')", text)
    name = names.pop()
    if name not in ("a", "b"):
        return Verdict.failure(f"out of range: dialog {name.upper()} (expected A or B)", text)
    return Verdict.choice(0 if name == "a" else 1, text)


# ---------------------------------------------------------------- resampling loop
def _judge_with_tries(judge: Judge, prompts: Sequence[str], parsers: Sequence[Callable[[str | None], Verdict]], *,
                      tries: int, temperature: float,
                      max_tokens: int, seed: int) -> list[tuple[Verdict, int, int, list[str | None], list[str]]]:
    """Ask, parse, resample the failures with seed + t; per prompt (verdict, tries, failures, raw texts, errors)."""
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    n = len(prompts)
    final: list[Verdict | None] = [None] * n
    used, failed = [0] * n, [0] * n
    raws: list[list[str | None]] = [[] for _ in range(n)]
    errors: list[list[str]] = [[] for _ in range(n)]
    pending = list(range(n))
    for t in range(tries):
        if not pending:
            break
        outs = judge.complete([prompts[i] for i in pending], temperature=temperature, max_tokens=max_tokens,
                              seed=seed + t)
        if len(outs) != len(pending):
            raise RuntimeError(f"judge {judge.name} returned {len(outs)} completions for {len(pending)} prompts")
        still = []
        for i, c in zip(pending, outs):
            used[i] += 1
            raws[i].append(c.text)
            v = Verdict.failure(f"call failed: {c.error}", None) if c.error is not None else parsers[i](c.text)
            if v.ok:
                final[i] = v
                continue
            failed[i] += 1
            errors[i].append(v.reason or "")
            final[i] = v
            still.append(i)
        pending = still
    return [(final[i], used[i], failed[i], raws[i], errors[i]) for i in range(n)]  # type: ignore[misc]


@dataclass
class Selection:
    """The outcome of one best-of-K selection.

    ``index``: the chosen candidate (0-based), or None when the judge said "No good one"
    (``verdict.kind == "none"``) or every try failed (``verdict.kind == "failure"``).
    ``tries``: judge calls made; ``failures``: how many of them gave no usable verdict;
    ``raw``/``errors``: every try's text and every failure's reason; ``judge``: the judge's name
    (e.g. ``rules:v1``: results say which judge produced them).
    """

    index: int | None
    verdict: Verdict
    num_candidates: int
    tries: int
    failures: int
    judge: str
    raw: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "verdict": self.verdict.to_json(), "num_candidates": self.num_candidates,
                "tries": self.tries, "failures": self.failures, "judge": self.judge, "raw": self.raw,
                "errors": self.errors}


def select_best(judge: Judge, contexts: Sequence[Context], candidates_per_context: Sequence[Sequence[str]], *,
                tries: int = 5, humour: bool = False, latents: bool = False, temperature: float = 0.8,
                max_tokens: int = 64, seed: int = 0) -> list[Selection]:
    """Pick the best of K candidate replies for each context (SAGE.md §4); one :class:`Selection` each.

    All contexts are judged in one batch per try; unparseable or out-of-range verdicts and failed
    calls are resampled (try t uses sampling seed ``seed + t``) up to ``tries`` times, then recorded
    as a failure. Candidates and context may contain latents: they are stripped before judging
    unless ``latents`` (the reference selector sees them).
    """
    if len(contexts) != len(candidates_per_context):
        raise ValueError(f"{len(contexts)} contexts but {len(candidates_per_context)} candidate lists")
    prompts = [best_of_k_prompt(c, cands, humour=humour, latents=latents)
               for c, cands in zip(contexts, candidates_per_context)]
    ks = [len(c) for c in candidates_per_context]
    parsers = [lambda text, k=k: parse_best_of_k(text, k) for k in ks]
    outcome = _judge_with_tries(judge, prompts, parsers, tries=tries, temperature=temperature,
                                max_tokens=max_tokens, seed=seed)
    return [Selection(v.index if v.kind == "choice" else None, v, k, used, failed, judge.name, raw, errs)
            for k, (v, used, failed, raw, errs) in zip(ks, outcome)]


def rank_top(judge: Judge, contexts: Sequence[Context], candidates_per_context: Sequence[Sequence[Any]], top: int, *,
             tries: int = 5, humour: bool = False, latents: bool = False,
             seed: int = 0) -> list[tuple[list[int], list[Selection]]]:
    """The ``top`` best candidates of each context, best first, for a beam search: round r asks
    the best-of-K question again over the candidates not yet picked (all contexts batched), so any
    best-of-K judge ranks. Per context: (picked indices, the :class:`Selection` of every round,
    its ``index`` relative to that round's remaining candidates). A round without a verdict ends
    the ranking: after round 1 that leaves nothing picked (the judge found no candidate acceptable,
    or could not say: the caller resamples), after a later one fewer beams survive."""
    picked: list[list[int]] = [[] for _ in contexts]
    rounds: list[list[Selection]] = [[] for _ in contexts]
    open_ = [i for i, c in enumerate(candidates_per_context) if len(c) > 0]
    for r in range(top):
        rest = {i: [j for j in range(len(candidates_per_context[i])) if j not in picked[i]] for i in open_}
        open_ = [i for i in open_ if rest[i]]
        if not open_:
            break
        sels = select_best(judge, [contexts[i] for i in open_],
                           [[candidates_per_context[i][j] for j in rest[i]] for i in open_],
                           tries=tries, humour=humour, latents=latents, seed=seed + 7919 * r)
        still = []
        for i, sel in zip(open_, sels):
            rounds[i].append(sel)
            if sel.index is not None:
                picked[i].append(rest[i][sel.index])
                still.append(i)
        open_ = still
    return list(zip(picked, rounds))


def selection_summary(selections: Sequence[Selection]) -> dict[str, int]:
    """Counts over selections: items, chosen, none (no good one), failed, judge calls, failed calls."""
    return {"items": len(selections), "chosen": sum(s.verdict.kind == "choice" for s in selections),
            "none": sum(s.verdict.kind == "none" for s in selections),
            "failed": sum(s.verdict.kind == "failure" for s in selections),
            "calls": sum(s.tries for s in selections), "failed_calls": sum(s.failures for s in selections)}


# ---------------------------------------------------------------- pairwise
def compare_dialogues(judge: Judge, pairs: Sequence[tuple[Context, Context]], *, tries: int = 5,
                      temperature: float = 0.8, max_tokens: int = 64, seed: int = 0) -> list[Verdict]:
    """Judge each ``(dialog A, dialog B)`` in that order (SAGE.md §6); a :class:`Verdict` each (index 0 = A).

    Unparseable verdicts are resampled up to ``tries`` times (seed + t); latents are stripped.
    """
    prompts = [pairwise_prompt(a, b) for a, b in pairs]
    res = _judge_with_tries(judge, prompts, [parse_pairwise] * len(prompts), tries=tries, temperature=temperature,
                            max_tokens=max_tokens, seed=seed)
    return [v for v, *_ in res]


@dataclass(frozen=True)
class PairResult:
    """Both orders of one pair: ``winner`` is ``"a"``/``"b"`` when they agree, else ``"no consensus"``."""

    winner: Literal["a", "b", "no consensus"]
    ab: Verdict  # A shown first
    ba: Verdict  # B shown first (its index 0 means B)


def compare_with_swap(judge: Judge, pairs: Sequence[tuple[Context, Context]], **kw) -> list[PairResult]:
    """Judge every pair as (A, B) and (B, A); a win counts only when both orders agree (SAGE.md §6)."""
    pairs = list(pairs)
    both = compare_dialogues(judge, [*pairs, *[(b, a) for a, b in pairs]], **kw)
    out = []
    for ab, ba in zip(both[:len(pairs)], both[len(pairs):]):
        win_ab = {0: "a", 1: "b"}.get(ab.index) if ab.kind == "choice" else None
        win_ba = {0: "b", 1: "a"}.get(ba.index) if ba.kind == "choice" else None
        out.append(PairResult(win_ab if win_ab is not None and win_ab == win_ba else "no consensus", ab, ba))
    return out
