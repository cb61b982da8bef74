"""EQ-Bench v2 (Paech 2023): prompts, answer parsing, scoring, rescoring published results, and a run.

    from sage_jax.eval import eq_bench
    qs = eq_bench.load_questions()                       # 171 questions, references coerced to float
    prompt = eq_bench.build_prompt(qs["1"].prompt)      # default protocol (no revision pass)
    eq_bench.question_score(qs["1"].reference, eq_bench.parse_answer(text))   # float, or None if unparseable
    eq_bench.score_results_file("..._eqbench_v2_results.json").score       # 68.18 for Mistral-7B-Instruct-v0.2
    res = eq_bench.run_eq_bench("smollm2", "eq.jsonl", limit=10)            # per-item JSONL, resumable

Scoring (shared/data/README.md, "EQ-Bench v2 scoring, in words"):

* answers: ``dict(re.findall(r"(\\w+):\\s+(\\d+)", text))`` (a name given twice keeps its last score, as
  upstream); a question counts only if exactly 4 names parse and they are the 4 reference emotions
  (case-insensitive);
* per emotion ``d = |predicted - reference|`` adds 0 if d = 0, ``6.5 / (1 + e^(-1.2 (d - 4)))`` below
  the boundary, d above it; question score ``10 - 0.7477 * sum``;
* benchmark ``round(100 * mean(question scores) / 10, 2)`` over parseable questions; invalid if fewer
  than 83.33% parse.

**The d = 5 boundary (what the published files show).** The README says the sigmoid covers
``0 < d <= 5``; taken literally that rescoring gives 68.19 / 52.16 (and 36.33 for
Llama-2-7b-chat, whose upstream results file we also checked) against the published 68.18 / 52.15 /
36.32. Every published number is reproduced exactly when d = 5 is scored linearly (adds 5, not
``6.5/(1+e^-1.2)`` = 4.9954): the scores were computed with the sigmoid on ``0 < d < 5`` only. The
difference is 0.0046 per d = 5 answer (31 of 684 answers for Mistral-7B-Instruct-v0.2). That is
the default here (``d5_sigmoid=False``) so our numbers are comparable with the leaderboard;
``d5_sigmoid=True`` gives the README's literal formula. Truncating instead of rounding would
explain the first two files but not the third (36.331 -> 36.33), so it is not that.

**Published results files.** ``raw_results["1"]`` (one iteration) holds ``raw_inference`` (the raw
model text, produced with the *revision* protocol: first-pass scores, a critique, revised scores),
``respondent_answers`` (``{"first_pass": {...}, "revised": {...}}`` parsed from it: identical to
re-parsing the raw text) and ``individual_scores``. The stored ``individual_scores`` are stale:
they match no scoring of these answers and average 55.64 / 49.79, not 68.18; the published
``benchmark_score`` is the *first-pass* score computed afresh. Upstream takes, per iteration, the
revised score only when it is at least the first-pass score and has >= 95% as many parseable
answers, else the first-pass score (:func:`score_results_file` does the same and reports both);
for all three files that is the first pass. (``n_questions_parseable`` is unreliable too: 200.0
of 171 in the Llama-2 file.)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sage_jax.data.jsonl import read_records

__all__ = [
    "Question", "load_questions", "default_data_dir", "build_prompt", "parse_answer", "answer_problem",
    "scaled_difference", "question_score", "BenchmarkScore", "benchmark_score", "ResultsFileScore",
    "score_results_file", "EQBenchConfig", "EQBenchResult", "run_eq_bench", "score_run_file", "format_summary",
    "QUESTIONS_FILE", "VALID_PARSE_RATE", "N_QUESTIONS", "ADJUST_CONST",
]

QUESTIONS_FILE = "eq_bench_v2_questions_171.json"
N_QUESTIONS = 171
VALID_PARSE_RATE = 0.8333  # a run is invalid if fewer than 83.33% of its questions parse
ADJUST_CONST = 0.7477
ANSWER_RE = re.compile(r"(\w+):\s+(\d+)")

# The default protocol (no revision pass), in the README's words.
REVISION_SENTENCE = " Then critique your answer by thinking it through step by step. Finally, give your revised scores."
FIRST_PASS_HEADER = "First pass scores:\n"
CRITIQUE_START = "Critique: <your critique here>"
END_OF_ANSWER = "[End of answer]"
ANSWER_SUFFIX = "\nYour answer:\n"


def default_data_dir() -> Path:
    """``$SAGE_JAX_DATA`` if set, else the project's ``shared/data`` (a sibling of the repository)."""
    env = os.environ.get("SAGE_JAX_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


# ---------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    reference: tuple[tuple[str, float], ...]  # the 4 (emotion, fullscale score) pairs, in order

    @property
    def emotions(self) -> tuple[str, ...]:
        return tuple(e for e, _ in self.reference)


def _coerce_score(v: Any, where: str) -> float:
    if isinstance(v, bool):
        raise ValueError(f"{where}: expected a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number (or a numeric string), got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: expected a finite number, got {v!r}")
    return x


def parse_reference(ref: Any, where: str) -> tuple[tuple[str, float], ...]:
    """``{"emotion1".."emotion4", "emotion1_score".."emotion4_score"}`` -> 4 (name, score) pairs."""
    if not isinstance(ref, Mapping):
        raise ValueError(f"{where}: expected an object with emotion1..4 and emotion1_score..4, got "
                         f"{type(ref).__name__}")
    out = []
    for i in range(1, 5):
        name = ref.get(f"emotion{i}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.emotion{i}: expected a non-empty string, got {name!r}")
        if f"emotion{i}_score" not in ref:
            raise ValueError(f"{where}.emotion{i}_score: missing")
        out.append((name.strip(), _coerce_score(ref[f"emotion{i}_score"], f"{where}.emotion{i}_score")))
    if len({n.lower() for n, _ in out}) != 4:
        raise ValueError(f"{where}: the 4 emotions must be distinct, got {[n for n, _ in out]}")
    return tuple(out)


def load_questions(path: str | os.PathLike | None = None) -> dict[str, Question]:
    """The questions file (keys "1".."171"), in numeric order; clear errors name file, key and field."""
    p = Path(path) if path is not None else default_data_dir() / "eq_bench" / QUESTIONS_FILE
    if p.is_dir():
        p = p / QUESTIONS_FILE if (p / QUESTIONS_FILE).exists() else p / "eq_bench" / QUESTIONS_FILE
    if not p.exists():
        raise FileNotFoundError(f"EQ-Bench questions: {p} not found (give --questions PATH or set SAGE_JAX_DATA)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{p}: expected a JSON object of questions keyed by id")
    out = {}
    for qid in sorted(raw, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k))):
        q = raw[qid]
        where = f"{p}: question {qid}"
        if not isinstance(q, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(q).__name__}")
        if not isinstance(q.get("prompt"), str) or not q["prompt"].strip():
            raise ValueError(f"{where}: field 'prompt': expected a non-empty string")
        if "reference_answer_fullscale" not in q:
            raise ValueError(f"{where}: field 'reference_answer_fullscale' missing (an EQ-Bench v2 file is needed)")
        out[str(qid)] = Question(str(qid), q["prompt"],
                                 parse_reference(q["reference_answer_fullscale"], f"{where}: reference_answer_fullscale"))
    return out


# ---------------------------------------------------------------- prompt
def build_prompt(prompt: str, *, qid: str = "?") -> str:
    """The default-protocol prompt: revision sentence, "First pass scores:" header and everything from
    "Critique:" up to "[End of answer]" removed, "\\nYour answer:\\n" appended."""
    for marker in (REVISION_SENTENCE, FIRST_PASS_HEADER, CRITIQUE_START, END_OF_ANSWER):
        if marker not in prompt:
            raise ValueError(f"EQ-Bench question {qid}: prompt lacks {marker!r} (not an EQ-Bench v2 revision prompt)")
    p = prompt.replace(REVISION_SENTENCE, "").replace(FIRST_PASS_HEADER, "")
    start, end = p.find(CRITIQUE_START), p.find(END_OF_ANSWER)
    if end < start:
        raise ValueError(f"EQ-Bench question {qid}: {END_OF_ANSWER!r} comes before {CRITIQUE_START!r}")
    return p[:start] + "\n" + p[end:] + ANSWER_SUFFIX


# ---------------------------------------------------------------- parsing and scoring
def parse_answer(text: str | None) -> dict[str, str]:
    """``name -> score string`` pairs of an answer (``dict(findall)``: a repeated name keeps its last score)."""
    return dict(ANSWER_RE.findall(text or ""))


def answer_problem(reference: Sequence[tuple[str, float]], answer: Mapping[str, Any]) -> str | None:
    """Why an answer cannot be scored (None if it can)."""
    if len(answer) != 4:
        return f"expected 4 emotion scores, parsed {len(answer)}"
    want = {n.lower() for n, _ in reference}
    got = {str(n).lower() for n in answer}
    if got != want:
        return f"emotions {sorted(got)} do not match the reference {sorted(want)}"
    return None


def scaled_difference(d: float, *, d5_sigmoid: bool = False) -> float:
    """The per-emotion penalty: 0 at d = 0, the sigmoid ``6.5 / (1 + e^(-1.2 (d - 4)))`` for small d, d beyond.

    The sigmoid covers ``0 < d < 5`` (what every published score implies, see the module docstring)
    or ``0 < d <= 5`` with ``d5_sigmoid=True`` (the README's literal formula).
    """
    if d == 0:
        return 0.0
    if d < 5 or (d5_sigmoid and d <= 5):
        return 6.5 / (1 + math.exp(-1.2 * (d - 4)))
    return float(d)


def question_score(reference: Sequence[tuple[str, float]], answer: Mapping[str, Any], *,
                   d5_sigmoid: bool = False) -> float | None:
    """``10 - 0.7477 * sum of penalties``, or None if the answer does not parse (see :func:`answer_problem`)."""
    if answer_problem(reference, answer) is not None:
        return None
    ref = {n.lower(): s for n, s in reference}
    total = 0.0
    for name, score in answer.items():
        total += scaled_difference(abs(float(score) - ref[str(name).lower()]), d5_sigmoid=d5_sigmoid)
    return 10 - ADJUST_CONST * total


@dataclass(frozen=True)
class BenchmarkScore:
    score: float | None  # 100 * mean / 10, rounded to 2 decimals (None if nothing parsed)
    parseable: int
    total: int
    parse_rate: float
    valid: bool  # parse_rate >= 83.33%
    raw_score: float | None = None  # before rounding

    def as_dict(self) -> dict:
        return asdict(self)


def benchmark_score(scores: Iterable[float | None], total: int | None = None) -> BenchmarkScore:
    """Benchmark score of per-question scores (None = unparseable); ``total`` defaults to their count."""
    scores = list(scores)
    n = len(scores) if total is None else int(total)
    ok = [s for s in scores if s is not None]
    rate = len(ok) / n if n else 0.0
    raw = 100 * (sum(ok) / len(ok)) / 10 if ok else None
    return BenchmarkScore(None if raw is None else round(raw, 2), len(ok), n, rate,
                          bool(ok) and rate >= VALID_PARSE_RATE, raw)


# ---------------------------------------------------------------- published results files
@dataclass
class ResultsFileScore:
    path: str
    score: float | None  # upstream's final score (mean over iterations, rounded)
    first_pass: BenchmarkScore
    revised: BenchmarkScore | None
    chosen: str  # "first_pass" | "revised" (of the last iteration; all of them in `iterations`)
    published: float | None  # the file's benchmark_score
    iterations: list[dict] = field(default_factory=list)
    answer_mismatches: int = 0  # re-parsed raw text != stored respondent_answers

    @property
    def matches_published(self) -> bool:
        return self.published is not None and self.score is not None and abs(self.score - self.published) < 0.005 + 1e-9


def _split_revision(text: str) -> tuple[str, str | None]:
    """(first-pass text, revised text or None) of a raw revision-protocol answer (upstream's regexes)."""
    m = re.search(r"First pass scores:(.*?)Revised scores:", text, re.DOTALL)
    if m:
        r = re.search(r"Revised scores:(.*?)$", text, re.DOTALL)
        return m.group(1), (r.group(1) if r else "")
    if "Revised scores:" in text or "First pass scores:" in text:
        return "", text.split("Revised scores:", 1)[1] if "Revised scores:" in text else ""
    return text, None


def score_results_file(path: str | os.PathLike, questions: Mapping[str, Question] | str | os.PathLike | None = None,
                       *, d5_sigmoid: bool = False) -> ResultsFileScore:
    """Rescore a published EQ-Bench v2 results file from its raw answers (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such results file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from None
    qs = questions if isinstance(questions, Mapping) else load_questions(questions)
    if not isinstance(data, Mapping):
        raise ValueError(f"{p}: expected a JSON object")
    if "raw_results" in data:
        iters = data["raw_results"]
        field_name = "raw_results"
    elif "iterations" in data:
        iters, field_name = data["iterations"], "iterations"
    else:
        raise ValueError(f"{p}: field 'raw_results' missing (expected an EQ-Bench v2 results file)")
    if not isinstance(iters, Mapping) or not iters:
        raise ValueError(f"{p}: field {field_name!r}: expected a non-empty object of iterations")
    version = data.get("eqbench_version")
    if version not in (None, "v2"):
        raise ValueError(f"{p}: field 'eqbench_version' is {version!r}; only v2 results can be rescored")
    finals, mismatches, per_iter = [], 0, []
    fp_all: list[float | None] = []
    rv_all: list[float | None] = []
    chosen = "first_pass"
    for it, run in iters.items():
        where = f"{p}: {field_name}.{it}"
        if not isinstance(run, Mapping):
            raise ValueError(f"{where}: expected an object")
        raw = run.get("raw_inference")
        stored = run.get("respondent_answers")
        if not isinstance(raw, Mapping) and not isinstance(stored, Mapping):
            raise ValueError(f"{where}: neither 'raw_inference' nor 'respondent_answers' present")
        ids = list(raw) if isinstance(raw, Mapping) else list(stored)
        unknown = [i for i in ids if str(i) not in qs]
        if unknown:
            raise ValueError(f"{where}: question ids not in the questions file: {unknown[:5]}")
        fp, rv, any_revised = [], [], False
        for qid in ids:
            if isinstance(raw, Mapping) and isinstance(raw.get(qid), str):
                first_text, rev_text = _split_revision(raw[qid])
                a_first, a_rev = parse_answer(first_text), (parse_answer(rev_text) if rev_text is not None else None)
                if isinstance(stored, Mapping) and isinstance(stored.get(qid), Mapping):
                    s = stored[qid]
                    if s.get("first_pass", {}) != a_first or (a_rev is not None and s.get("revised", {}) != a_rev):
                        mismatches += 1
            else:
                s = stored.get(qid) if isinstance(stored, Mapping) else None
                if not isinstance(s, Mapping):
                    raise ValueError(f"{where}: respondent_answers.{qid}: expected an object with first_pass/revised")
                a_first, a_rev = dict(s.get("first_pass") or {}), s.get("revised")
                a_rev = dict(a_rev) if a_rev else None
            any_revised = any_revised or a_rev is not None
            ref = qs[str(qid)].reference
            fp.append(question_score(ref, a_first, d5_sigmoid=d5_sigmoid))
            rv.append(question_score(ref, a_rev, d5_sigmoid=d5_sigmoid) if a_rev is not None else None)
        b_fp = benchmark_score(fp, N_QUESTIONS)
        b_rv = benchmark_score(rv, N_QUESTIONS) if any_revised else None
        # upstream: revised only if >= first pass and with >= 95% as many parseable answers
        if (b_rv is not None and b_rv.raw_score is not None and b_fp.raw_score is not None
                and b_rv.raw_score >= b_fp.raw_score and b_rv.parseable >= 0.95 * b_fp.parseable):
            chosen, final = "revised", b_rv.raw_score
        else:
            chosen, final = "first_pass", (b_fp.raw_score if b_fp.raw_score is not None else 0.0)
        finals.append(final)
        fp_all += fp
        rv_all += rv
        per_iter.append({"iteration": str(it), "first_pass": b_fp.as_dict(),
                         "revised": None if b_rv is None else b_rv.as_dict(), "chosen": chosen, "final": final})
    n_it = len(finals)
    published = data.get("benchmark_score")
    try:
        published = float(published) if published is not None else None
    except (TypeError, ValueError):
        published = None
    return ResultsFileScore(
        path=str(p), score=round(sum(finals) / n_it, 2), first_pass=benchmark_score(fp_all, N_QUESTIONS * n_it),
        revised=benchmark_score(rv_all, N_QUESTIONS * n_it) if any(v is not None for v in rv_all) else None,
        chosen=chosen, published=published, iterations=per_iter, answer_mismatches=mismatches)


# ---------------------------------------------------------------- running the benchmark
@dataclass(frozen=True)
class EQBenchConfig:
    questions: str | None = None  # questions file (default: shared/data/eq_bench/...)
    limit: int | None = None  # first N questions (numeric id order)
    temperature: float = 0.01
    temperature_step: float = 0.15  # added on every retry after a parse failure
    max_attempts: int = 5  # attempts per question (bounded retries)
    max_tokens: int = 60
    seed: int = 0
    d5_sigmoid: bool = False
    progress: bool | None = None  # None: tqdm decides (hidden when not a terminal)


@dataclass
class EQBenchResult:
    output: str
    model: str
    benchmark: BenchmarkScore
    n_done_before: int  # items already in the output (resumed)
    n_new: int
    complete: bool  # all 171 questions attempted
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["benchmark"] = self.benchmark.as_dict()
        return d


def score_run_file(path: str | os.PathLike, questions: Mapping[str, Question] | None = None, *,
                   d5_sigmoid: bool | None = None, total: int | None = None) -> BenchmarkScore:
    """Benchmark score of a per-item JSONL written by :func:`run_eq_bench` (rescored from its answers
    when ``questions`` is given, else from the stored per-item scores)."""
    recs = read_records(Path(path))
    if not recs:
        raise ValueError(f"{path}: no EQ-Bench items")
    scores = []
    for rid, r in recs.items():
        if questions is not None and rid in questions:
            ans = r.get("answer") or {}
            scores.append(question_score(questions[rid].reference, ans,
                                         d5_sigmoid=bool(r.get("d5_sigmoid")) if d5_sigmoid is None else d5_sigmoid))
        else:
            scores.append(r.get("score"))
    return benchmark_score(scores, total)


def run_eq_bench(backend: Any, output: str | os.PathLike, cfg: EQBenchConfig = EQBenchConfig(), *,
                 questions: Mapping[str, Question] | None = None, **backend_options) -> EQBenchResult:
    """Ask every (remaining) question, retrying unparseable answers, one JSONL record per question.

    ``backend``: anything :func:`~sage_jax.eval.generation.make_chat_backend` takes (a model path,
    ``smollm2``, a run dir, a judge spec, a backend object). Items already in ``output`` are skipped
    (resume); each question's record is appended as soon as its batch finishes. Record fields: id,
    model, prompt_sha (of the prompt sent), attempts [{temperature, text, error}], text (the answer
    scored), answer (parsed pairs), score (None if unparseable), problem (why), d5_sigmoid.
    """
    import hashlib

    from sage_jax.progress import progress as progress_bar

    from sage_jax.data.jsonl import JsonlWriter
    from sage_jax.eval.generation import make_chat_backend

    if cfg.max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {cfg.max_attempts}")
    t0 = time.time()
    qs = dict(questions) if questions is not None else load_questions(cfg.questions)
    items = list(qs.values())[: cfg.limit] if cfg.limit is not None else list(qs.values())
    out = Path(output)
    done = read_records(out)
    todo = [q for q in items if q.id not in done]
    chat = make_chat_backend(backend, **backend_options) if todo else None
    name = chat.name if chat is not None else next((r.get("model", "") for r in done.values()), "")
    prompts = {q.id: build_prompt(q.prompt, qid=q.id) for q in todo}
    batch = getattr(chat, "batch_size", 16) if chat is not None else 16
    batch = max(batch, 16)
    bar = progress_bar(len(todo), "eq-bench", unit="q", show=cfg.progress)
    try:
        with JsonlWriter(out, append=True) as w:
            for s in range(0, len(todo), batch):
                chunk = todo[s:s + batch]
                attempts: dict[str, list[dict]] = {q.id: [] for q in chunk}
                final: dict[str, tuple[str | None, dict, float | None, str | None]] = {}
                pending = list(chunk)
                for a in range(cfg.max_attempts):
                    if not pending:
                        break
                    temp = cfg.temperature + cfg.temperature_step * a
                    convs = [[{"role": "user", "content": prompts[q.id]}] for q in pending]
                    seeds = [_row_seed(q.id, a) for q in pending]
                    outs = chat.chat(convs, temperature=temp, max_tokens=cfg.max_tokens, seed=cfg.seed + a,
                                     row_seeds=seeds)
                    still = []
                    for q, c in zip(pending, outs):
                        attempts[q.id].append({"temperature": round(temp, 4), "text": c.text, "error": c.error})
                        ans = parse_answer(c.text) if c.ok else {}
                        problem = (f"backend error: {c.error}" if not c.ok
                                   else answer_problem(q.reference, ans))
                        score = None if problem else question_score(q.reference, ans, d5_sigmoid=cfg.d5_sigmoid)
                        final[q.id] = (c.text, ans, score, problem)
                        if problem:
                            still.append(q)
                    pending = still
                for q in chunk:
                    text, ans, score, problem = final[q.id]
                    w.write({"id": q.id, "benchmark": "eq-bench-v2", "model": name,
                             "prompt_sha": hashlib.sha256(prompts[q.id].encode()).hexdigest()[:16],
                             "attempts": attempts[q.id], "text": text, "answer": ans, "score": score,
                             "problem": problem, "reference": [list(r) for r in q.reference],
                             "d5_sigmoid": cfg.d5_sigmoid})
                    done[q.id] = {"score": score}
                bar.update(len(chunk))
    finally:
        bar.close()
        if chat is not None and hasattr(chat, "close"):
            chat.close()
    wanted = {q.id for q in items}
    bench = benchmark_score([done[i].get("score") for i in done if i in wanted], len(items))
    return EQBenchResult(str(out), name, bench, n_done_before=len(items) - len(todo), n_new=len(todo),
                         complete=len(items) == N_QUESTIONS and len(qs) == N_QUESTIONS, elapsed_s=time.time() - t0)


def _row_seed(qid: str, attempt: int) -> int:
    """A sampling seed per (question, attempt): the same on a rerun whatever the batch composition."""
    base = int(qid) if qid.isdigit() else int.from_bytes(qid.encode()[:4].ljust(4, b"\0"), "little")
    return (base * 131 + attempt) % (2**31 - 1)


def format_summary(res: EQBenchResult | BenchmarkScore, *, label: str = "EQ-Bench v2") -> str:
    b = res.benchmark if isinstance(res, EQBenchResult) else res
    score = "n/a" if b.score is None else f"{b.score:.2f}"
    status = "valid" if b.valid else f"INVALID (parse rate below {VALID_PARSE_RATE:.2%})"
    line = (f"{label}: score {score}  parseable {b.parseable}/{b.total} ({b.parse_rate:.1%})  {status}")
    if isinstance(res, EQBenchResult) and not res.complete:
        line += f"  [partial run: {b.total} of {N_QUESTIONS} questions]"
    return line


def _print(*a):  # pragma: no cover - CLI convenience
    print(*a, file=sys.stderr)
