"""One self-improvement round's search (SAGE.md §4): self-play tree search with a judge.

K children per assistant turn (sampled, or distinct action motivations from a closed vocabulary),
the judge picks one, the rest are negatives. Writes trajectories, trees, preference pairs and the
selected dialogues as SFT data for the next round:

    python -m experiments.search_round model=runs/experiments/sft_m1 judge=openai:mixtral@http://host:8000/v1 \
        num_seeds=512 k=4 output_dir=runs/search_r1
"""

from __future__ import annotations

import dataclasses

from experiments.common import experiment_main
from sage_jax.search.tree import SearchConfig, run_search


@dataclasses.dataclass(frozen=True)
class Config(SearchConfig):
    output_dir: str = "runs/experiments/search_round"


main = experiment_main("search_round", Config, run_search, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
