"""Evaluation (SAGE.md §6): benchmarks, latent-prediction accuracy, A/B comparison of rollouts.

* :mod:`~sage_jax.eval.eq_bench`: EQ-Bench v2: prompts, parsing, scoring, rescoring published
  results files (reproduces 68.18 / 52.15), runs through a model or any judge backend;
* :mod:`~sage_jax.eval.mt_bench`: MT-Bench: two-turn answers, single ``[[rating]]`` and pairwise
  ``[[A]]/[[B]]/[[C]]`` grading in both orders (a win only when both agree);
* :mod:`~sage_jax.eval.latent`: teacher-forced latent-token accuracy and per-field accuracy of
  generated latent prefixes on held-out SAC data, with each field's majority-class baseline;
* :mod:`~sage_jax.eval.generation`: chat replies from a model (our sampler) or a judge backend;
* :mod:`~sage_jax.eval.compare`: pairwise dialogue comparison of two rollout sets (held-out seed
  check, win/tie/loss with Wilson intervals, evaluation vs selection judge);
* :mod:`~sage_jax.eval.perplexity`: held-out plain-text perplexity (replies, no latents) vs a base;
* :mod:`~sage_jax.eval.cli`: ``sage-jax eval {eq-bench, mt-bench, latent, perplexity}`` (``register(sub)``).

Submodules load on first access (``from sage_jax import eval as ev; ev.eq_bench``): importing this
package imports neither JAX nor transformers.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["eq_bench", "mt_bench", "latent", "generation", "compare", "perplexity", "cli"]


def __getattr__(name: str):
    if name in __all__:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
