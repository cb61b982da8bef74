"""MT-Bench (Zheng et al. 2023): two-turn answers, pairwise and single-answer grading through a judge.

    from sage_jax.eval import mt_bench
    qs = mt_bench.load_questions()                      # 80 questions, 8 categories, 2 turns each
    jp = mt_bench.load_judge_prompts()                  # pair-v2, single-v1, ... (judge_prompts.jsonl)
    mt_bench.generate_answers("smollm2", qs, "answers.jsonl")                # per-item JSONL, resumable
    mt_bench.judge_single(judge, qs, answers, jp, "single.jsonl")           # [[rating]] per turn
    mt_bench.judge_pairwise(judge, qs, answers, baseline, jp, "pair.jsonl")  # both orders, consensus

Follows FastChat's ``llm_judge`` protocol: turn 1 is judged with ``pair-v2`` / ``single-v1``, turn
2 with the ``-multi-turn`` prompts (whole conversation shown, focus on the second answer);
categories math, reasoning and coding use the ``-math-`` prompts with the reference answers of
``question.jsonl`` (FastChat reads GPT-4 reference answers from a separate file that is not in our
data; question 123, a coding question without a reference, falls back to the general prompts). The judge prompt's ``system_prompt`` goes as a system message (see
:mod:`sage_jax.eval.generation` for single-string backends). Judge temperature 0, 2048 tokens.
Answer temperatures per category are FastChat's (writing/roleplay 0.7, stem/humanities 0.1, the
rest greedy).

Verdicts: pairwise ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (tie); a text with none of them, or with two
different ones, is a failure (FastChat silently takes the first of A, B, C: we count it instead).
Each pair is judged in both orders; a win counts only when both orders agree, a disagreement is a
tie; a pair where either order failed (after ``tries`` re-asks) is reported as an error and left
out of the tally (as FastChat does). Single: ``[[x]]`` (else ``[x]``), a number in [1, 10]; anything
else is a failure, left out of the mean and counted.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_jax.data.jsonl import read_records
from sage_jax.eval.eq_bench import default_data_dir

__all__ = [
    "MTQuestion", "JudgePrompt", "load_questions", "load_judge_prompts", "load_answers", "TEMPERATURE",
    "NEED_REF_CATS", "generate_answers", "single_prompt", "pairwise_prompt", "parse_rating", "parse_pair_verdict",
    "combine_orders", "pairwise_tally", "judge_single", "judge_pairwise", "single_summary", "format_single",
    "format_pairwise", "MTBenchConfig", "run_mt_bench",
]

NEED_REF_CATS = ("math", "reasoning", "coding")
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
JUDGE_MAX_TOKENS = 2048


# ---------------------------------------------------------------- files
@dataclass(frozen=True)
class MTQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None

    @property
    def id(self) -> str:
        return str(self.question_id)


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # "pairwise" | "single"
    system_prompt: str
    prompt_template: str
    output_format: str
    category: str = "general"

    def fields(self) -> set[str]:
        return set(re.findall(r"\{(\w+)\}", self.prompt_template))


def _jsonl(path: Path, what: str):
    if not path.exists():
        raise FileNotFoundError(f"MT-Bench {what}: {path} not found (give the path or set SAGE_JAX_DATA)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None


def _mt_dir(path) -> Path:
    return Path(path) if path is not None else default_data_dir() / "mt_bench"


def load_questions(path: str | os.PathLike | None = None) -> list[MTQuestion]:
    """``question.jsonl``: ``question_id``, ``category``, ``turns`` (2 strings), optional ``reference``."""
    p = _mt_dir(path)
    if p.is_dir():
        p = p / "question.jsonl"
    out, seen = [], set()
    for n, obj in _jsonl(p, "questions"):
        where = f"{p}:{n}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        qid = obj.get("question_id")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise ValueError(f"{where}: field 'question_id': expected an integer, got {qid!r}")
        if qid in seen:
            raise ValueError(f"{where}: field 'question_id': duplicate id {qid}")
        seen.add(qid)
        cat = obj.get("category")
        if not isinstance(cat, str) or not cat:
            raise ValueError(f"{where}: field 'category': expected a non-empty string, got {cat!r}")
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"{where}: field 'turns': expected a list of non-empty strings")
        ref = obj.get("reference")
        if ref is not None and (not isinstance(ref, list) or not all(isinstance(t, str) for t in ref)):
            raise ValueError(f"{where}: field 'reference': expected a list of strings")
        out.append(MTQuestion(qid, cat, tuple(turns), tuple(ref) if ref is not None else None))
    if not out:
        raise ValueError(f"{p}: no questions")
    return out


def load_judge_prompts(path: str | os.PathLike | None = None) -> dict[str, JudgePrompt]:
    """``judge_prompts.jsonl``: name -> :class:`JudgePrompt`."""
    p = _mt_dir(path)
    if p.is_dir():
        p = p / "judge_prompts.jsonl"
    out = {}
    for n, obj in _jsonl(p, "judge prompts"):
        where = f"{p}:{n}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for k in ("name", "type", "system_prompt", "prompt_template", "output_format"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"{where}: field {k!r}: expected a string, got {obj.get(k)!r}")
        if obj["type"] not in ("pairwise", "single"):
            raise ValueError(f"{where}: field 'type': expected 'pairwise' or 'single', got {obj['type']!r}")
        out[obj["name"]] = JudgePrompt(obj["name"], obj["type"], obj["system_prompt"], obj["prompt_template"],
                                       obj["output_format"], obj.get("category", "general"))
    return out


def load_answers(path: str | os.PathLike) -> dict[str, dict]:
    """A per-item answers JSONL (:func:`generate_answers`): question id -> record (``turns`` = answers)."""
    p = Path(path)
    recs: dict[str, dict] = {}
    if not p.exists():
        raise FileNotFoundError(f"MT-Bench answers: {p} not found")
    for n, obj in _jsonl(p, "answers"):
        if not isinstance(obj, dict) or "question_id" not in obj:
            raise ValueError(f"{p}:{n}: field 'question_id': missing")
        turns = obj.get("turns")
        if not isinstance(turns, list) or not all(t is None or isinstance(t, str) for t in turns):
            raise ValueError(f"{p}:{n}: field 'turns': expected a list of answer strings")
        recs[str(obj["question_id"])] = obj
    return recs


# ---------------------------------------------------------------- answers
def generate_answers(backend: Any, questions: Sequence[MTQuestion], output: str | os.PathLike, *,
                     max_tokens: int = 1024, seed: int = 0, temperature: float | None = None,
                     progress: bool | None = None, **backend_options) -> dict[str, dict]:
    """Two-turn answers for every question not yet in ``output`` (appended per batch, resumable).

    Turn 1 for a batch of questions, then turn 2 with the conversation so far. Record: question_id,
    category, model, turns [answer 1, answer 2] (None where it failed), errors, temperature.
    ``temperature`` None: FastChat's per-category temperatures (:data:`TEMPERATURE`).
    """
    from sage_jax.progress import progress as progress_bar

    from sage_jax.data.jsonl import JsonlWriter
    from sage_jax.eval.generation import make_chat_backend

    out = Path(output)
    done = load_answers(out) if out.exists() else {}
    todo = [q for q in questions if q.id not in done]
    if not todo:
        return {q.id: done[q.id] for q in questions}
    chat = make_chat_backend(backend, **backend_options)
    batch = max(getattr(chat, "batch_size", 16), 16)
    bar = progress_bar(len(todo), f"mt-bench answers ({chat.name})", unit="q", show=progress)
    try:
        with JsonlWriter(out, append=True) as w:
            for s in range(0, len(todo), batch):
                chunk = todo[s:s + batch]
                temps = [temperature if temperature is not None else TEMPERATURE.get(q.category, 0.7) for q in chunk]
                convs: list[list[dict]] = [[] for _ in chunk]
                answers: list[list[str | None]] = [[] for _ in chunk]
                errors: list[list[str | None]] = [[] for _ in chunk]
                n_turns = max(len(q.turns) for q in chunk)
                for t in range(n_turns):
                    idx = [i for i, q in enumerate(chunk) if t < len(q.turns) and (t == 0 or answers[i][-1] is not None)]
                    for i, q in enumerate(chunk):
                        if t < len(q.turns) and i not in idx:
                            answers[i].append(None)
                            errors[i].append("previous turn failed")
                    if not idx:
                        continue
                    for i in idx:
                        convs[i].append({"role": "user", "content": chunk[i].turns[t]})
                    outs = chat.chat([convs[i] for i in idx], temperature=[temps[i] for i in idx],
                                     max_tokens=max_tokens, seed=seed,
                                     row_seeds=[chunk[i].question_id * 10 + t for i in idx])
                    for i, c in zip(idx, outs):
                        answers[i].append(c.text if c.ok else None)
                        errors[i].append(c.error)
                        if c.ok:
                            convs[i].append({"role": "assistant", "content": c.text})
                for i, q in enumerate(chunk):
                    rec = {"question_id": q.question_id, "category": q.category, "model": chat.name,
                           "turns": answers[i], "errors": errors[i], "temperature": temps[i],
                           "tstamp": time.time()}
                    w.write(rec)
                    done[q.id] = rec
                bar.update(len(chunk))
    finally:
        bar.close()
        if hasattr(chat, "close"):
            chat.close()
    return {q.id: done[q.id] for q in questions}


# ---------------------------------------------------------------- judge prompts
def _pick(prompts: Mapping[str, JudgePrompt], kind: str, q: MTQuestion, turn: int) -> JudgePrompt:
    math = q.category in NEED_REF_CATS and q.reference is not None
    if kind == "pairwise":
        name = "pair-math-v1" if math else "pair-v2"
    else:
        name = "single-math-v1" if math else "single-v1"
    if turn == 2:
        name += "-multi-turn"
    if name not in prompts:
        raise ValueError(f"judge prompts: no {name!r} (needed for question {q.question_id}, turn {turn})")
    return prompts[name]


def _answer(rec: Mapping | Sequence, i: int, who: str, qid: int) -> str:
    turns = rec.get("turns") if isinstance(rec, Mapping) else rec
    if turns is None or len(turns) <= i or turns[i] is None:
        raise ValueError(f"question {qid}: {who} has no answer for turn {i + 1}")
    return turns[i]


def single_prompt(prompts: Mapping[str, JudgePrompt], q: MTQuestion, answers: Mapping | Sequence,
                  turn: int) -> tuple[JudgePrompt, list[dict]]:
    """(judge prompt used, messages [system, user]) grading ``answers`` on ``turn`` (1 or 2)."""
    jp = _pick(prompts, "single", q, turn)
    kw: dict[str, str] = {}
    if turn == 1:
        kw.update(question=q.turns[0], answer=_answer(answers, 0, "the model", q.question_id))
    else:
        kw.update(question_1=q.turns[0], question_2=q.turns[1], answer_1=_answer(answers, 0, "the model", q.question_id),
                  answer_2=_answer(answers, 1, "the model", q.question_id))
    _refs(jp, q, kw)
    return jp, _messages(jp, kw)


def pairwise_prompt(prompts: Mapping[str, JudgePrompt], q: MTQuestion, answers_a: Mapping | Sequence,
                    answers_b: Mapping | Sequence, turn: int) -> tuple[JudgePrompt, list[dict]]:
    """(judge prompt used, messages) comparing assistant A and B on ``turn`` (1 or 2)."""
    jp = _pick(prompts, "pairwise", q, turn)
    kw: dict[str, str] = {}
    if turn == 1:
        kw.update(question=q.turns[0], answer_a=_answer(answers_a, 0, "assistant A", q.question_id),
                  answer_b=_answer(answers_b, 0, "assistant B", q.question_id))
    else:
        kw.update(question_1=q.turns[0], question_2=q.turns[1],
                  answer_a_1=_answer(answers_a, 0, "assistant A", q.question_id),
                  answer_a_2=_answer(answers_a, 1, "assistant A", q.question_id),
                  answer_b_1=_answer(answers_b, 0, "assistant B", q.question_id),
                  answer_b_2=_answer(answers_b, 1, "assistant B", q.question_id))
    _refs(jp, q, kw)
    return jp, _messages(jp, kw)


def _refs(jp: JudgePrompt, q: MTQuestion, kw: dict) -> None:
    for f in jp.fields():
        if f.startswith("ref_answer_"):
            i = int(f.rsplit("_", 1)[1]) - 1
            if q.reference is None or i >= len(q.reference):
                raise ValueError(f"question {q.question_id}: prompt {jp.name} needs reference answer {i + 1}")
            kw[f] = q.reference[i]
    missing = jp.fields() - set(kw)
    if missing:
        raise ValueError(f"judge prompt {jp.name}: no value for {sorted(missing)}")


def _messages(jp: JudgePrompt, kw: Mapping[str, str]) -> list[dict]:
    # str.format only parses the template; the substituted answers may contain braces safely
    user = jp.prompt_template.format(**{k: v for k, v in kw.items() if k in jp.fields()})
    msgs = [{"role": "system", "content": jp.system_prompt}] if jp.system_prompt else []
    return msgs + [{"role": "user", "content": user}]


# ---------------------------------------------------------------- verdicts
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_PAIR = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(text: str | None) -> tuple[float | None, str | None]:
    """(rating, None) or (None, why) from a single-answer judgment (``[[x]]``, else ``[x]``; 1..10)."""
    if text is None:
        return None, "no text"
    m = _RATING.findall(text) or _RATING_BACKUP.findall(text)
    if not m:
        return None, "no [[rating]] found"
    vals = {float(v) for v in m}
    if len(vals) > 1:
        return None, f"ambiguous: several ratings {sorted(vals)}"
    v = vals.pop()
    if not 1.0 <= v <= 10.0:
        return None, f"rating {v} outside 1..10"
    return v, None


def parse_pair_verdict(text: str | None) -> tuple[str | None, str | None]:
    """("A" | "B" | "tie", None) or (None, why) from a pairwise judgment."""
    if text is None:
        return None, "no text"
    found = set(_PAIR.findall(text))
    if not found:
        return None, "no [[A]]/[[B]]/[[C]] verdict found"
    if len(found) > 1:
        return None, f"ambiguous: several verdicts {sorted(found)}"
    v = found.pop()
    return ("tie" if v == "C" else v), None


def combine_orders(g1: str | None, g2: str | None) -> str:
    """Outcome for the model from game 1 (model = A) and game 2 (model = B, swapped).

    ``"model"`` / ``"baseline"`` when both orders agree, ``"tie"`` when they disagree or both say
    tie, ``"error"`` when either verdict failed.
    """
    if g1 is None or g2 is None:
        return "error"
    w1 = {"A": "model", "B": "baseline", "tie": "tie"}[g1]
    w2 = {"A": "baseline", "B": "model", "tie": "tie"}[g2]
    return w1 if w1 == w2 else "tie"


def pairwise_tally(outcomes: Sequence[str]) -> dict:
    """Counts (win/loss/tie/error) and win rates; errors are excluded from the rates."""
    c = Counter(outcomes)
    n = c["model"] + c["baseline"] + c["tie"]
    return {"win": c["model"], "loss": c["baseline"], "tie": c["tie"], "error": c["error"], "n": n,
            "win_rate": c["model"] / n if n else None, "loss_rate": c["baseline"] / n if n else None,
            "win_rate_adjusted": (c["model"] + 0.5 * c["tie"]) / n if n else None}


# ---------------------------------------------------------------- judging
def _ask(judge, messages: list[list[dict]], parse, tries: int, seed: int, max_tokens: int):
    """Judge each message list, re-asking failed parses up to ``tries`` times; (texts, values, whys, tries used)."""
    n = len(messages)
    texts: list[str | None] = [None] * n
    vals: list[Any] = [None] * n
    whys: list[str | None] = ["not asked"] * n
    used = [0] * n
    pending = list(range(n))
    for t in range(max(1, tries)):
        if not pending:
            break
        outs = judge.chat([messages[i] for i in pending], temperature=0.0, max_tokens=max_tokens, seed=seed + t)
        still = []
        for i, c in zip(pending, outs):
            used[i] += 1
            texts[i] = c.text
            if not c.ok:
                vals[i], whys[i] = None, f"judge error: {c.error}"
            else:
                vals[i], whys[i] = parse(c.text)
            if vals[i] is None:
                still.append(i)
        pending = still
    return texts, vals, whys, used


def _pending_pairs(questions, answers, turns, done, prefix=""):
    items = []
    for q in questions:
        for turn in turns:
            if turn > len(q.turns):
                continue
            rid = f"{prefix}{q.question_id}:t{turn}"
            if rid not in done:
                items.append((rid, q, turn))
    return items


def judge_single(judge: Any, questions: Sequence[MTQuestion], answers: Mapping[str, Any],
                 prompts: Mapping[str, JudgePrompt], output: str | os.PathLike, *, model: str = "",
                 turns: Sequence[int] = (1, 2), tries: int = 2, seed: int = 0, batch_size: int = 32,
                 max_tokens: int = JUDGE_MAX_TOKENS, progress: bool | None = None) -> list[dict]:
    """Single-answer grading of ``answers`` (question id -> record or list of turn answers), one JSONL
    record per (question, turn): id, question_id, turn, category, model, judge, prompt, judgment,
    rating (None if failed), failure, tries. Resumable."""
    from sage_jax.progress import progress as progress_bar

    from sage_jax.data.jsonl import JsonlWriter
    from sage_jax.eval.generation import make_chat_backend

    out = Path(output)
    done = read_records(out)
    todo = _pending_pairs(questions, answers, turns, done)
    if todo:
        judge = make_chat_backend(judge)
        bar = progress_bar(len(todo), "mt-bench single", unit="j", show=progress)
        with JsonlWriter(out, append=True) as w:
            for s in range(0, len(todo), batch_size):
                chunk, msgs, meta = todo[s:s + batch_size], [], []
                for rid, q, turn in chunk:
                    rec = answers.get(q.id)
                    try:
                        if rec is None:
                            raise ValueError(f"question {q.question_id}: no answers")
                        jp, m = single_prompt(prompts, q, rec, turn)
                        msgs.append(m)
                        meta.append((rid, q, turn, jp.name, None))
                    except ValueError as e:
                        meta.append((rid, q, turn, None, str(e)))
                asked = [i for i, x in enumerate(meta) if x[4] is None]
                texts, vals, whys, used = _ask(judge, msgs, parse_rating, tries, seed, max_tokens)
                res = dict(zip(asked, zip(texts, vals, whys, used)))
                for i, (rid, q, turn, pname, err) in enumerate(meta):
                    text, val, why, n = res.get(i, (None, None, f"no answer to grade: {err}", 0))
                    r = {"id": rid, "question_id": q.question_id, "turn": turn, "category": q.category,
                         "model": model, "judge": judge.name, "prompt": pname, "judgment": text, "rating": val,
                         "failure": why if val is None else None, "tries": n}
                    w.write(r)
                    done[rid] = r
                bar.update(len(chunk))
        bar.close()
    return [done[rid] for rid in (f"{q.question_id}:t{t}" for q in questions for t in turns if t <= len(q.turns))
            if rid in done]


def judge_pairwise(judge: Any, questions: Sequence[MTQuestion], answers: Mapping[str, Any],
                   baseline: Mapping[str, Any], prompts: Mapping[str, JudgePrompt], output: str | os.PathLike, *,
                   model: str = "model", baseline_name: str = "baseline", turns: Sequence[int] = (1, 2),
                   tries: int = 2, seed: int = 0, batch_size: int = 16, max_tokens: int = JUDGE_MAX_TOKENS,
                   progress: bool | None = None) -> list[dict]:
    """Pairwise grading, model vs baseline, both orders: game 1 = (model as A, baseline as B), game 2
    swapped. One JSONL record per (question, turn): g1/g2 judgment + verdict + failure, winner
    (model | baseline | tie | error). Resumable."""
    from sage_jax.progress import progress as progress_bar

    from sage_jax.data.jsonl import JsonlWriter
    from sage_jax.eval.generation import make_chat_backend

    out = Path(output)
    done = read_records(out)
    todo = _pending_pairs(questions, answers, turns, done)
    if todo:
        judge = make_chat_backend(judge)
        bar = progress_bar(len(todo), "mt-bench pairwise", unit="pair", show=progress)
        with JsonlWriter(out, append=True) as w:
            for s in range(0, len(todo), batch_size):
                chunk, msgs, meta = todo[s:s + batch_size], [], []
                for rid, q, turn in chunk:
                    try:
                        a, b = answers.get(q.id), baseline.get(q.id)
                        if a is None or b is None:
                            raise ValueError(f"question {q.question_id}: no answers from "
                                             f"{'the model' if a is None else 'the baseline'}")
                        jp, m1 = pairwise_prompt(prompts, q, a, b, turn)
                        _, m2 = pairwise_prompt(prompts, q, b, a, turn)
                        msgs += [m1, m2]
                        meta.append((rid, q, turn, jp.name, None))
                    except ValueError as e:
                        meta.append((rid, q, turn, None, str(e)))
                texts, vals, whys, used = _ask(judge, msgs, parse_pair_verdict, tries, seed, max_tokens)
                k = 0
                for rid, q, turn, pname, err in meta:
                    if err is None:
                        g = [(texts[k + j], vals[k + j], whys[k + j], used[k + j]) for j in (0, 1)]
                        k += 2
                    else:
                        g = [(None, None, f"not judged: {err}", 0)] * 2
                    r = {"id": rid, "question_id": q.question_id, "turn": turn, "category": q.category,
                         "model": model, "baseline": baseline_name, "judge": judge.name, "prompt": pname,
                         "g1_judgment": g[0][0], "g1_verdict": g[0][1], "g1_failure": g[0][2] if g[0][1] is None else None,
                         "g2_judgment": g[1][0], "g2_verdict": g[1][1], "g2_failure": g[1][2] if g[1][1] is None else None,
                         "winner": combine_orders(g[0][1], g[1][1]), "tries": [g[0][3], g[1][3]]}
                    w.write(r)
                    done[rid] = r
                bar.update(len(chunk))
        bar.close()
    return [done[rid] for rid in (f"{q.question_id}:t{t}" for q in questions for t in turns if t <= len(q.turns))
            if rid in done]


# ---------------------------------------------------------------- summaries
def single_summary(records: Sequence[Mapping]) -> dict:
    """Mean rating overall, per turn and per category; failures counted (not averaged)."""
    def agg(rs):
        ok = [r["rating"] for r in rs if r.get("rating") is not None]
        missing = sum(1 for r in rs if r.get("rating") is None and not r.get("tries"))
        return {"score": sum(ok) / len(ok) if ok else None, "n": len(ok),
                "failures": len(rs) - len(ok) - missing, "not_judged": missing}

    by_turn, by_cat = defaultdict(list), defaultdict(list)
    for r in records:
        by_turn[r["turn"]].append(r)
        by_cat[r["category"]].append(r)
    return {"overall": agg(list(records)), "turns": {str(t): agg(v) for t, v in sorted(by_turn.items())},
            "categories": {c: agg(v) for c, v in sorted(by_cat.items())}}


def pairwise_summary(records: Sequence[Mapping]) -> dict:
    by_turn, by_cat = defaultdict(list), defaultdict(list)
    for r in records:
        by_turn[r["turn"]].append(r["winner"])
        by_cat[r["category"]].append(r["winner"])
    asked = [r for r in records if any(r.get("tries") or ())]
    fails = sum((r.get("g1_verdict") is None) + (r.get("g2_verdict") is None) for r in asked)
    return {"overall": pairwise_tally([r["winner"] for r in records]),
            "turns": {str(t): pairwise_tally(v) for t, v in sorted(by_turn.items())},
            "categories": {c: pairwise_tally(v) for c, v in sorted(by_cat.items())},
            "verdict_failures": fails, "verdicts": 2 * len(asked), "not_judged": len(records) - len(asked)}


def _f(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def format_single(summary: Mapping, model: str = "") -> str:
    lines = [f"MT-Bench single-answer grading{f' of {model}' if model else ''}",
             f"{'':<12} {'score':>6} {'n':>4} {'failed':>6} {'no-ans':>6}"]
    for name, row in [("overall", summary["overall"]), *[(f"turn {t}", v) for t, v in summary["turns"].items()],
                      *summary["categories"].items()]:
        lines.append(f"{name:<12} {_f(row['score']):>6} {row['n']:>4} {row['failures']:>6} {row['not_judged']:>6}")
    lines.append("failed: the judge's verdict did not parse; no-ans: the model gave no answer to grade")
    return "\n".join(lines)


def format_pairwise(summary: Mapping, model: str = "model", baseline: str = "baseline") -> str:
    lines = [f"MT-Bench pairwise: {model} vs {baseline} (a win needs both orders to agree)",
             f"{'':<12} {'win':>4} {'loss':>4} {'tie':>4} {'error':>5} {'win%':>6} {'adj%':>6}"]
    for name, row in [("overall", summary["overall"]), *[(f"turn {t}", v) for t, v in summary["turns"].items()],
                      *summary["categories"].items()]:
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
        lines.append(f"{name:<12} {row['win']:>4} {row['loss']:>4} {row['tie']:>4} {row['error']:>5} "
                     f"{pct(row['win_rate']):>6} {pct(row['win_rate_adjusted']):>6}")
    lines.append(f"verdict parse failures: {summary['verdict_failures']} of {summary['verdicts']}; "
                 f"pairs not judged (an answer missing): {summary['not_judged']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the whole run
@dataclass(frozen=True)
class MTBenchConfig:
    questions: str | None = None  # question.jsonl (default shared/data/mt_bench)
    judge_prompts: str | None = None
    limit: int | None = None  # first N questions
    max_tokens: int = 1024  # per answer
    judge_max_tokens: int = JUDGE_MAX_TOKENS
    tries: int = 2  # judge calls per verdict before it counts as a failure
    seed: int = 0
    mode: str = "auto"  # "single" | "pairwise" | "both" | "auto" (pairwise when a baseline is given)
    progress: bool | None = None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _spec_label(what: Any) -> str:
    if isinstance(what, (str, os.PathLike)):
        s = str(what).rstrip("/")
        kind, _, rest = s.partition(":")
        if kind in ("openai", "rules", "local") and rest:
            return _safe(f"{kind}_{Path(rest).name if kind == 'local' else rest}")
        return _safe(Path(s).name)
    return _safe(getattr(what, "name", type(what).__name__))


def _answers_for(what: Any, questions, out_dir: Path, label: str, cfg: MTBenchConfig, **opts) -> tuple[dict, str]:
    """Answers from a precomputed JSONL, or generated into OUT_DIR/answers_<label>.jsonl."""
    if isinstance(what, (str, os.PathLike)) and str(what).endswith(".jsonl") and Path(what).is_file():
        recs = load_answers(what)
        name = next((r.get("model") for r in recs.values() if r.get("model")), Path(what).stem)
        return recs, name
    path = out_dir / f"answers_{label}_{_spec_label(what)}.jsonl"
    recs = generate_answers(what, questions, path, max_tokens=cfg.max_tokens, seed=cfg.seed,
                            progress=cfg.progress, **opts)
    name = next((r.get("model") for r in recs.values() if r.get("model")), label)
    return recs, name


def run_mt_bench(model: Any, judge: Any, output_dir: str | os.PathLike, cfg: MTBenchConfig = MTBenchConfig(), *,
                 baseline: Any = None, **backend_options) -> dict:
    """Answers (generated or read from a JSONL), judged single and/or pairwise; writes per-item JSONL
    files and ``summary.json`` under ``output_dir`` and returns the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    qs = load_questions(cfg.questions)
    if cfg.limit is not None:
        qs = qs[: cfg.limit]
    jp = load_judge_prompts(cfg.judge_prompts)
    mode = cfg.mode
    if mode == "auto":
        mode = "pairwise" if baseline is not None else "single"
    if mode in ("pairwise", "both") and baseline is None:
        raise ValueError("pairwise MT-Bench needs a baseline (--baseline)")
    answers, name = _answers_for(model, qs, out, "model", cfg, **backend_options)
    summary: dict[str, Any] = {"model": name, "questions": len(qs), "mode": mode}
    judge_b = None
    try:
        from sage_jax.eval.generation import make_chat_backend

        judge_b = make_chat_backend(judge, **backend_options)
        summary["judge"] = judge_b.name
        if mode in ("single", "both"):
            recs = judge_single(judge_b, qs, answers, jp, out / f"single_{_safe(name)}.jsonl", model=name,
                                tries=cfg.tries, seed=cfg.seed, max_tokens=cfg.judge_max_tokens,
                                progress=cfg.progress)
            summary["single"] = single_summary(recs)
        if mode in ("pairwise", "both"):
            base, bname = _answers_for(baseline, qs, out, "baseline", cfg, **backend_options)
            recs = judge_pairwise(judge_b, qs, answers, base, jp, out / f"pair_{_safe(name)}_vs_{_safe(bname)}.jsonl",
                                  model=name, baseline_name=bname, tries=cfg.tries, seed=cfg.seed,
                                  max_tokens=cfg.judge_max_tokens, progress=cfg.progress)
            summary["baseline"] = bname
            summary["pairwise"] = pairwise_summary(recs)
    finally:
        if judge_b is not None and hasattr(judge_b, "close"):
            judge_b.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: Mapping) -> str:
    parts = []
    if "single" in summary:
        parts.append(format_single(summary["single"], summary.get("model", "")))
    if "pairwise" in summary:
        parts.append(format_pairwise(summary["pairwise"], summary.get("model", "model"),
                                     summary.get("baseline", "baseline")))
    return "\n\n".join(parts)


__all__ += ["pairwise_summary", "format_summary"]
