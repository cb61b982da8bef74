"""The judge (DESIGN.md §6): one :class:`Judge` protocol, three backends, and the helpers built on it.

    from sage_jax import judge
    j = judge.make_judge("rules:")                      # or "openai:MODEL[@URL]", "local:MODEL_OR_RUN_DIR"
    sel = judge.select_best(j, contexts, candidates)     # best of K per context (SAGE.md §4)
    verdicts = judge.compare_dialogues(j, [(a, b)])      # Dialog A vs Dialog B (SAGE.md §6)
    annotated, failures = judge.annotate_dialogues(j, dialogues)   # SAC latents (SAGE.md §2)

* :mod:`~sage_jax.judge.base`: :class:`Completion`, :class:`Judge`, :func:`make_judge`, the
  completion cache, :class:`RetryPolicy`;
* :mod:`~sage_jax.judge.local`: ``local:``, a model or run of ours on the JAX sampler;
* :mod:`~sage_jax.judge.openai_backend`: ``openai:`` through the official client (timeouts, retries, concurrency);
* :mod:`~sage_jax.judge.rules`: ``rules:v1``, the deterministic heuristic (offline default);
* :mod:`~sage_jax.judge.prompts` / :mod:`~sage_jax.judge.verdicts`: prompts and strict verdict parsing;
* :mod:`~sage_jax.judge.annotate`: whole-dialogue annotation and the ``sage-jax annotate`` stage.

No JAX import here (only ``local:`` loads it, lazily).
"""

from sage_jax.judge.annotate import (AnnotateReport, AnnotationError, AnnotationFailure, annotate_dialogues,
                                     annotate_file, iter_annotate, parse_annotation)
from sage_jax.judge.base import (CachingJudge, Completion, CompletionCache, Judge, JudgeConfig, JudgeSpec,
                                 JudgeStats, RetryPolicy, default_cache_dir, make_judge, output_cache_dir,
                                 parse_spec, redact)
from sage_jax.judge.prompts import (COMPANION_RUBRIC, HUMOUR_RUBRIC, PAIRWISE_RUBRIC, annotation_prompt,
                                    best_of_k_prompt, pairwise_prompt, parse_prompt)
from sage_jax.judge.rules import RulesJudge, score_reply
from sage_jax.judge.verdicts import (PairResult, Selection, Verdict, compare_dialogues, compare_with_swap,
                                     parse_best_of_k, parse_pairwise, rank_top, select_best, selection_summary)

__all__ = [
    "Completion", "Judge", "JudgeStats", "JudgeSpec", "JudgeConfig", "RetryPolicy", "CompletionCache",
    "CachingJudge", "make_judge", "parse_spec", "redact", "default_cache_dir", "output_cache_dir",
    "RulesJudge", "score_reply", "COMPANION_RUBRIC", "HUMOUR_RUBRIC", "PAIRWISE_RUBRIC", "best_of_k_prompt",
    "pairwise_prompt", "annotation_prompt", "parse_prompt", "Verdict", "parse_best_of_k", "parse_pairwise",
    "Selection", "select_best", "rank_top", "selection_summary", "compare_dialogues", "compare_with_swap", "PairResult",
    "AnnotationError", "AnnotationFailure", "parse_annotation", "annotate_dialogues", "iter_annotate",
    "AnnotateReport", "annotate_file",
]
