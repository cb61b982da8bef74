"""The whole self-improvement loop (SAGE.md §3-5): m1 = SFT, then rounds of search + SFT on the
selected dialogues (m2, m3), then DPO on the last model's preference pairs; resumable per stage,
with lineage.json.

    python -m experiments.self_improve base_model=smollm2 rounds=2 search.num_seeds=64 sft.max_steps=200
"""

from __future__ import annotations

import dataclasses

from experiments.common import experiment_main
from sage_jax.loop import LoopConfig, run_loop


@dataclasses.dataclass(frozen=True)
class Config(LoopConfig):
    output_dir: str = "runs/experiments/self_improve"


main = experiment_main("self_improve", Config, run_loop, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
