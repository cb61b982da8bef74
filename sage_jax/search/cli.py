"""`sage-jax search`: YAML config + key=value overrides."""

from __future__ import annotations


def register(sub) -> None:
    from sage_jax.config import add_config_command

    add_config_command(sub, "search", "sage_jax.search.tree:SearchConfig:run_search",
                       help="self-play dialogue tree search with a judge (trajectories, trees, pairs)",
                       description="Fields of SearchConfig (sage_jax/search/tree.py) as key=value, e.g. "
                                   "model=runs/m1 judge=rules: num_seeds=16 k=4 turns=8 output_dir=runs/search",
                       example="model=runs/m1 judge=rules: num_seeds=16 turns=8 k=4 output_dir=runs/search")
