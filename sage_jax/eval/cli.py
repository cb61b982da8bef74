"""`sage-jax eval {eq-bench, mt-bench, latent}`: benchmarks and latent-prediction accuracy.

Wire into ``sage_jax/cli.py`` with ``register(sub)``; every command sets ``func`` returning an exit
code (0 ok; 2 when the result is flagged: an invalid EQ-Bench run, a rescoring that misses the
published score).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]

_MODEL_HELP = ("smollm2 | an HF model directory | a training run directory (its latest checkpoint) | "
               "a judge spec openai:MODEL[@URL] | local:DIR | rules:")


def _backend_opts(args) -> dict:
    """Options for make_chat_backend (cache: openai: only; batch size / template: models only)."""
    from sage_jax.judge.base import default_cache_dir

    opts = {"batch_size": args.batch_size}
    if getattr(args, "template", None):
        opts["template"] = args.template
    if not getattr(args, "no_cache", False):
        opts["cache_dir"] = args.cache_dir or default_cache_dir()
    return opts


def _progress(args):
    return False if getattr(args, "no_progress", False) else None


# ---------------------------------------------------------------- eq-bench
def _eq_bench(args: argparse.Namespace) -> int:
    from sage_jax.eval import eq_bench

    if args.score_results:
        if args.model or args.judge:
            raise ValueError("eval eq-bench: --score-results rescores a file; do not combine it with --model/--judge")
        qs = eq_bench.load_questions(args.questions)
        rc = 0
        for f in args.score_results:
            r = eq_bench.score_results_file(f, qs, d5_sigmoid=args.d5_sigmoid)
            print(f"{f}: {r.score:.2f}")
            pub = "n/a" if r.published is None else f"{r.published:.2f}"
            rv = r.revised.score if r.revised is not None else None
            print(f"  first pass {r.first_pass.score} ({r.first_pass.parseable}/{r.first_pass.total} parseable), "
                  f"revised {rv}, chosen {r.chosen}; published {pub}"
                  + ("" if r.published is None else ("  [matches]" if r.matches_published else "  [MISMATCH]")),
                  file=sys.stderr)
            if r.published is not None and not r.matches_published:
                rc = 2
        return rc
    backend = args.model or args.judge
    if not backend:
        raise ValueError("eval eq-bench: give --model DIR|RUN_DIR|smollm2, --judge SPEC, or --score-results FILE")
    if args.model and args.judge:
        raise ValueError("eval eq-bench: --model and --judge both name the answering backend; give one")
    out = args.output or f"eq_bench_{Path(str(backend).rstrip('/')).name.replace(':', '_') or 'model'}.jsonl"
    cfg = eq_bench.EQBenchConfig(questions=args.questions, limit=args.limit, max_attempts=args.attempts,
                                 max_tokens=args.max_tokens, seed=args.seed, d5_sigmoid=args.d5_sigmoid,
                                 progress=_progress(args))
    res = eq_bench.run_eq_bench(backend, out, cfg, **_backend_opts(args))
    if res.n_done_before:
        print(f"resumed: {res.n_done_before} question(s) already in {out}", file=sys.stderr)
    summary = Path(str(out) + ".summary.json")
    summary.write_text(json.dumps(res.as_dict(), indent=2) + "\n", encoding="utf-8")
    print(eq_bench.format_summary(res))
    print(f"per-item results: {out}; summary: {summary}", file=sys.stderr)
    return 0 if res.benchmark.valid else 2


# ---------------------------------------------------------------- mt-bench
def _mt_bench(args: argparse.Namespace) -> int:
    from sage_jax.eval import mt_bench

    if not args.model:
        raise ValueError("eval mt-bench: --model is required (a model, a judge spec, or an answers JSONL)")
    if not args.judge:
        raise ValueError("eval mt-bench: --judge SPEC is required (e.g. openai:gpt-4o, local:DIR)")
    out = args.output or f"mt_bench_{Path(str(args.model).rstrip('/')).name.replace(':', '_')}"
    cfg = mt_bench.MTBenchConfig(questions=args.questions, judge_prompts=args.judge_prompts, limit=args.limit,
                                 max_tokens=args.max_tokens, judge_max_tokens=args.judge_max_tokens,
                                 tries=args.tries, seed=args.seed, mode=args.mode, progress=_progress(args))
    # one option set for model, baseline and judge: each backend keeps what applies to it
    summary = mt_bench.run_mt_bench(args.model, args.judge, out, cfg, baseline=args.baseline, **_backend_opts(args))
    print(mt_bench.format_summary(summary))
    print(f"per-item results and summary.json in {out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- latent
def _latent(args: argparse.Namespace) -> int:
    from sage_jax.eval.latent import LatentEvalConfig, evaluate_latents, format_latent_summary

    cfg = LatentEvalConfig(max_dialogues=args.max_dialogues, max_turns=args.max_turns, seq_len=args.seq_len,
                           batch_rows=args.batch_rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           teacher_forced=not args.no_teacher_forced, generate=not args.no_generate,
                           template=args.template, seed=args.seed, progress=_progress(args),
                           latent_tokens={"auto": None, "yes": True, "no": False}[args.latent_tokens])
    res = evaluate_latents(args.model, args.data, cfg, output=args.output)
    print(format_latent_summary(res))
    if args.summary:
        Path(args.summary).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, *, batch: int = 16) -> None:
    p.add_argument("--batch-size", type=int, default=batch, help=f"prompts per generation batch (default {batch})")
    p.add_argument("--template", default=None, help="chat template name or jinja (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="completion cache for openai: backends")
    p.add_argument("--no-cache", action="store_true", help="no completion cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="evaluate: EQ-Bench v2, MT-Bench, latent-prediction accuracy",
                               description="Benchmarks and SAGE latent-prediction accuracy (see sage_jax/eval).")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    eq = sub.add_parser("eq-bench", help="EQ-Bench v2 (default protocol) or rescore a published results file",
                        description="Ask the 171 EQ-Bench v2 questions (temperature 0.01, 60 new tokens, retries at "
                                    "+0.15 on a parse failure), write one JSONL record per question (resumable) and "
                                    "print the score; or --score-results FILE to rescore a published results file.")
    eq.add_argument("--model", default=None, metavar="MODEL", help=_MODEL_HELP)
    eq.add_argument("--judge", default=None, metavar="SPEC", help="answer with a judge backend instead (openai:, local:, rules:)")
    eq.add_argument("-o", "--output", default=None, metavar="OUT.jsonl", help="per-item JSONL (appended; resumable)")
    eq.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions")
    eq.add_argument("--score-results", nargs="+", default=None, metavar="FILE",
                    help="rescore published *_eqbench_v2_results.json file(s) and print the benchmark score")
    eq.add_argument("--questions", default=None, metavar="PATH",
                    help="eq_bench_v2_questions_171.json (default: shared/data/eq_bench or $SAGE_JAX_DATA)")
    eq.add_argument("--attempts", type=int, default=5, help="attempts per question (default 5)")
    eq.add_argument("--max-tokens", type=int, default=60, help="new tokens per answer (default 60)")
    eq.add_argument("--d5-sigmoid", action="store_true",
                    help="score d = 5 with the sigmoid (README literal) instead of linearly (what published scores use)")
    _common(eq)
    eq.set_defaults(func=_eq_bench)

    mt = sub.add_parser("mt-bench", help="MT-Bench: two-turn answers judged single ([[rating]]) or pairwise",
                        description="Generate two-turn answers (or read an answers JSONL) and judge them: single-"
                                    "answer grading, or pairwise against --baseline in both orders (a win only when "
                                    "both agree). Writes per-item JSONL files and summary.json to -o DIR.")
    mt.add_argument("--model", required=False, default=None, metavar="MODEL",
                    help=_MODEL_HELP + " | an answers JSONL written by a previous run")
    mt.add_argument("--judge", default=None, metavar="SPEC", help="judge backend (openai:MODEL[@URL], local:DIR, rules:)")
    mt.add_argument("--baseline", default=None, metavar="MODEL", help="baseline for pairwise grading (same forms as --model)")
    mt.add_argument("--mode", default="auto", choices=["auto", "single", "pairwise", "both"],
                    help="grading (default auto: pairwise with --baseline, else single)")
    mt.add_argument("-o", "--output", default=None, metavar="DIR", help="output directory")
    mt.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions")
    mt.add_argument("--questions", default=None, metavar="PATH", help="question.jsonl (default shared/data/mt_bench)")
    mt.add_argument("--judge-prompts", default=None, metavar="PATH", help="judge_prompts.jsonl")
    mt.add_argument("--max-tokens", type=int, default=1024, help="new tokens per answer (default 1024)")
    mt.add_argument("--judge-max-tokens", type=int, default=2048, help="judge tokens per verdict (default 2048)")
    mt.add_argument("--tries", type=int, default=2, help="judge calls per verdict before it fails (default 2)")
    _common(mt)
    mt.set_defaults(func=_mt_bench)

    la = sub.add_parser("latent", help="latent-prediction accuracy on held-out SAC data",
                        description="Teacher-forced latent-token accuracy and per-field accuracy of greedily "
                                    "generated latent prefixes (motivation/emotion exact, topics Jaccard).")
    la.add_argument("--model", required=True, metavar="MODEL", help="smollm2 | an HF model directory | a run directory")
    la.add_argument("--data", required=True, metavar="SAC.jsonl", help="held-out SAC dialogues")
    la.add_argument("--max-dialogues", type=int, default=50, help="dialogues evaluated (default 50)")
    la.add_argument("--max-turns", type=int, default=None, help="assistant turns per dialogue generated (default all)")
    la.add_argument("--seq-len", type=int, default=1024, help="teacher-forced row length (default 1024)")
    la.add_argument("--batch-rows", type=int, default=8, help="teacher-forced rows per batch (default 8)")
    la.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per latent prefix (default 64)")
    la.add_argument("--latent-tokens", default="auto", choices=["auto", "yes", "no"],
                    help="latents rendered with special tokens (default: detect from the tokenizer)")
    la.add_argument("--no-teacher-forced", action="store_true", help="skip the teacher-forced measure")
    la.add_argument("--no-generate", action="store_true", help="skip the generation-based measure")
    la.add_argument("-o", "--output", default=None, metavar="OUT.jsonl", help="per-turn JSONL of the generated measure")
    la.add_argument("--summary", default=None, metavar="PATH", help="write the full result as JSON")
    _common(la)
    la.set_defaults(func=_latent)
    return ev
