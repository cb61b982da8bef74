"""Dialogue tree search (SAGE.md §4): self-play from seed openings, K children per assistant turn,
the judge picks the best. Above rollout and judge; neither imports it.

    from sage_jax.search import SearchConfig, run_search
    run_search(SearchConfig(model="runs/m1", judge="rules:", num_seeds=16, output_dir="runs/search"))
"""

from sage_jax.search.tree import SearchConfig, expand, run_search, search_batch

__all__ = ["SearchConfig", "expand", "run_search", "search_batch"]
