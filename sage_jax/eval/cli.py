"""`sage-jax eval {eq-bench, mt-bench, latent, perplexity}`: benchmarks, latent-prediction accuracy,
held-out plain-text perplexity.

Wire into ``sage_jax/cli.py`` with ``register(sub)``; every command is a config dataclass (YAML
``--config``, ``key=value`` overrides, ``--print-config``; the flags are shorthands for its fields)
and exits 0 ok, 2 when the result is flagged: an invalid EQ-Bench run, a rescoring that misses the
published score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

from sage_jax import parallel

__all__ = ["register", "EQBenchRunConfig", "MTBenchRunConfig", "LatentRunConfig", "PerplexityRunConfig",
           "eq_bench_command", "mt_bench_command", "latent_command", "perplexity_command"]

_MODEL_HELP = ("smollm2 | an HF model directory | a training run directory (its latest checkpoint) | "
               "a judge spec openai:MODEL[@URL] | local:DIR | rules:")


@dataclasses.dataclass(frozen=True)
class _Common:
    batch_size: int = 16  # prompts per generation batch
    template: str | None = None  # chat template name or jinja (default: the model's own)
    seed: int = 0  # sampling seed
    cache_dir: str | None = None  # completion cache for openai: backends (default: judge_cache/ in the output's folder)
    cache: bool = True  # use the completion cache
    progress: bool = True  # progress bar
    # Layout of a model of ours on this process's devices (default one device); e.g. mesh.data=4
    # mesh.tensor=2: rows over data, params by the rule table (see README, Parallelism).
    mesh: parallel.MeshConfig = parallel.SINGLE_DEVICE


def _backend_opts(cfg: _Common, output: str, *, output_is_dir: bool = False) -> dict:
    """Options for make_chat_backend (cache: openai: only, by default beside the output; batch size /
    template: models only)."""
    from sage_jax.judge.base import output_cache_dir

    opts = {"batch_size": cfg.batch_size, "mesh": cfg.mesh}
    if cfg.template:
        opts["template"] = cfg.template
    if cfg.cache:
        opts["cache_dir"] = cfg.cache_dir or output_cache_dir(output, is_dir=output_is_dir)
    return opts


def _progress(cfg: _Common):
    return None if cfg.progress else False


# ---------------------------------------------------------------- eq-bench
@dataclasses.dataclass(frozen=True)
class EQBenchRunConfig(_Common):
    """`sage-jax eval eq-bench`: EQ-Bench v2 (default protocol), or rescore published results files."""

    model: str | None = None  # the answering model: smollm2 | HF dir | run dir | a judge spec
    judge: str | None = None  # answer with a judge backend instead (openai:, local:, rules:)
    output: str | None = None  # per-item JSONL, appended, resumable (default eq_bench_<model>.jsonl)
    limit: int | None = None  # only the first N questions
    score_results: tuple[str, ...] = ()  # rescore published *_eqbench_v2_results.json file(s) instead
    questions: str | None = None  # eq_bench_v2_questions_171.json (default shared/data/eq_bench or $SAGE_JAX_DATA)
    attempts: int = 5  # attempts per question
    max_tokens: int = 60  # new tokens per answer
    d5_sigmoid: bool = False  # score d = 5 with the sigmoid (README literal), not linearly (published scores)


def eq_bench_command(cfg: EQBenchRunConfig) -> int:
    from sage_jax.eval import eq_bench

    if cfg.score_results:
        if cfg.model or cfg.judge:
            raise ValueError("eval eq-bench: --score-results rescores a file; do not combine it with --model/--judge")
        qs = eq_bench.load_questions(cfg.questions)
        rc = 0
        for f in cfg.score_results:
            r = eq_bench.score_results_file(f, qs, d5_sigmoid=cfg.d5_sigmoid)
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
    backend = cfg.model or cfg.judge
    if not backend:
        raise ValueError("eval eq-bench: give --model DIR|RUN_DIR|smollm2, --judge SPEC, or --score-results FILE")
    if cfg.model and cfg.judge:
        raise ValueError("eval eq-bench: --model and --judge both name the answering backend; give one")
    out = cfg.output or f"eq_bench_{Path(str(backend).rstrip('/')).name.replace(':', '_') or 'model'}.jsonl"
    bench = eq_bench.EQBenchConfig(questions=cfg.questions, limit=cfg.limit, max_attempts=cfg.attempts,
                                   max_tokens=cfg.max_tokens, seed=cfg.seed, d5_sigmoid=cfg.d5_sigmoid,
                                   progress=_progress(cfg))
    res = eq_bench.run_eq_bench(backend, out, bench, **_backend_opts(cfg, out))
    if res.n_done_before:
        print(f"resumed: {res.n_done_before} question(s) already in {out}", file=sys.stderr)
    summary = Path(str(out) + ".summary.json")
    summary.write_text(json.dumps(res.as_dict(), indent=2) + "\n", encoding="utf-8")
    print(eq_bench.format_summary(res))
    print(f"per-item results: {out}; summary: {summary}", file=sys.stderr)
    return 0 if res.benchmark.valid else 2


# ---------------------------------------------------------------- mt-bench
@dataclasses.dataclass(frozen=True)
class MTBenchRunConfig(_Common):
    """`sage-jax eval mt-bench`: two-turn answers judged single ([[rating]]) or pairwise against a baseline."""

    model: str | None = None  # the answering model (as for eq-bench) or an answers JSONL of a previous run (required)
    judge: str | None = None  # judge backend: openai:MODEL[@URL], local:DIR, rules: (required)
    baseline: str | None = None  # baseline for pairwise grading (same forms as model)
    mode: Literal["auto", "single", "pairwise", "both"] = "auto"  # auto: pairwise with a baseline, else single
    output: str | None = None  # output directory (default mt_bench_<model>)
    limit: int | None = None  # only the first N questions
    questions: str | None = None  # question.jsonl (default shared/data/mt_bench)
    judge_prompts: str | None = None  # judge_prompts.jsonl
    max_tokens: int = 1024  # new tokens per answer
    judge_max_tokens: int = 2048  # judge tokens per verdict
    tries: int = 2  # judge calls per verdict before it fails


def mt_bench_command(cfg: MTBenchRunConfig) -> int:
    from sage_jax.eval import mt_bench

    if not cfg.model:
        raise ValueError("eval mt-bench: --model is required (a model, a judge spec, or an answers JSONL)")
    if not cfg.judge:
        raise ValueError("eval mt-bench: --judge SPEC is required (e.g. openai:gpt-4o, local:DIR)")
    out = cfg.output or f"mt_bench_{Path(str(cfg.model).rstrip('/')).name.replace(':', '_')}"
    bench = mt_bench.MTBenchConfig(questions=cfg.questions, judge_prompts=cfg.judge_prompts, limit=cfg.limit,
                                   max_tokens=cfg.max_tokens, judge_max_tokens=cfg.judge_max_tokens,
                                   tries=cfg.tries, seed=cfg.seed, mode=cfg.mode, progress=_progress(cfg))
    # one option set for model, baseline and judge: each backend keeps what applies to it
    summary = mt_bench.run_mt_bench(cfg.model, cfg.judge, out, bench, baseline=cfg.baseline,
                                    **_backend_opts(cfg, out, output_is_dir=True))
    print(mt_bench.format_summary(summary))
    print(f"per-item results and summary.json in {out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- latent
@dataclasses.dataclass(frozen=True)
class LatentRunConfig(_Common):
    """`sage-jax eval latent`: latent-prediction accuracy on held-out SAC data."""

    model: str | None = None  # smollm2 | an HF model directory | a run directory (required)
    data: str | None = None  # held-out SAC dialogues (JSONL, required)
    max_dialogues: int | None = 50  # dialogues evaluated
    max_turns: int | None = None  # assistant turns per dialogue generated (default all)
    seq_len: int = 1024  # teacher-forced row length
    batch_rows: int = 8  # teacher-forced rows per batch
    max_new_tokens: int = 64  # tokens generated per latent prefix
    latent_tokens: Literal["auto", "yes", "no"] = "auto"  # latents as special tokens (auto: from the tokenizer)
    teacher_forced: bool = True  # the teacher-forced measure
    generate: bool = True  # the generation-based measure
    output: str | None = None  # per-turn JSONL of the generated measure
    summary: str | None = None  # write the full result as JSON
    train_data: tuple[str, ...] = ()  # the model's training SAC JSONL(s): adds each field's majority-class baseline


def latent_command(cfg: LatentRunConfig) -> int:
    from sage_jax.eval.latent import LatentEvalConfig, evaluate_latents, format_latent_summary

    if not cfg.model or not cfg.data:
        raise ValueError("eval latent: --model and --data are required (model=, data=)")
    ev = LatentEvalConfig(max_dialogues=cfg.max_dialogues, max_turns=cfg.max_turns, seq_len=cfg.seq_len,
                          batch_rows=cfg.batch_rows, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                          teacher_forced=cfg.teacher_forced, generate=cfg.generate,
                          template=cfg.template, seed=cfg.seed, progress=_progress(cfg),
                          latent_tokens={"auto": None, "yes": True, "no": False}[cfg.latent_tokens])
    model = cfg.model
    if parallel.inference_mesh(cfg.mesh) is not None:  # sharded: load the policy laid out on the mesh
        from sage_jax.rollout.policy import load_policy

        model = load_policy(cfg.model, template=cfg.template, mesh=cfg.mesh)
    res = evaluate_latents(model, cfg.data, ev, output=cfg.output, train=list(cfg.train_data) or None)
    print(format_latent_summary(res))
    if cfg.summary:
        Path(cfg.summary).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------- perplexity
@dataclasses.dataclass(frozen=True)
class PerplexityRunConfig:
    """`sage-jax eval perplexity`: held-out plain-text perplexity (replies without latents) vs a base model."""

    data: tuple[str, ...] = ()  # held-out SAC JSONL file(s) (required)
    base: str | None = None  # the base model (smollm2 | HF dir | run dir); ratios are model / base
    models: tuple[str, ...] = ()  # models compared with base: SPEC or NAME=SPEC
    max_dialogues: int | None = None  # the first N dialogues (all files together)
    seq_len: int = 1024  # row length; a longer dialogue loses its last turns (whole exchanges)
    batch_rows: int = 8  # rows per forward pass
    include_system: bool = True  # a dialogue's own system message (if any) stays in the context
    template: str | None = None  # chat template name or jinja (default: each model's own)
    dtype: str | None = None  # compute dtype override (e.g. float32)
    output: str | None = None  # write the result as JSON
    progress: bool = True
    mesh: parallel.MeshConfig = parallel.SINGLE_DEVICE  # layout of each model on this process's devices


def _named_models(specs) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in specs:
        name, eq, spec = str(s).partition("=")
        if not eq or not name or "/" in name or ":" in name:
            name, spec = Path(str(s).rstrip("/")).name or str(s), str(s)
        if name in out:
            raise ValueError(f"eval perplexity: two models named {name!r}; name them NAME=SPEC")
        out[name] = spec
    return out


def perplexity_command(cfg: PerplexityRunConfig) -> int:
    from sage_jax.eval.perplexity import PerplexityConfig, format_perplexity, perplexity, perplexity_ratios

    if not cfg.data:
        raise ValueError("eval perplexity: --data SAC.jsonl is required (data=[FILE,...])")
    if not cfg.base and not cfg.models:
        raise ValueError("eval perplexity: give base=MODEL and/or models=[SPEC or NAME=SPEC, ...]")
    pc = PerplexityConfig(seq_len=cfg.seq_len, batch_rows=cfg.batch_rows, max_dialogues=cfg.max_dialogues,
                          include_system=cfg.include_system, template=cfg.template, dtype=cfg.dtype,
                          progress=_progress(cfg), mesh=cfg.mesh)
    files = list(cfg.data)
    if cfg.base:
        res = perplexity_ratios(_named_models(cfg.models), cfg.base, files, pc)
    else:
        res = {"base": None, "models": {n: perplexity(s, files, pc) for n, s in _named_models(cfg.models).items()}}
    print(format_perplexity(res))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------- parser
_COMMON = {"--batch-size": "batch_size N", "--template": "template NAME", "--seed": "seed S",
           "--cache-dir": "cache_dir DIR", "--no-cache": "!cache", "--no-progress": "!progress"}


def register(subparsers) -> argparse.ArgumentParser:
    from sage_jax.config import add_config_command

    ev = subparsers.add_parser("eval", help="evaluate: EQ-Bench v2, MT-Bench, latent-prediction accuracy, perplexity",
                               description="Benchmarks and SAGE latent-prediction accuracy (see sage_jax/eval).")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    add_config_command(
        sub, "eq-bench", "sage_jax.eval.cli:EQBenchRunConfig:eq_bench_command",
        help="EQ-Bench v2 (default protocol) or rescore a published results file",
        description="Ask the 171 EQ-Bench v2 questions (temperature 0.01, 60 new tokens, retries at +0.15 on a "
                    "parse failure), write one JSONL record per question (resumable) and print the score; or "
                    "--score-results FILE to rescore a published results file. model: " + _MODEL_HELP,
        example="--model smollm2 -o eq.jsonl limit=20 batch_size=8",
        flags={"--model": "model MODEL", "--judge": "judge SPEC", "-o --output": "output OUT.jsonl",
               "--limit": "limit N", "--score-results": "score_results* FILE", "--questions": "questions PATH",
               "--attempts": "attempts N", "--max-tokens": "max_tokens N", "--d5-sigmoid": "+d5_sigmoid",
               **_COMMON})
    add_config_command(
        sub, "mt-bench", "sage_jax.eval.cli:MTBenchRunConfig:mt_bench_command",
        help="MT-Bench: two-turn answers judged single ([[rating]]) or pairwise",
        description="Generate two-turn answers (or read an answers JSONL) and judge them: single-answer grading, "
                    "or pairwise against a baseline in both orders (a win only when both agree). Writes per-item "
                    "JSONL files and summary.json to the output directory.",
        example="--model runs/m1 --judge openai:gpt-4o baseline=smollm2 mode=both limit=10",
        flags={"--model": "model MODEL", "--judge": "judge SPEC", "--baseline": "baseline MODEL",
               "--mode": "mode MODE", "-o --output": "output DIR", "--limit": "limit N",
               "--questions": "questions PATH", "--judge-prompts": "judge_prompts PATH",
               "--max-tokens": "max_tokens N", "--judge-max-tokens": "judge_max_tokens N", "--tries": "tries N",
               **_COMMON})
    add_config_command(
        sub, "latent", "sage_jax.eval.cli:LatentRunConfig:latent_command",
        help="latent-prediction accuracy on held-out SAC data",
        description="Teacher-forced latent-token accuracy and per-field accuracy of greedily generated latent "
                    "prefixes (motivation/emotion exact, topics Jaccard).",
        example="--model runs/m1 --data data/test.jsonl max_dialogues=20 teacher_forced=false",
        flags={"--model": "model MODEL", "--data": "data SAC.jsonl", "--max-dialogues": "max_dialogues N",
               "--max-turns": "max_turns N", "--seq-len": "seq_len N", "--batch-rows": "batch_rows N",
               "--max-new-tokens": "max_new_tokens N", "--latent-tokens": "latent_tokens {auto,yes,no}",
               "--no-teacher-forced": "!teacher_forced", "--no-generate": "!generate",
               "-o --output": "output OUT.jsonl", "--summary": "summary PATH",
               "--train-data": "train_data* SAC.jsonl", **_COMMON})
    add_config_command(
        sub, "perplexity", "sage_jax.eval.cli:PerplexityRunConfig:perplexity_command",
        help="held-out plain-text perplexity of models (replies, no latents) against a base model",
        description="Perplexity on the assistant replies of held-out SAC dialogues rendered as plain chat (latents "
                    "stripped from the whole context; loss on reply tokens and their end-of-turn). Each model in "
                    "models (SPEC or NAME=SPEC) is compared with base (ratio of perplexities). model: " + _MODEL_HELP,
        example="base=smollm2 models=[m1=runs/m1,dpo=runs/dpo] max_dialogues=100 --data data/test.jsonl",
        flags={"--data": "data* SAC.jsonl", "--base": "base MODEL", "--model": "models* MODEL",
               "--max-dialogues": "max_dialogues N", "--seq-len": "seq_len N", "--batch-rows": "batch_rows N",
               "--template": "template NAME", "-o --output": "output OUT.json", "--no-progress": "!progress"})
    return ev
