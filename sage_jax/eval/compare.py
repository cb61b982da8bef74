"""Pairwise A/B comparison of two rollout sets with position swap and consensus (SAGE.md §6).

Both sets roll out from the same seeds; dialogues are matched by id, latents stripped, and each
pair judged as (A, B) and (B, A). A win counts only when both orders agree; anything else
(disagreement, a tie, a failed verdict) is "no consensus" (a tie in the win/tie/loss table).

What makes the number trustworthy (issue 12, item 2):

* **held-out seeds** (``exclude_seeds_from``): search output directories, SAC / pair JSONL files or
  plain seed files whose seeds were used for search or training (:func:`used_seeds`). Compare
  refuses (ValueError naming the file and the first offending ids and seeds) when a compared
  dialogue's seed (its first user turn, whitespace normalised, or its ``meta.seed``) is among them.
  Make the split with :func:`sage_jax.data.split.split_seeds` (re-exported here).
* **an interval**: counts of A wins, B wins and ties, and B's win rate over the decided pairs and
  over all pairs, each with a 95% Wilson score interval and its n (:func:`win_tie_loss`).
* **which judge judged what**: the evaluation judge, and the selection judge that chose the
  training data (``selection_judge``, else the ``meta.judge`` of the compared dialogues and of the
  excluded files' records); a warning (stderr and ``summary["warnings"]``) when they are the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from sage_jax.data.jsonl import read_sac
from sage_jax.data.split import normalise_seed, split_seeds

__all__ = ["CompareConfig", "consensus_table", "wilson_interval", "win_tie_loss", "used_seeds", "dialogue_seeds",
           "check_held_out", "judge_key", "run_compare", "format_table", "split_seeds", "normalise_seed"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    a: str = ""  # SAC JSONL of system A (e.g. runs/search_base/sft.jsonl)
    b: str = ""
    judge: str = "rules:"  # the evaluation judge
    judge_cache: str | None = None
    output: str = "runs/compare"  # writes per_seed.tsv and summary.json here
    seed: int = 0
    # Search output directories, SAC/pair JSONL files or seed text files whose seeds were used for
    # search or training: compare refuses when a compared dialogue's seed is among them.
    exclude_seeds_from: tuple[str, ...] = ()
    # The judge spec that selected the training data (default: read from the dialogues' meta.judge).
    selection_judge: str | None = None


def consensus_table(outcomes: list[str]) -> dict[str, int]:
    """Counts of "a", "b" and "no consensus" outcomes (the paper's table)."""
    return {"wins_a": outcomes.count("a"), "wins_b": outcomes.count("b"),
            "no_consensus": outcomes.count("no consensus"), "total": len(outcomes)}


# ---------------------------------------------------------------- intervals
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a proportion k/n ((None, None) when n = 0)."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "low": lo, "high": hi, "k": k, "n": n}


def win_tie_loss(table: dict[str, int]) -> dict:
    """B's win rate over decided pairs (wins A + wins B) and over all pairs (ties count as not a
    win), each ``{"rate", "low", "high", "k", "n"}`` with a 95% Wilson score interval."""
    wa, wb, total = table["wins_a"], table["wins_b"], table["total"]
    return {"wins_a": wa, "wins_b": wb, "ties": table["no_consensus"], "total": total,
            "win_rate_b_decided": _rate(wb, wa + wb), "win_rate_b_all": _rate(wb, total),
            "interval": "Wilson score, 95%"}


# ---------------------------------------------------------------- held-out seeds
_DIR_FILES = re.compile(r"^(sft|trajectories|pairs|trees)(\.p\d+)?\.jsonl$")


def _record_seeds(rec) -> tuple[list[str], str | None, str | None]:
    """(seed texts, id, meta.judge) of one JSON record: a SAC dialogue (first user turn, meta.seed),
    a preference pair (first history turn), a trees.jsonl record (seed) or a chat (messages)."""
    if not isinstance(rec, dict):
        return [], None, None
    seeds = []
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    for key in ("turns", "history", "messages"):
        turns = rec.get(key)
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict) and t.get("role") == "user"), None)
            if first is not None:
                text = first.get("text", first.get("content"))
                if isinstance(text, str):
                    seeds.append(text)
            break
    for s in (rec.get("seed"), meta.get("seed")):
        if isinstance(s, str):
            seeds.append(s)
    rid = rec.get("id") if isinstance(rec.get("id"), str) else None
    judge = meta.get("judge") if isinstance(meta.get("judge"), str) else None
    return [normalise_seed(s) for s in seeds if normalise_seed(s)], rid, judge


def _files_of(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"exclude_seeds_from: {path} not found")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and _DIR_FILES.match(f.name))
        if not files:
            raise ValueError(f"exclude_seeds_from: {path}: no search outputs in it (sft/trajectories/pairs/"
                             "trees .jsonl); give the search output directory or the files themselves")
        return files
    return [path]


def used_seeds(paths: Iterable[str | Path], *, judges: set[str] | None = None) -> dict[str, str]:
    """Normalised seed text -> the first file it was found in, over ``paths`` (search output
    directories: their sft/trajectories/pairs/trees JSONL, not subdirectories; JSONL files of SAC
    dialogues, pairs or trees records; any other file: one seed per line, text before a tab).
    ``judges``: a set that receives the ``meta.judge`` values found (the selection judges)."""
    from sage_jax.data.readers.seeds import read_seeds

    found: dict[str, str] = {}
    for p in paths:
        for f in _files_of(Path(p)):
            n = 0
            if f.suffix in (".jsonl", ".json"):
                with open(f, encoding="utf-8") as fh:
                    for line in fh:
                        line = line.strip()
                        if not line:
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a torn last line of a killed run: its other records still count
                        seeds, _, judge = _record_seeds(rec)
                        if judge and judges is not None:
                            judges.add(judge)
                        for s in seeds:
                            found.setdefault(s, str(f))
                            n += 1
            else:
                for s in read_seeds(f):
                    if normalise_seed(s):
                        found.setdefault(normalise_seed(s), str(f))
                        n += 1
            if n == 0:
                print(f"compare: warning: {f}: no seeds found in it (nothing to exclude from this file)",
                      file=sys.stderr)
    return found


def dialogue_seeds(d) -> set[str]:
    """Normalised seeds of a :class:`~sage_jax.sac.Dialogue`: its first user turn and ``meta.seed``."""
    out = set()
    first = next((t for t in d.turns if t.role == "user"), None)
    if first is not None and normalise_seed(first.text):
        out.add(normalise_seed(first.text))
    s = (d.meta or {}).get("seed")
    if isinstance(s, str) and normalise_seed(s):
        out.add(normalise_seed(s))
    return out


def check_held_out(dialogues: Sequence, used: dict[str, str], *, shown: int = 3) -> None:
    """Raise ValueError when any dialogue's seed is in ``used`` (from :func:`used_seeds`), naming
    the file(s) and the first ``shown`` offending ids and seed texts."""
    bad: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    for d in dialogues:
        for s in sorted(dialogue_seeds(d)):
            if s in used and (d.id, s) not in seen:
                seen.add((d.id, s))
                bad.setdefault(used[s], []).append((d.id, s))
    if not bad:
        return
    n = len({i for v in bad.values() for i, _ in v})
    parts = []
    for f, items in bad.items():
        ex = "; ".join(f"{i}: {s[:60]!r}" for i, s in items[:shown])
        parts.append(f"{f} ({len(items)}: {ex}{' ...' if len(items) > shown else ''})")
    raise ValueError(f"compare: {n} compared dialogue(s) start from seeds used for search or training, so the "
                     f"comparison would not be held out; seeds found in " + " | ".join(parts)
                     + ". Compare on held-out seeds (sage_jax.data.split.split_seeds).")


# ---------------------------------------------------------------- judges
def judge_key(spec: str) -> str:
    """A comparable identity of a judge spec or judge name: ``rules:`` and ``rules:v1`` are one
    judge, ``openai:M@URL`` and ``openai:M`` too (the model decides), ``local:`` paths resolved."""
    from sage_jax.judge.base import parse_spec

    try:
        s = parse_spec(str(spec).strip())
    except ValueError:
        return str(spec).strip().lower()
    model = str(Path(s.model).expanduser().resolve()) if s.kind == "local" else s.model
    return f"{s.kind}:{model}"


def _judges_report(eval_name: str, option: str | None, meta_judges: set[str]) -> tuple[dict, list[str]]:
    if option:
        selection, source = [option], "option"
    elif meta_judges:
        selection, source = sorted(meta_judges), "meta.judge"
    else:
        selection, source = [], None
    same = None if not selection else any(judge_key(s) == judge_key(eval_name) for s in selection)
    warnings = []
    if same:
        warnings.append(f"the evaluation judge {eval_name} is the judge that selected the training data "
                        f"({', '.join(selection)}, from {source}): the win rate measures agreement with the "
                        "selector as much as quality; evaluate with a different judge")
    return {"eval": eval_name, "selection": selection, "selection_source": source, "same": same}, warnings


# ---------------------------------------------------------------- the command
def run_compare(cfg: CompareConfig) -> dict:
    from sage_jax.judge import compare_with_swap, make_judge

    if not cfg.a or not cfg.b:
        raise ValueError("compare: give both rollout files: a=A.jsonl b=B.jsonl")
    da, ra = read_sac(cfg.a)
    db, rb = read_sac(cfg.b)
    for r in (ra, rb):
        if r.skipped:
            print(r.summary(5), file=sys.stderr)
    by_b = {d.id: d for d in db}
    matched = [(d, by_b[d.id]) for d in da if d.id in by_b]
    if not matched:
        raise ValueError(f"compare: {cfg.a} and {cfg.b} share no dialogue ids")
    warnings: list[str] = []
    meta_judges: set[str] = set()
    for d in (x for pair in matched for x in pair):
        j = (d.meta or {}).get("judge")
        if isinstance(j, str) and j:
            meta_judges.add(j)
    if cfg.exclude_seeds_from:
        used = used_seeds(cfg.exclude_seeds_from, judges=meta_judges)
        check_held_out([x for pair in matched for x in pair], used)
        held_out = {"checked": True, "exclude_seeds_from": list(cfg.exclude_seeds_from), "used_seeds": len(used),
                    "compared_dialogues": 2 * len(matched), "overlap": 0}
    else:
        held_out = {"checked": False}
        warnings.append("seeds not checked against search/training data (give exclude_seeds_from=[DIR,...])")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    judge = make_judge(cfg.judge, cache_dir=cfg.judge_cache or out / "judge_cache")
    judges, jw = _judges_report(judge.name, cfg.selection_judge, meta_judges)
    warnings += jw
    for w in warnings:
        print(f"compare: warning: {w}", file=sys.stderr)
    results = compare_with_swap(judge, [(a, b) for a, b in matched], seed=cfg.seed)
    with open(out / "per_seed.tsv", "w") as f:
        f.write("id\toutcome\tverdict_ab\tverdict_ba\n")
        for (a, _), r in zip(matched, results):
            f.write(f"{a.id}\t{r.winner}\t{r.ab.kind}:{r.ab.index}\t{r.ba.kind}:{r.ba.index}\n")
    table = consensus_table([r.winner for r in results])
    summary = {**table, **win_tie_loss(table), "judge": judge.name, "judges": judges, "held_out": held_out,
               "warnings": warnings, "a": cfg.a, "b": cfg.b, "unmatched_a": len(da) - len(matched),
               "unmatched_b": len(db) - len(matched)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _fmt_rate(r: dict) -> str:
    if not r or r.get("rate") is None:
        return f"n/a (n={r.get('n', 0) if r else 0})"
    return f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] (n={r['n']})"


def format_table(s: dict) -> str:
    lines = ["| wins A | wins B | ties (no consensus) | total | judge |", "|---|---|---|---|---|",
             f"| {s['wins_a']} | {s['wins_b']} | {s['no_consensus']} | {s['total']} | {s['judge']} |"]
    if "win_rate_b_decided" in s:
        lines += ["", f"B win rate over decided pairs: {_fmt_rate(s['win_rate_b_decided'])}; over all pairs: "
                      f"{_fmt_rate(s['win_rate_b_all'])}  ({s.get('interval', 'Wilson score, 95%')} interval)"]
    j = s.get("judges")
    if j:
        sel = ", ".join(j["selection"]) if j["selection"] else "unknown"
        lines.append(f"evaluation judge: {j['eval']}; selection judge: {sel}"
                     + (f" (from {j['selection_source']})" if j["selection_source"] else ""))
    h = s.get("held_out")
    if h is not None:
        lines.append(f"held-out check: {h['used_seeds']} search/training seeds excluded, no overlap" if h["checked"]
                     else "held-out check: not done")
    lines += [f"WARNING: {w}" for w in s.get("warnings", ())]
    return "\n".join(lines)
