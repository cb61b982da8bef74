"""DPO on the tree search's preference pairs, the paper's last stage (SAGE.md §5).

Defaults are the paper's recipe (those of DPORunConfig): sigmoid DPO, beta 0.1, plus an SFT term
on the chosen reply (ftx 1.0); LoRA rank 8 on q_proj/v_proj; lr 1e-5 cosine with 20 warmup
steps; 3 epochs; 4096 tokens; the reference is the frozen starting model. Give the preference
pairs the search wrote (pairs.jsonl) and the model that played (m3, exported to HF):

    python -m experiments.dpo model.path=runs/m3_hf "train_files=[runs/search_m3/pairs.jsonl]" output_dir=runs/dpo
"""

from __future__ import annotations

import dataclasses

from experiments.common import experiment_main, resolve_files
from sage_jax.train.dpo import DPORunConfig, run_dpo


@dataclasses.dataclass(frozen=True)
class Config(DPORunConfig):
    output_dir: str = "runs/experiments/dpo"


def run(cfg: Config) -> dict:
    return run_dpo(resolve_files(cfg))


main = experiment_main("dpo", Config, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
