"""`sage-jax search` and `sage-jax compare`: YAML config + key=value overrides."""

from __future__ import annotations

import argparse
import json


def _search(args: argparse.Namespace) -> int:
    from sage_jax.config import config_from_args
    from sage_jax.rollout.tree import SearchConfig, run_search

    print(json.dumps(run_search(config_from_args(SearchConfig, args)), indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from sage_jax.config import config_from_args
    from sage_jax.eval.compare import CompareConfig, format_table, run_compare

    print(format_table(run_compare(config_from_args(CompareConfig, args))))
    return 0


def register(sub) -> None:
    from sage_jax.config import add_config_args

    p = sub.add_parser("search", help="self-play dialogue tree search with a judge (trajectories, trees, pairs)",
                       description="Fields of SearchConfig (sage_jax/rollout/tree.py) as key=value, e.g. "
                                   "model=runs/m1 judge=rules: num_seeds=16 k=4 turns=8 output_dir=runs/search")
    add_config_args(p)
    p.set_defaults(func=_search)
    p = sub.add_parser("compare", help="A/B compare two rollout sets in both orders (consensus table)",
                       description="Fields of CompareConfig (sage_jax/eval/compare.py): a=A.jsonl b=B.jsonl "
                                   "judge=SPEC output=DIR")
    add_config_args(p)
    p.set_defaults(func=_compare)
