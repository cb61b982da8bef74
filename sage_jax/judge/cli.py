"""`sage-jax annotate`: raw ShareGPT dialogues -> SAC JSONL through a judge backend.

Wire into ``sage_jax/cli.py`` with ``register(sub)``; the command is :class:`AnnotateConfig` (YAML
``--config``, ``key=value`` overrides, ``--print-config``; the flags are shorthands for its fields) and
exits 0 when every dialogue is annotated or already done, 2 when some failed (see the failure report),
1 when the input holds no valid dialogue (nothing written) or on an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Literal

__all__ = ["register", "register_annotate", "AnnotateConfig", "annotate"]


@dataclasses.dataclass(frozen=True)
class AnnotateConfig:
    """`sage-jax annotate`: raw ShareGPT dialogues -> SAC JSONL through a judge, resumably."""

    input: str | None = None  # ShareGPT JSON/JSONL file or folder, or a SAC JSONL file (required)
    output: str | None = None  # SAC JSONL output, appended (required)
    judge: str = "rules:"  # judge backend: rules:, openai:MODEL[@URL], local:HF_DIR
    format: Literal["auto", "sharegpt", "sac"] = "auto"  # input format
    failures: str | None = None  # failure report JSONL (default OUT.failures.jsonl; rewritten each run)
    cache_dir: str | None = None  # completion cache (default: judge_cache/ beside OUT)
    cache: bool = True  # use the completion cache
    tries: int = 3  # judge calls per dialogue before it fails
    temperature: float = 0.8
    max_tokens: int = 2048  # per answer
    seed: int = 0  # sampling seed of the first try (try t: seed + t)
    max_concurrency: int = 8  # concurrent requests (openai:)
    timeout: float = 60.0  # seconds per request (openai:)
    max_attempts: int = 6  # HTTP attempts per request (openai:)
    identity: str | None = None  # openai: the served weights (part of the cache key), or auto: GET /models/MODEL
    allow_insecure: bool = False  # openai: allow the API key over plain http to a non-loopback host
    chunk_size: int = 32  # dialogues per batch written together
    limit: int | None = None  # annotate at most this many dialogues this run
    example: bool = True  # an in-context example in the prompt
    allow_rewrite: bool = True  # the reference annotator may rewrite lightly and append a bridging question
    progress: bool = True  # progress bar


def annotate(cfg: AnnotateConfig) -> int:
    from sage_jax.judge.annotate import annotate_file
    from sage_jax.judge.base import RetryPolicy, make_judge, output_cache_dir, parse_spec

    if not cfg.input or not cfg.output:
        raise ValueError("annotate: input= (IN) and output= (-o OUT.jsonl) are required")
    spec = parse_spec(cfg.judge)
    opts = {}
    cache_dir = None
    if spec.kind != "rules":
        cache_dir = None if not cfg.cache else (cfg.cache_dir or output_cache_dir(cfg.output))
    if spec.kind == "openai":
        opts = dict(timeout=cfg.timeout, max_concurrency=cfg.max_concurrency,
                    retry=RetryPolicy(max_attempts=cfg.max_attempts), identity=cfg.identity,
                    allow_insecure=cfg.allow_insecure)
    judge = make_judge(cfg.judge, cache_dir=cache_dir, **opts)
    try:
        rep = annotate_file(cfg.input, cfg.output, judge, fmt=cfg.format, failures_path=cfg.failures,
                            chunk_size=cfg.chunk_size, limit=cfg.limit,
                            progress=None if cfg.progress else False, tries=cfg.tries,
                            temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed,
                            example=cfg.example, allow_rewrite=cfg.allow_rewrite)
    finally:
        close = getattr(judge, "close", None)
        if close is not None:
            close()
    print(rep.summary(), file=sys.stderr)
    if rep.total == 0:  # every input record was malformed (or there were none): nothing valid to write
        skipped = rep.read.skipped if rep.read is not None else 0
        print(f"sage-jax annotate: error: no valid dialogue in {cfg.input} ({skipped} malformed records "
              f"skipped); no dialogue written", file=sys.stderr)
        return 1
    print(f"wrote {rep.annotated} dialogues to {cfg.output}")
    return 2 if rep.failed else 0


def register_annotate(subparsers) -> argparse.ArgumentParser:
    from sage_jax.config import add_config_command

    return add_config_command(
        subparsers, "annotate", "sage_jax.judge.cli:AnnotateConfig:annotate",
        help="label raw dialogues with SAC latents through a judge (ShareGPT -> SAC JSONL)",
        description="Annotate every utterance of each dialogue (motivation, emotion, topics) in one judge call "
                    "per dialogue, whole dialogue in view. Resumable: ids already in OUT are skipped and each "
                    "result is appended as it finishes. Failures (after `tries`) go to the failure report and are "
                    "tried again on the next run. Judge specs: rules: (offline heuristic, the default), "
                    "openai:MODEL[@URL] (key from SAGE_JUDGE_API_KEY or OPENAI_API_KEY; URL from "
                    "SAGE_JUDGE_BASE_URL or OPENAI_BASE_URL), local:HF_DIR.",
        example="raw.jsonl -o data/sac.jsonl --judge rules: tries=5 limit=100",
        positionals=["input IN"],
        flags={"-o --output": "output OUT.jsonl", "--judge": "judge SPEC", "--format": "format FORMAT",
               "--failures": "failures PATH", "--cache-dir": "cache_dir DIR", "--no-cache": "!cache",
               "--tries": "tries N", "--temperature": "temperature T", "--max-tokens": "max_tokens N",
               "--seed": "seed S", "--max-concurrency": "max_concurrency N", "--timeout": "timeout SECONDS",
               "--max-attempts": "max_attempts N",
               "--allow-insecure": "+allow_insecure", "--chunk-size": "chunk_size N", "--limit": "limit N",
               "--no-example": "!example", "--no-rewrite": "!allow_rewrite", "--no-progress": "!progress"})


def register(subparsers) -> None:
    """Add ``annotate`` to the ``sage-jax`` subcommands."""
    register_annotate(subparsers)
