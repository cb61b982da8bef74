"""Pairwise A/B comparison of two rollout sets with position swap and consensus (SAGE.md §6).

Both sets roll out from the same seeds; dialogues are matched by id, latents stripped, and each
pair judged as (A, B) and (B, A). A win counts only when both orders agree; anything else
(disagreement, a tie, a failed verdict) is "no consensus".
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from sage_jax.data.jsonl import read_sac


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    a: str = ""  # SAC JSONL of system A (e.g. runs/search_base/sft.jsonl)
    b: str = ""
    judge: str = "rules:"
    judge_cache: str | None = None
    output: str = "runs/compare"  # writes per_seed.tsv and summary.json here
    seed: int = 0


def consensus_table(outcomes: list[str]) -> dict[str, int]:
    """Counts of "a", "b" and "no consensus" outcomes (the paper's table)."""
    return {"wins_a": outcomes.count("a"), "wins_b": outcomes.count("b"),
            "no_consensus": outcomes.count("no consensus"), "total": len(outcomes)}


def run_compare(cfg: CompareConfig) -> dict:
    import json

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
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    judge = make_judge(cfg.judge, cache_dir=cfg.judge_cache or out / "judge_cache")
    results = compare_with_swap(judge, [(a, b) for a, b in matched], seed=cfg.seed)
    with open(out / "per_seed.tsv", "w") as f:
        f.write("id\toutcome\tverdict_ab\tverdict_ba\n")
        for (a, _), r in zip(matched, results):
            f.write(f"{a.id}\t{r.winner}\t{r.ab.kind}:{r.ab.index}\t{r.ba.kind}:{r.ba.index}\n")
    table = consensus_table([r.winner for r in results])
    summary = {**table, "judge": judge.name, "a": cfg.a, "b": cfg.b, "unmatched_a": len(da) - len(matched),
               "unmatched_b": len(db) - len(matched)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_table(s: dict) -> str:
    return ("| wins A | wins B | no consensus | total | judge |\n|---|---|---|---|---|\n"
            f"| {s['wins_a']} | {s['wins_b']} | {s['no_consensus']} | {s['total']} | {s['judge']} |")
