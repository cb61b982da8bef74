"""The paper's pairwise evaluation (SAGE.md §6): two rollout sets from the same seeds, judged in
both orders; wins count only when both orders agree.

    python -m experiments.compare a=runs/selfplay_sage/sft.jsonl b=runs/selfplay_base/sft.jsonl judge=rules:
"""

from __future__ import annotations

import dataclasses

from experiments.common import experiment_main
from sage_jax.eval.compare import CompareConfig, run_compare


@dataclasses.dataclass(frozen=True)
class Config(CompareConfig):
    output_dir: str = "runs/experiments/compare"


def run(cfg: Config) -> dict:
    summary = run_compare(dataclasses.replace(cfg, output=cfg.output_dir))
    return {**summary, "metrics": {k: summary[k] for k in ("wins_a", "wins_b", "no_consensus", "total")}}


main = experiment_main("compare", Config, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
