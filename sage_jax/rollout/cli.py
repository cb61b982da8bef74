"""`sage-jax search` and `sage-jax compare`: YAML config + key=value overrides."""

from __future__ import annotations


def register(sub) -> None:
    from sage_jax.config import add_config_command

    add_config_command(sub, "search", "sage_jax.rollout.tree:SearchConfig:run_search",
                       help="self-play dialogue tree search with a judge (trajectories, trees, pairs)",
                       description="Fields of SearchConfig (sage_jax/rollout/tree.py) as key=value, e.g. "
                                   "model=runs/m1 judge=rules: num_seeds=16 k=4 turns=8 output_dir=runs/search")
    add_config_command(sub, "compare", "sage_jax.eval.compare:CompareConfig:run_compare",
                       show="sage_jax.eval.compare:format_table",
                       help="A/B compare two rollout sets in both orders (consensus table)",
                       description="Fields of CompareConfig (sage_jax/eval/compare.py): a=A.jsonl b=B.jsonl "
                                   "judge=SPEC output=DIR")
