"""`sage-jax annotate`: raw ShareGPT dialogues -> SAC JSONL through a judge backend.

Wire into ``sage_jax/cli.py`` with ``register(sub)``; the command sets ``func`` returning an exit
code (0 when every dialogue is annotated or already done, 2 when some failed: see the failure report).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "register_annotate"]


def _annotate(args: argparse.Namespace) -> int:
    from sage_jax.judge.annotate import annotate_file
    from sage_jax.judge.base import RetryPolicy, default_cache_dir, make_judge, parse_spec

    spec = parse_spec(args.judge)
    opts = {}
    cache_dir = None
    if spec.kind != "rules":
        cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    if spec.kind == "openai":
        opts = dict(timeout=args.timeout, max_concurrency=args.max_concurrency,
                    retry=RetryPolicy(max_attempts=args.max_attempts))
    judge = make_judge(args.judge, cache_dir=cache_dir, **opts)
    try:
        rep = annotate_file(args.input, args.output, judge, fmt=args.format, failures_path=args.failures,
                            chunk_size=args.chunk_size, limit=args.limit,
                            progress=False if args.no_progress else None, tries=args.tries,
                            temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                            example=not args.no_example, allow_rewrite=args.allow_rewrite)
    finally:
        close = getattr(judge, "close", None)
        if close is not None:
            close()
    print(rep.summary(), file=sys.stderr)
    print(f"wrote {rep.annotated} dialogues to {args.output}")
    return 2 if rep.failed else 0


def register_annotate(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "annotate", help="label raw dialogues with SAC latents through a judge (ShareGPT -> SAC JSONL)",
        description="Annotate every utterance of each dialogue (motivation, emotion, topics) in one judge call "
                    "per dialogue, whole dialogue in view. Resumable: ids already in OUT are skipped and each "
                    "result is appended as it finishes. Failures (after --tries) go to the failure report and are "
                    "tried again on the next run. Judge specs: rules: (offline heuristic, the default), "
                    "openai:MODEL[@URL] (key from SAGE_JUDGE_API_KEY or OPENAI_API_KEY; URL from "
                    "SAGE_JUDGE_BASE_URL or OPENAI_BASE_URL), local:HF_DIR.")
    p.add_argument("input", metavar="IN", help="ShareGPT JSON/JSONL file or folder (or a SAC JSONL file)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="SAC JSONL output (appended)")
    p.add_argument("--judge", default="rules:", metavar="SPEC", help="judge backend (default rules:)")
    p.add_argument("--format", default="auto", choices=["auto", "sharegpt", "sac"], help="input format")
    p.add_argument("--failures", default=None, metavar="PATH",
                   help="failure report JSONL (default OUT.failures.jsonl; rewritten each run)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="completion cache (default $SAGE_JAX_CACHE/judge or ~/.cache/sage_jax/judge)")
    p.add_argument("--no-cache", action="store_true", help="no completion cache")
    p.add_argument("--tries", type=int, default=3, help="judge calls per dialogue before it fails (default 3)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--max-tokens", type=int, default=2048, help="max tokens per answer (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first try (try t: seed + t)")
    p.add_argument("--max-concurrency", type=int, default=8, help="concurrent requests (openai:, default 8)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (openai:, default 60)")
    p.add_argument("--max-attempts", type=int, default=6, help="HTTP attempts per request (openai:, default 6)")
    p.add_argument("--chunk-size", type=int, default=32, help="dialogues per batch written together (default 32)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="annotate at most N dialogues this run")
    p.add_argument("--no-example", action="store_true", help="no in-context example in the prompt")
    p.add_argument("--allow-rewrite", action="store_true",
                   help="accept a rewritten utterance ('text') from the annotator")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_annotate)
    return p


def register(subparsers) -> None:
    """Add ``annotate`` to the ``sage-jax`` subcommands."""
    register_annotate(subparsers)
